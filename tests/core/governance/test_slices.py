"""Budget slices (governance/slices.py) over every state store backend: take, carve, settle,
return, the near-limit fallback, and no overspend under concurrency (a dead owner's slice:
test_reconcile.py)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from candela_mitm.governance.ledger import (
    BudgetRefusal,
    KeyBudget,
    Ledger,
    Reservation,
    UsageRow,
)
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.governance.slices import (
    MAX_AGE_S,
    SliceRules,
    Slices,
    free_after,
    next_size,
    paced,
    slice_size,
)
from candela_mitm.state import StateStore
from candela_mitm.state.ports import (
    RECALLS_KEPT,
    ReserveResult,
    to_us,
)
from tests.core.governance.races import hammer_processes

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)
U = "alice@example.com"
RULES = SliceRules(requests=10, headroom=4, flush_s=0.05, idle_s=5.0)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def own(ledger: Ledger, amount: float, budget: float = 100.0, tenant: str | None = None,
        **kw: Any) -> Reservation:
    got = ledger.reserve(U, tenant, amount, budget, "span-own", model="gpt-4o", provider="openai",
                         **kw)
    assert isinstance(got, Reservation)
    return got


def take(slices: Slices, res: Reservation) -> bool:
    """A slice after `res` (a budget reserving on its own twice within idle_s asks for one)."""
    ask = slices.ask(res) or slices.ask(res)
    if ask is None:
        return False
    return slices.took(ask, ask.reserve())


def test_a_budget_is_sliced_once_used_again_within_idle_s(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, RULES, clock=lambda: T0, monotonic=mono)
    res = own(ledger, 1.0)
    assert slices.ask(res) is None  # once: a slice might idle unused
    mono.t += RULES.idle_s + 1
    assert slices.ask(res) is None  # again, but not soon enough
    mono.t += RULES.idle_s / 2
    ask = slices.ask(res)
    assert ask is not None and slices.took(ask, ask.reserve())


def test_an_idle_users_requests_seconds_apart_are_carved_from_one_slice(
    store: StateStore,
) -> None:
    """The default rules: a user sending a request every 5 s (the common LLM pattern) reserves
    on its own twice, then every request is carved from the slice the second one took, which
    stays across the gaps (flushes between them) until idle_s after the last one."""
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    rules = SliceRules(flush_s=0.05)  # the defaults
    assert rules.idle_s == 30.0 and rules.max_held == 4096
    slices = Slices(ledger, rules, clock=lambda: T0, monotonic=mono)
    k = key(slices, budget=1000.0)
    assert slices.carve(k, 1.0, "span-1") is None
    assert slices.ask(own(ledger, 1.0, budget=1000.0)) is None  # once: no slice
    mono.t += 5
    slices.flush()
    assert slices.carve(k, 1.0, "span-2") is None
    ask = slices.ask(own(ledger, 1.0, budget=1000.0))  # again within idle_s: a slice
    # sized to its pace (a hold every 5 s over a slice's 60 s life: 13 holds), not 32 holds
    assert ask is not None and ask.amount_usd == 13.0 and slices.took(ask, ask.reserve())
    for i in range(3, 10):
        mono.t += 5
        slices.flush()  # the gap: an idle scan, nothing returned
        assert slices.held() == 1
        c = slices.carve(k, 1.0, f"span-{i}")
        assert c is not None and c.slice == ask_id(slices)
        slices.settle(c, 0.5, 10, 10, "gpt-4o", "openai")
    mono.t += rules.record_s + 1
    slices.flush()  # spend recorded, the slice kept
    assert slices.held() == 1 and ledger.status(U, 1000.0).spent_usd == 3.5
    mono.t += rules.idle_s - 2
    slices.flush()
    assert slices.held() == 1  # idle, but for less than idle_s
    mono.t += 2
    slices.flush()
    assert slices.held() == 0  # idle_s after its last use: returned
    status = ledger.status(U, 1000.0)
    assert (status.spent_usd, status.reserved_usd) == (3.5, 2.0)  # the two own ones held


def test_a_slice_holds_what_its_pace_spends_over_a_slices_life() -> None:
    """`paced`: at least two holds, at most `requests`; what the demand spends in MAX_AGE_S
    between. A first slice and one taken ahead are sized by it at an idle user's pace, and are
    `requests` holds at a busy one's (as before)."""
    rules = SliceRules()
    hold = 1_000
    assert paced(rules, hold, hold / 5) == 13 * hold  # a request every 5 s
    assert paced(rules, hold, hold / 45) == 2 * hold  # fewer than two in a slice's life
    assert paced(rules, hold, hold * 10) == rules.requests * hold  # 10 a second: busy
    assert paced(rules, 0, 1.0) == 0
    free = 10**9
    assert next_size(rules, hold, hold / 5, free) == 13 * hold
    assert next_size(rules, hold, hold * 10, free) == rules.requests * hold
    assert next_size(rules, hold, hold * 100, free) == 100 * hold  # demand_s of the demand


def test_a_busy_budgets_first_slice_holds_requests_holds(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, SliceRules(), clock=lambda: T0, monotonic=mono)
    assert slices.ask(own(ledger, 1.0, budget=1000.0)) is None
    mono.t += 0.1
    ask = slices.ask(own(ledger, 1.0, budget=1000.0))
    assert ask is not None and ask.amount_usd == SliceRules().requests * 1.0


def test_the_rules_read_idle_s_and_max_held_from_the_config() -> None:
    from candela_mitm.config import BudgetSlices

    assert SliceRules.of(BudgetSlices()) == SliceRules(flush_s=0.25, record_s=1.0)
    assert (SliceRules.of(BudgetSlices()).idle_s, SliceRules.of(BudgetSlices()).max_held) == (
        30.0, 4096)
    rules = SliceRules.of(BudgetSlices(idle_s=2.5, max_held=7))
    assert (rules.idle_s, rules.max_held) == (2.5, 7)


def ask_id(slices: Slices) -> str:
    """The id of the one slice `slices` holds."""
    ids = list(slices._by_id)
    assert len(ids) == 1
    return ids[0]


def test_a_process_holds_at_most_max_held_slices(store: StateStore) -> None:
    """Past max_held no slice is asked (none returned to make room): the other budgets reserve
    on their own until a slice held is returned; a slice taken ahead counts too."""
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, SliceRules(requests=10, headroom=4, idle_s=5.0, max_held=2),
                    clock=lambda: T0, monotonic=mono)
    users = ["a@x", "b@x", "c@x"]

    def own_of(user: str) -> Reservation:
        got = ledger.reserve(user, None, 1.0, 100.0, "span-own")
        assert isinstance(got, Reservation)
        return got

    def taken(user: str) -> bool:
        ask = slices.ask(own_of(user)) or slices.ask(own_of(user))
        return ask is not None and slices.took(ask, ask.reserve())

    assert taken(users[0]) and taken(users[1])
    assert not taken(users[2]) and slices.held() == 2  # the bound: none asked
    assert ledger.status(users[2], 100.0).reserved_usd == 2.0  # its own two, no slice
    daily = BudgetPeriod("daily", "UTC")
    k0 = slices.key_of(users[0], 100.0, daily, None, None, daily, None, T0)
    carved = [slices.carve(k0, 1.0, f"s{i}") for i in range(9)]
    assert all(c is not None for c in carved)
    assert slices.ask_next(carved[-1]) is None  # its slice nearly spent, but none taken ahead
    for c in carved:
        slices.release(c)
    mono.t += 6  # both idle: returned
    slices.flush()
    assert slices.held() == 0
    assert taken(users[2])  # room again
    # at the bound a slice being taken counts: the one asked fills it
    assert taken(users[0])
    ask = slices.ask(own_of(users[1]))
    assert ask is None and slices.held() == 2


def test_a_refusal_returns_this_processs_slices_of_the_budget_that_refused(
    store: StateStore,
) -> None:
    """A request refused near a budget's end: this process's slices of that budget go back to
    the store at the next flush, not after idle_s; a user's refusal returns that user's slices
    only, a tenant's every slice of that tenant."""
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, RULES, clock=lambda: T0, monotonic=mono)
    tb = {"tenant_budget_usd": 1000.0}

    def own_of(user: str, amount: float = 1.0) -> Reservation | BudgetRefusal:
        return ledger.reserve(user, "t", amount, 100.0, "span-own", **tb)

    def taken(user: str) -> bool:
        a, b = own_of(user), own_of(user)
        assert isinstance(a, Reservation) and isinstance(b, Reservation)
        ask = slices.ask(a) or slices.ask(b)
        return ask is not None and slices.took(ask, ask.reserve())

    assert taken(U) and taken("bob@x") and slices.held() == 2
    assert ledger.status(U, 100.0).reserved_usd == 12.0  # two own, a slice of 10
    other = ledger.reserve(U, "t", 86.0, 100.0, "span-other", **tb)  # another process
    assert isinstance(other, Reservation)
    refused = own_of(U, 3.0)  # 100 - 12 - 86 = 2 left: refused, the slice's 10 unused
    assert isinstance(refused, BudgetRefusal) and refused.scope == "user"
    assert slices.refused(refused) == 1  # alice's slice, not bob's
    daily = BudgetPeriod("daily", "UTC")
    assert slices.carve(slices.key_of(U, 100.0, daily, "t", 1000.0, daily, None, T0), 1.0,
                        "s") is None
    slices.flush()
    assert slices.held() == 1 and ledger.status(U, 100.0).reserved_usd == 88.0
    assert isinstance(own_of(U, 3.0), Reservation)  # fits now
    # the tenant's budget refuses: every slice of the tenant is returned
    big = ledger.reserve("dave@x", "t", 1000.0, 1e6, "span-big", **tb)
    assert isinstance(big, BudgetRefusal) and big.scope == "tenant"
    assert slices.refused(big) == 1  # bob's
    slices.flush()
    assert slices.held() == 0


def test_after_a_refusal_a_retired_slice_with_room_is_carved_from(store: StateStore) -> None:
    """`carve_held`: a slice retired but not yet returned (an admin change, a slice asked ahead
    and returned unused) still holds this process's money: a request the store refused is
    carved from it, of its own budgets only, not from one a flush is returning nor one past
    MAX_AGE_S; the flush returns it once that request has settled, its spend recorded."""
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, RULES, clock=lambda: T0, monotonic=mono)
    assert take(slices, own(ledger, 1.0))  # a slice of 10 holds of 1.0
    slices.retire_all()
    assert slices.carve(key(slices), 1.0, "s") is None  # retired: the request path skips it
    refused = ledger.reserve(U, None, 95.0, 100.0, "span-big")
    assert isinstance(refused, BudgetRefusal) and slices.holding(refused)
    assert slices.carve_held(key(slices, budget=50.0), 1.0, "s") is None  # other budgets
    assert slices.carve_held(key(slices), 11.0, "s") is None  # no room for it
    got = slices.carve_held(key(slices), 4.0, "span-1")
    assert got is not None and got.slice and got.request_id == "span-1"
    assert got.amount_usd == 4.0
    slices.flush()
    assert slices.held() == 1  # its request in flight: kept
    slices.settle(got, 3.0, 10, 10, "gpt-4o", "openai")
    slices.flush()
    assert slices.held() == 0
    status = ledger.status(U, 100.0)
    assert (status.spent_usd, status.reserved_usd) == (3.0, 1.0)  # the own reservation left
    # one a flush is returning, and one too old, are not carved from
    assert take(slices, own(ledger, 1.0))
    (s,) = slices._by_id.values()
    s.returning = True
    assert slices.carve_held(key(slices), 1.0, "s") is None
    s.returning = False
    mono.t += MAX_AGE_S + 1
    assert slices.carve_held(key(slices), 1.0, "s") is None


def test_return_now_returns_the_refused_budgets_slices_before_the_answer(
    store: StateStore,
) -> None:
    """`return_now`: after a refusal no slice had room for, this process's slices of that
    budget are returned at once (not at the next flush) unless requests carved from them are
    in flight; True only when one holding money unused went back."""
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, RULES, clock=lambda: T0, monotonic=mono)
    assert take(slices, own(ledger, 1.0))
    carved = slices.carve(key(slices), 1.0, "span-1")
    done = slices.carve(key(slices), 1.0, "span-2")
    assert carved is not None and done is not None
    slices.settle(done, 0.0, 1, 1, "gpt-4o", "openai")
    other = ledger.reserve(U, None, 100.0 - 12.0, 100.0, "span-other")  # another process
    assert isinstance(other, Reservation)
    refused = ledger.reserve(U, None, 9.5, 100.0, "span-big")  # 9 in the slice, unused
    assert isinstance(refused, BudgetRefusal)
    assert slices.return_now(refused) == (False, [])  # a request in flight: kept
    assert slices.held() == 1
    assert ledger.usage(user=U) == []  # and no flush made for nothing (its spend still queued)
    slices.settle(carved, 1.0, 1, 1, "gpt-4o", "openai")
    returned, recorded = slices.return_now(refused)
    assert returned and [r.id for r in recorded] == [carved.slice] and slices.held() == 0
    assert isinstance(ledger.reserve(U, None, 9.5, 100.0, "span-big"), Reservation)  # fits now
    # no slice of that budget held: nothing to return
    assert slices.return_now(refused) == (False, [])


def test_a_refusal_in_one_process_recalls_the_slices_another_holds(store: StateStore) -> None:
    """Process B's reservation refused while process A holds an unused slice of the budget: B
    leaves a recall mark (one a second per budget), A returns its slice at its next flush, and
    what it held fits B's next request; a mark recalls only the slices of its budget taken
    before it, and marks missed return every slice."""
    wall = [T0]
    ledger_a = Ledger(store, clock=lambda: wall[0])
    ledger_b = Ledger(store, clock=lambda: wall[0])
    mono_a, mono_b = Clock(), Clock()
    a = Slices(ledger_a, RULES, clock=lambda: wall[0], monotonic=mono_a)
    b = Slices(ledger_b, RULES, clock=lambda: wall[0], monotonic=mono_b)
    tb = {"tenant_budget_usd": 1000.0}

    def reserve(ledger: Ledger, user: str, amount: float) -> Reservation | BudgetRefusal:
        return ledger.reserve(user, "t", amount, 100.0, "span", **tb)

    def taken(slices: Slices, ledger: Ledger, user: str) -> bool:
        x, y = reserve(ledger, user, 1.0), reserve(ledger, user, 1.0)
        assert isinstance(x, Reservation) and isinstance(y, Reservation)
        ask = slices.ask(x) or slices.ask(y)
        return ask is not None and slices.took(ask, ask.reserve())

    assert taken(a, ledger_a, U) and taken(a, ledger_a, "bob@x")
    assert isinstance(reserve(ledger_b, U, 86.0), Reservation)
    refused = reserve(ledger_b, U, 3.0)  # 100 - 12 - 86: A's slice of 10 stands in the way
    assert isinstance(refused, BudgetRefusal)
    assert b.refused(refused) == 0  # B holds none
    mark = b.recall_mark(refused)
    assert mark == ("user", U)
    b.recall(mark)
    assert b.recall_mark(refused) is None  # one a second per budget
    mono_b.t += 1.5
    assert b.recall_mark(refused) == mark
    a.flush()
    assert a.held() == 1  # alice's returned, bob's (another user) kept
    assert ledger_a.status(U, 100.0).reserved_usd == 88.0
    assert isinstance(reserve(ledger_b, U, 3.0), Reservation)  # fits now
    # a mark made before a slice was taken (past the clocks' skew) does not recall it
    store.recall_slices("user", "bob@x", to_us(T0))
    wall[0] = T0 + timedelta(seconds=5)
    a.flush()  # reads the mark: bob's slice, taken at T0, is returned
    assert a.held() == 0
    assert taken(a, ledger_a, "bob@x")
    store.recall_slices("user", "bob@x", to_us(T0))
    a.flush()
    assert a.held() == 1  # taken at T0 + 5 s, after the mark: kept
    # no skew allowed: a mark a microsecond before the slice was taken (a stale one, read at
    # the first flush after the slice was taken) does not recall it
    store.recall_slices("user", "bob@x", to_us(wall[0]) - 1)
    a.flush()
    assert a.held() == 1
    # the tenant's budget: every slice of the tenant
    b.recall(("tenant", "t"))
    a.flush()
    assert a.held() == 0
    # more marks than the store keeps since A last read: every slice is returned
    assert taken(a, ledger_a, "bob@x")
    a.flush()
    assert a.held() == 1
    for i in range(RECALLS_KEPT + 2):
        store.recall_slices("user", f"other{i}", to_us(wall[0]))
    a.flush()
    assert a.held() == 0
    assert ledger_a.status("bob@x", 100.0).reserved_usd == 6.0  # its own ones: no slice held


def key(slices: Slices, budget: float = 100.0, tenant: str | None = None,
        tenant_budget: float | None = None, kb: KeyBudget | None = None) -> Any:
    daily = BudgetPeriod("daily", "UTC")
    return slices.key_of(U, budget, daily, tenant, tenant_budget, daily, kb, T0)


@pytest.mark.parametrize(
    ("hold", "free", "size"),
    [
        (10, 10_000, 100),  # requests x hold
        (10, 200, 50),  # never more than free / headroom
        (10, 79, 0),  # under two holds' worth: none
        (0, 10_000, 0),  # a free request asks for no slice
    ],
)
def test_slice_size(hold: int, free: int, size: int) -> None:
    assert slice_size(RULES, hold, free) == size


def test_free_after_is_the_least_of_the_budgets() -> None:
    seen = ReserveResult(True, 0, {}, 30, 10, 5, 7, tenant_spent=50, tenant_reserved=5,
                         key_spent=1, key_reserved=2)
    k = Slices.key_of(U, 1e-7, BudgetPeriod("daily", "UTC"), None, None,
                      BudgetPeriod("daily", "UTC"), None, T0)
    # 100 - (30 - 10) - 5 + 7 - 3
    assert free_after(seen, k, 3) == 100 - 20 - 5 + 7 - 3
    k2 = Slices.key_of(U, 1e-7, BudgetPeriod("daily", "UTC"), "t", 8e-8,
                       BudgetPeriod("daily", "UTC"), KeyBudget("k_1", "k_1", 9e-8), T0)
    assert free_after(seen, k2, 3) == min(79, 80 - 55 - 3, 90 - 3 - 3)


def test_take_carve_settle_flush_and_return(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, RULES, clock=lambda: T0, monotonic=mono)
    first = own(ledger, 1.0)
    assert take(slices, first)  # 10 holds of 1.0 fit 100 / 4
    assert ledger.status(U, 100.0).reserved_usd == 11.0
    k = key(slices)
    carved = [slices.carve(k, 1.0, f"span-{i}") for i in range(12)]
    held = [c for c in carved if c is not None]
    assert len(held) == 10 and carved[10] is None  # the 11th did not fit: returned
    assert all(c.slice == held[0].slice and c.request_id.startswith("span-") for c in held)
    for c in held[:6]:
        slices.settle(c, 0.5, 100, 10, "gpt-4o", "openai")
    for c in held[6:9]:
        slices.release(c)
    # nothing reached the store yet: the slice holds it all
    assert ledger.status(U, 100.0).spent_usd == 0
    slices.flush()
    status = ledger.status(U, 100.0)
    assert status.spent_usd == 3.0 and status.reserved_usd == 8.0  # 11 - 3 drawn from holds
    assert ledger.usage(user=U) == [UsageRow("gpt-4o", "openai", 3.0, 600, 60, 6)]
    assert slices.held() == 1  # one request still in flight: not returned yet
    slices.settle(held[9], 2.0, 1, 1, "gpt-4o-mini", "openai")
    slices.flush()
    assert slices.held() == 0
    ledger.settle(first, 1.0, 1, 1, "gpt-4o", "openai")
    status = ledger.status(U, 100.0)
    assert (status.spent_usd, status.reserved_usd, status.remaining_usd) == (6.0, 0.0, 94.0)
    assert store.active_reservations() == []


def test_idle_slices_are_returned_and_shutdown_returns_all(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, RULES, clock=lambda: T0, monotonic=mono)
    assert take(slices, own(ledger, 1.0))
    c = slices.carve(key(slices), 1.0, "span-1")
    assert c is not None
    slices.release(c)
    mono.t += 1
    slices.flush()
    assert slices.held() == 1  # used a second ago
    mono.t += RULES.idle_s + 1
    slices.flush()
    assert slices.held() == 0 and slices.carve(key(slices), 1.0, "span-2") is None
    assert take(slices, own(ledger, 1.0))
    slices.flush(everything=True)
    assert slices.held() == 0 and ledger.status(U, 100.0).reserved_usd == 2.0  # the own ones


def test_old_and_retired_slices_are_not_carved(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    mono = Clock()
    slices = Slices(ledger, RULES, clock=lambda: T0, monotonic=mono)
    assert take(slices, own(ledger, 1.0))
    mono.t += MAX_AGE_S + 1
    assert slices.carve(key(slices), 1.0, "s") is None
    assert take(slices, own(ledger, 1.0))
    slices.retire_all()  # an admin change in this process
    assert slices.carve(key(slices), 1.0, "s") is None
    assert take(slices, own(ledger, 1.0))
    slices.retire_stale(key(slices, budget=50.0))  # a request saw another budget
    assert slices.carve(key(slices), 1.0, "s") is None
    slices.flush()
    assert slices.held() == 0


def test_a_budget_near_its_end_is_not_sliced(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    slices = Slices(ledger, RULES, clock=lambda: T0)
    # 100 budget, 93 spent: 6 left after this request, under 4 slices of 2 holds each
    spent = own(ledger, 0.0)
    ledger.settle(spent, 93.0, 1, 1, "gpt-4o", "openai")
    assert not take(slices, own(ledger, 1.0))
    assert slices.carve(key(slices), 1.0, "s") is None


def test_a_slice_covers_tenant_and_key_budgets_or_none(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    slices = Slices(ledger, RULES, clock=lambda: T0)
    kb = KeyBudget("k_1", "k_1", 20.0)
    # the key's budget is the tightest: 20 - 1 left, / 4: 4.75, a slice of 4 whole holds
    res = own(ledger, 1.0, tenant="t", tenant_budget_usd=1000.0, key_budget=kb)
    assert take(slices, res)
    assert ledger.key_status(kb).reserved_usd == pytest.approx(5.0)
    assert ledger.tenant_status("t", 1000.0).reserved_usd == pytest.approx(5.0)
    k = key(slices, tenant="t", tenant_budget=1000.0, kb=kb)
    assert slices.carve(key(slices, tenant="t", tenant_budget=1000.0), 1.0, "s") is None
    c = slices.carve(k, 1.0, "s")
    assert c is not None
    slices.settle(c, 0.25, 1, 1, "gpt-4o", "openai")
    slices.flush(everything=True)
    assert ledger.key_status(kb).spent_usd == 0.25
    assert ledger.tenant_status("t", 1000.0).spent_usd == 0.25
    assert ledger.key_status(kb).reserved_usd == 1.0  # the own reservation alone


def test_a_refused_slice_holds_nothing(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    slices = Slices(ledger, RULES, clock=lambda: T0)
    res = own(ledger, 1.0)
    assert slices.ask(res) is None  # the first: primes
    ask = slices.ask(res)
    assert ask is not None and slices.ask(res) is None  # one take at a time
    spent = own(ledger, 0.0)
    ledger.settle(spent, 95.0, 1, 1, "gpt-4o", "openai")  # meanwhile another process spent
    got = ask.reserve()
    assert isinstance(got, BudgetRefusal)
    assert not slices.took(ask, got)
    assert slices.held() == 0 and slices.carve(key(slices), 1.0, "s") is None


COST = 0.013  # what each request really costs; its hold is 0.02
BUDGET = 6.0


def hammer(ledger: Ledger, slices: Slices, n: int, out: list[tuple[int, int]]) -> None:
    """n requests as the proxy makes them: a carve, else a reservation of its own (which may
    ask for a slice); each settles at COST. `out` gets the numbers admitted and carved."""
    admitted = carved = 0
    k = key(slices, budget=BUDGET)
    for i in range(n):
        res = slices.carve(k, 0.02, f"span-{i}")
        if res is None:
            got = ledger.reserve(U, None, 0.02, BUDGET, f"span-{i}", model="m", provider="p")
            if isinstance(got, BudgetRefusal):
                slices.flush()
                continue
            res = got
            ask = slices.ask(res)
            if ask is not None:
                slices.took(ask, ask.reserve())
        admitted += 1
        carved += bool(res.slice)
        if res.slice:
            slices.settle(res, COST, 1, 1, "m", "p")
        else:
            ledger.settle(res, COST, 1, 1, "m", "p")
        if i % 7 == 0:
            slices.flush()
    slices.flush(everything=True)
    out.append((admitted, carved))


def test_threads_hammering_one_budget_never_overspend(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    out: list[tuple[int, int]] = []
    workers = [
        threading.Thread(target=hammer, args=(ledger, Slices(ledger, RULES, clock=lambda: T0),
                                              200, out))
        for _ in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    status = ledger.status(U, BUDGET)
    admitted = sum(a for a, _ in out)
    assert sum(c for _, c in out) > admitted // 2  # most came from slices
    assert status.reserved_usd == 0 and store.active_reservations() == []
    # every admitted request's cost, exactly, and never past the budget
    assert status.spent_usd == pytest.approx(admitted * COST, abs=1e-9)
    assert status.spent_usd <= BUDGET
    # nothing stranded in a slice at the end: what is left can still be spent, down to less
    # than one more request's hold (the threads' own last requests may have been refused
    # while another thread held a slice it gave back after: under-admission, timing's)
    hammer(ledger, Slices(ledger, RULES, clock=lambda: T0), 200, out)
    status = ledger.status(U, BUDGET)
    admitted = sum(a for a, _ in out)
    assert status.spent_usd == pytest.approx(admitted * COST, abs=1e-9)
    assert status.spent_usd <= BUDGET
    assert BUDGET - status.spent_usd < 0.02
    assert status.reserved_usd == 0 and store.active_reservations() == []
    (row,) = ledger.usage(user=U)
    assert row.requests == admitted


def _hammered(store: StateStore, n: int) -> tuple[int, int]:
    ledger = Ledger(store, clock=lambda: T0)
    out: list[tuple[int, int]] = []
    hammer(ledger, Slices(ledger, RULES, clock=lambda: T0), n, out)
    return out[0]


@pytest.mark.processes
def test_processes_hammering_one_budget_never_overspend(backend: Any) -> None:
    out = hammer_processes(backend, _hammered, 200)
    admitted = sum(a for a, _ in out)
    assert sum(c for _, c in out) > admitted // 2
    ledger = Ledger(backend.open(), clock=lambda: T0)
    status = ledger.status(U, BUDGET)
    assert status.reserved_usd == 0
    assert status.spent_usd == pytest.approx(admitted * COST, abs=1e-9)
    assert status.spent_usd <= BUDGET
    assert BUDGET - status.spent_usd < 0.02
    (row,) = ledger.usage(user=U)
    assert row.requests == admitted


def test_spend_a_flush_could_not_record_is_recorded_by_the_next() -> None:
    from candela_mitm.errors import StoreUnavailable
    from candela_mitm.state.memory import MemoryStateStore

    class Flaky(MemoryStateStore):
        fail = 0

        def settle_part(self, *a: Any) -> Any:
            if self.fail:
                self.fail -= 1
                raise StoreUnavailable("down")
            return super().settle_part(*a)

    store = Flaky()
    ledger = Ledger(store, clock=lambda: T0)
    slices = Slices(ledger, RULES, clock=lambda: T0)
    assert take(slices, own(ledger, 1.0))
    c = slices.carve(key(slices), 1.0, "span-1")
    assert c is not None
    slices.settle(c, 0.75, 5, 5, "gpt-4o", "openai")
    store.fail = 1
    assert slices.flush(everything=True) == []
    assert slices.held() == 1 and ledger.spent_today(U) == 0  # kept, and the slice with it
    (recorded,) = slices.flush(everything=True)
    assert recorded.id == c.slice and ledger.spent_today(U) == 0.75
    assert slices.held() == 0 and store.active_reservations() == [
        a for a in store.active_reservations() if not a.request_id.startswith("slice:")
    ]


def test_one_flush_records_every_slice(store: StateStore) -> None:
    ledger = Ledger(store, clock=lambda: T0)
    slices = Slices(ledger, RULES, clock=lambda: T0)
    users = ["a@x", "b@x", "c@x"]
    for u in users:
        got = ledger.reserve(u, None, 1.0, 100.0, "own", model="m", provider="p")
        assert isinstance(got, Reservation)
        assert take(slices, got)
    daily = BudgetPeriod("daily", "UTC")
    for u in users:
        c = slices.carve(slices.key_of(u, 100.0, daily, None, None, daily, None, T0), 1.0, "s")
        assert c is not None
        slices.settle(c, 0.5, 1, 1, "m", "p")
    assert len(slices.flush(everything=True)) == 3
    assert [ledger.spent_today(u) for u in users] == [0.5, 0.5, 0.5]
    assert slices.held() == 0


def test_a_carved_reservation_is_what_dataclasses_replace_makes() -> None:
    """carved_from copies the reservation's __dict__: Reservation must keep one (no slots) and
    need no __post_init__, and the copy must equal replace's, field by field."""
    import dataclasses
    from datetime import UTC, datetime

    from candela_mitm.governance.ledger import KeyBudget, Reservation
    from candela_mitm.governance.slices import carved_from

    assert not hasattr(Reservation, "__post_init__") and not hasattr(Reservation, "__slots__")
    res = Reservation(
        "s_1", "u", "t", 1.5, "2026-12-05", "r", "o", datetime(2026, 12, 5, tzinfo=UTC), 1.0,
        {"g": 0.5}, 1.5, 100.0, key_budget=KeyBudget("k", "k", 2.0), key_hold_usd=1.5,
    )
    changes = {"amount_usd": 0.25, "request_id": "x", "seen": None, "slice": "s_1",
               "created_at": datetime(2026, 12, 6, tzinfo=UTC)}
    got, want = carved_from(res, **changes), dataclasses.replace(res, **changes)
    assert type(got) is Reservation
    assert {f.name: getattr(got, f.name) for f in dataclasses.fields(Reservation)} == {
        f.name: getattr(want, f.name) for f in dataclasses.fields(Reservation)
    }
    assert res.amount_usd == 1.5 and res.slice == ""  # the slice's own reservation unchanged
