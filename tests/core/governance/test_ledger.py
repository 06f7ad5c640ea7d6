"""Budget ledger contract, run against every state store backend."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from candela_mitm.errors import StoreUnavailable
from candela_mitm.governance.ledger import (
    BudgetRefusal,
    KeyBudget,
    Ledger,
    Reservation,
    default_owner,
)
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.state import StateStore, UserRecord
from candela_mitm.state.sqlite import SqliteStateStore
from tests.core.governance.races import race_processes, race_threads

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)
TOMORROW = "2026-05-18T00:00:00Z"
U = "alice@example.com"


def fixed(moment: datetime) -> Any:
    return lambda: moment


@pytest.fixture
def ledger(store: StateStore) -> Ledger:
    return Ledger(store, clock=fixed(T0))


def reserve(ledger: Ledger, amount: float, budget: float = 10.0, **kw: Any) -> Any:
    return ledger.reserve(U, "research-team", amount, budget, "req-1", **kw)


def spend(ledger: Ledger, cost: float, budget: float = 10.0) -> None:
    """Record real spend: a free reservation settled with its true cost."""
    r = reserve(ledger, 0.0, budget)
    assert isinstance(r, Reservation)
    assert ledger.settle(r, cost, 100, 10, "gpt-4o", "openai").applied


# -- reserve arithmetic ------------------------------------------------------------------------

# budget, grants (amount, hours until expiry), settled spend, active holds, amount, ok, spendable
ARITHMETIC = [
    pytest.param(10, [], [], [], 10, True, 10, id="fits-exactly"),
    pytest.param(10, [], [], [], 10.01, False, 10, id="a-cent-over"),
    pytest.param(10, [], [4], [], 6, True, 6, id="spend-counts"),
    pytest.param(10, [], [4], [], 6.01, False, 6, id="spend-counts-over"),
    pytest.param(10, [], [], [3], 7, True, 7, id="holds-count"),
    pytest.param(10, [], [], [3], 7.5, False, 7, id="holds-count-over"),
    pytest.param(10, [(5, 24)], [], [], 15, True, 15, id="grant-adds"),
    pytest.param(10, [(5, 24)], [], [], 15.01, False, 15, id="grant-adds-over"),
    pytest.param(10, [(5, -1)], [], [], 10.01, False, 10, id="expired-grant-gives-nothing"),
    pytest.param(10, [(5, 24)], [12], [], 3, True, 3, id="spend-drew-the-grant"),
    pytest.param(0, [(5, 24)], [], [4], 1.01, False, 1, id="grant-held-by-reservation"),
    pytest.param(1, [], [3], [], 0.01, False, 0, id="overspend-blocks"),
    pytest.param(1, [(1, 24)], [3], [], 0.01, False, 0, id="overspend-eats-grants"),
    pytest.param(1, [], [3], [], 0, True, 0, id="zero-always-passes"),
    pytest.param(0, [], [], [], 0.01, False, 0, id="no-budget"),
    pytest.param(0.7, [], [0.1] * 3, [0.1] * 3, 0.1, True, 0.1, id="no-float-drift"),
]


@pytest.mark.parametrize(
    ("budget", "grants", "settled", "held", "amount", "ok", "spendable"), ARITHMETIC
)
def test_reserve_arithmetic(
    ledger: Ledger,
    budget: float,
    grants: list[tuple[float, float]],
    settled: list[float],
    held: list[float],
    amount: float,
    ok: bool,
    spendable: float,
) -> None:
    for grant_amount, hours in grants:
        expires = T0 + timedelta(hours=hours)
        ledger.add_grant(U, grant_amount, expires, "bonus", "admin", now=T0 - timedelta(days=2))
    for cost in settled:
        spend(ledger, cost, budget=budget)
    for hold in held:
        assert isinstance(reserve(ledger, hold, budget), Reservation)
    assert ledger.status(U, budget).remaining_usd == pytest.approx(spendable, abs=1e-9)

    result = reserve(ledger, amount, budget)
    if ok:
        assert isinstance(result, Reservation)
        assert result.amount_usd == amount and result.day == "2026-05-17"
        after = ledger.status(U, budget).remaining_usd
        assert after == pytest.approx(max(0, spendable - amount), abs=1e-9)
    else:
        assert isinstance(result, BudgetRefusal)
        assert result.remaining_usd == pytest.approx(spendable, abs=1e-9)
        assert result.estimated_cost_usd == amount
        assert result.budget_usd == budget
        assert result.spent_usd == pytest.approx(sum(settled), abs=1e-9)
        assert result.resets_at == TOMORROW


def test_refusal_is_a_402_budget_exceeded(ledger: Ledger) -> None:
    spend(ledger, 7.5)
    refusal = reserve(ledger, 3.0)
    assert isinstance(refusal, BudgetRefusal)
    denial = refusal.denial()
    assert denial.status == 402
    assert denial.payload() == {
        "error": "budget_exceeded",
        "message": denial.message,
        "user_id": U,
        "tenant_id": "research-team",
        "scope": "user",
        "period": "daily",
        "budget_usd": 10.0,
        "spent_usd": 7.5,
        "remaining_usd": 2.5,
        "estimated_cost_usd": 3.0,
        "resets_at": TOMORROW,
    }


def test_reservation_fields(ledger: Ledger) -> None:
    r = ledger.reserve(U, None, 2.5, 10.0, "req-42")
    assert isinstance(r, Reservation)
    assert r.id.startswith("r_") and r.request_id == "req-42" and r.tenant is None
    assert (r.owner, r.created_at, r.allowance_usd, dict(r.grant_holds)) == (
        default_owner(),
        T0,
        2.5,
        {},
    )
    assert r.id != ledger.reserve(U, None, 2.5, 10.0, "req-42").id  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        ("reserve", {"amount_usd": -1}),
        ("reserve", {"amount_usd": float("nan")}),
        ("reserve", {"daily_budget_usd": float("inf")}),
    ],
)
def test_reserve_rejects_bad_amounts(ledger: Ledger, call: str, kwargs: dict[str, Any]) -> None:
    args = {"user": U, "tenant": "t", "amount_usd": 1.0, "daily_budget_usd": 10.0}
    with pytest.raises(ValueError):
        getattr(ledger, call)(request_id="r", **{**args, **kwargs})


# -- settle, release, idempotence --------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimate", "actual", "spent", "remaining"),
    [
        (5.0, 3.0, 3.0, 7.0),  # under the estimate: the rest is free again
        (5.0, 5.0, 5.0, 5.0),
        (1.0, 12.0, 12.0, 0.0),  # over the budget: recorded in full, never lost
        (0.0, 0.25, 0.25, 9.75),  # a zero estimate still records what it cost
    ],
)
def test_settle_records_actual_cost(
    ledger: Ledger, estimate: float, actual: float, spent: float, remaining: float
) -> None:
    r = reserve(ledger, estimate)
    assert isinstance(r, Reservation)
    settled = ledger.settle(r, actual, 1000, 200, "gpt-4o", "openai")
    assert settled.applied and settled.cost_usd == actual
    assert ledger.spent_today(U) == spent
    status = ledger.status(U, 10.0)
    assert (status.spent_usd, status.reserved_usd, status.remaining_usd) == (spent, 0, remaining)


def test_overspend_leaves_only_free_requests(ledger: Ledger) -> None:
    r = reserve(ledger, 1.0)
    assert isinstance(r, Reservation)
    ledger.settle(r, 12.0, 1, 1, "gpt-4o", "openai")
    assert isinstance(reserve(ledger, 0.000001), BudgetRefusal)
    assert isinstance(reserve(ledger, 0.0), Reservation)  # local models stay usable


def test_settle_and_release_are_idempotent(ledger: Ledger) -> None:
    r = reserve(ledger, 4.0)
    assert isinstance(r, Reservation)
    assert ledger.settle(r, 3.0, 10, 10, "gpt-4o", "openai").applied
    again = ledger.settle(r, 3.0, 10, 10, "gpt-4o", "openai")
    assert not again.applied and again.cost_usd == 0
    assert ledger.release(r) is False
    assert ledger.spent_today(U) == 3.0
    assert [u.requests for u in ledger.usage(user=U)] == [1]

    r2 = reserve(ledger, 4.0)
    assert isinstance(r2, Reservation)
    assert ledger.release(r2) is True
    assert ledger.release(r2) is False
    assert not ledger.settle(r2, 4.0, 1, 1, "gpt-4o", "openai").applied  # released: no spend
    status = ledger.status(U, 10.0)
    assert (status.spent_usd, status.reserved_usd, status.remaining_usd) == (3.0, 0.0, 7.0)


# -- grants and the waterfall ------------------------------------------------------------------


def test_waterfall_allowance_then_earliest_expiry(ledger: Ledger) -> None:
    late = ledger.add_grant(U, 5.0, T0 + timedelta(days=3), "late", "admin@example.com")
    soon = ledger.add_grant(U, 5.0, T0 + timedelta(days=1), "soon", "admin@example.com")
    mid = ledger.add_grant(U, 5.0, T0 + timedelta(days=2), "mid", "admin@example.com")

    r = reserve(ledger, 12.0)
    assert isinstance(r, Reservation)
    assert (r.allowance_usd, dict(r.grant_holds)) == (10.0, {soon.id: 2.0})

    s = ledger.settle(r, 17.0, 1, 1, "gpt-4o", "openai")
    assert (s.from_allowance_usd, dict(s.from_grants)) == (10.0, {soon.id: 5.0, mid.id: 2.0})
    used = {g.id: g.used_usd for g in ledger.list_grants(U)}
    assert used == {soon.id: 5.0, mid.id: 2.0, late.id: 0.0}

    r = reserve(ledger, 4.0)
    assert isinstance(r, Reservation)
    assert (r.allowance_usd, dict(r.grant_holds)) == (0.0, {mid.id: 3.0, late.id: 1.0})
    s = ledger.settle(r, 4.0, 1, 1, "gpt-4o", "openai")
    assert dict(s.from_grants) == {mid.id: 3.0, late.id: 1.0}

    status = ledger.status(U, 10.0)
    assert status.spent_usd == 21.0 and status.remaining_usd == 4.0
    assert [(g.id, g.remaining_usd) for g in status.grants] == [(late.id, 4.0)]


def test_settle_over_estimate_overdraws_after_grants(ledger: Ledger) -> None:
    g = ledger.add_grant(U, 2.0, T0 + timedelta(hours=5), "small", "admin")
    r = reserve(ledger, 1.0)
    assert isinstance(r, Reservation)
    s = ledger.settle(r, 15.0, 1, 1, "gpt-4o", "openai")
    # 10 allowance + 2 grant + 3 overdraft, all recorded against the day
    assert (s.from_allowance_usd, dict(s.from_grants)) == (13.0, {g.id: 2.0})
    assert ledger.spent_today(U) == 15.0
    assert ledger.status(U, 10.0).remaining_usd == 0.0


def test_expired_grants_give_nothing(ledger: Ledger) -> None:
    g = ledger.add_grant(U, 5.0, T0 + timedelta(hours=1), "short", "admin@example.com")
    later = T0 + timedelta(hours=2)
    assert ledger.status(U, 10.0).remaining_usd == 15.0
    assert ledger.status(U, 10.0, now=later).remaining_usd == 10.0
    assert ledger.status(U, 10.0, now=later).grants == ()
    assert isinstance(reserve(ledger, 10.5, now=later), BudgetRefusal)
    [listed] = ledger.list_grants(U, now=later)
    assert (listed.id, listed.expired, listed.remaining_usd, listed.amount_usd) == (
        g.id,
        True,
        0.0,
        5.0,
    )
    assert ledger.list_grants(U, now=later, include_expired=False) == []
    assert listed.expires_at == T0 + timedelta(hours=1)
    assert (listed.reason, listed.actor, listed.created_at) == ("short", "admin@example.com", T0)


def test_grant_expiring_during_a_request_still_pays_for_it(ledger: Ledger) -> None:
    g = ledger.add_grant(U, 5.0, T0 + timedelta(hours=1), "short", "admin")
    r = reserve(ledger, 4.0, budget=0.0)
    assert isinstance(r, Reservation) and dict(r.grant_holds) == {g.id: 4.0}
    later = T0 + timedelta(hours=2)
    assert ledger.status(U, 0.0, now=later).remaining_usd == 0.0  # the held part is not debt
    s = ledger.settle(r, 4.0, 1, 1, "claude", "anthropic", now=later)
    assert (s.from_allowance_usd, dict(s.from_grants)) == (0.0, {g.id: 4.0})


def test_grant_holds_are_released(ledger: Ledger) -> None:
    g = ledger.add_grant(U, 5.0, T0 + timedelta(days=1), "bonus", "admin")
    r = reserve(ledger, 3.0, budget=0.0)
    assert isinstance(r, Reservation)
    assert [x.held_usd for x in ledger.list_grants(U)] == [3.0]
    assert ledger.status(U, 0.0).reserved_usd == 3.0
    ledger.release(r)
    [after] = ledger.list_grants(U)
    assert (after.id, after.held_usd, after.used_usd, after.remaining_usd) == (g.id, 0, 0, 5.0)


@pytest.mark.parametrize(
    ("amount", "expires", "error"),
    [
        (0.0, T0 + timedelta(days=1), "amount_usd"),
        (-1.0, T0 + timedelta(days=1), "amount_usd"),
        (1.0, T0 - timedelta(seconds=1), "future"),
        (1.0, datetime(2026, 6, 1), "time zone"),
    ],
)
def test_add_grant_validation(ledger: Ledger, amount: float, expires: datetime, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ledger.add_grant(U, amount, expires, "r", "a")


# -- days, usage, users ------------------------------------------------------------------------


def test_budget_day_is_utc_and_a_late_settle_lands_on_its_day(store: StateStore) -> None:
    evening = datetime(2026, 5, 17, 23, 59, 59, tzinfo=UTC)
    morning = datetime(2026, 5, 18, 0, 0, 5, tzinfo=UTC)
    ledger = Ledger(store, clock=fixed(evening))
    r = reserve(ledger, 9.0)
    assert isinstance(r, Reservation) and r.day == "2026-05-17"
    ledger.settle(r, 9.0, 1, 1, "gpt-4o", "openai", now=morning)
    assert ledger.spent_today(U, now=evening) == 9.0
    assert ledger.spent_today(U, now=morning) == 0.0
    assert ledger.status(U, 10.0, now=morning).remaining_usd == 10.0
    assert ledger.status(U, 10.0, now=morning).resets_at == "2026-05-19T00:00:00Z"
    assert ledger.usage(since="2026-05-18") == []
    assert [u.spend_usd for u in ledger.usage(since=evening, until=evening)] == [9.0]


def test_usage_and_leaderboard(store: StateStore) -> None:
    ledger = Ledger(store, clock=fixed(T0))
    rows = [
        ("alice", "research", "gpt-4o", "openai", 3.0, 100, 10, T0),
        ("alice", "research", "gpt-4o", "openai", 1.0, 50, 5, T0),
        ("alice", "ops", "claude", "anthropic-direct", 2.0, 20, 2, T0),
        ("bob", "ops", "gpt-4o", "openai", 0.5, 10, 1, T0 - timedelta(days=1)),
        ("carol", None, "llama3.2:3b", "ollama", 0.0, 7, 7, T0),
    ]
    for user, tenant, model, provider, cost, tin, tout, when in rows:
        r = ledger.reserve(user, tenant, 0.0, 10.0, "q", now=when)
        assert isinstance(r, Reservation)
        ledger.settle(r, cost, tin, tout, model, provider, now=when)

    usage = ledger.usage()
    assert [
        (u.model, u.provider, u.spend_usd, u.tokens_in, u.tokens_out, u.requests) for u in usage
    ] == [
        ("gpt-4o", "openai", 4.5, 160, 16, 3),
        ("claude", "anthropic-direct", 2.0, 20, 2, 1),
        ("llama3.2:3b", "ollama", 0.0, 7, 7, 1),
    ]
    assert [(u.model, u.spend_usd) for u in ledger.usage(user="alice")] == [
        ("gpt-4o", 4.0),
        ("claude", 2.0),
    ]
    assert [(u.model, u.spend_usd) for u in ledger.usage(tenant="ops")] == [
        ("claude", 2.0),
        ("gpt-4o", 0.5),
    ]
    assert [(u.model, u.spend_usd) for u in ledger.usage(since=T0, tenant="ops")] == [
        ("claude", 2.0)
    ]
    assert [(u.model, u.spend_usd) for u in ledger.usage(until="2026-05-16T23:00:00Z")] == [
        ("gpt-4o", 0.5)
    ]

    by_tenant = ledger.leaderboard(by="tenant")
    assert [(b.key, b.spend_usd, b.requests) for b in by_tenant] == [
        ("research", 4.0, 2),
        ("ops", 2.5, 2),
        (None, 0.0, 1),
    ]
    by_user = ledger.leaderboard(by="user", since=T0, limit=2)
    assert [(b.key, b.spend_usd, b.tokens_in, b.tokens_out) for b in by_user] == [
        ("alice", 6.0, 170, 17),
        ("carol", 0.0, 7, 7),
    ]
    with pytest.raises(ValueError):
        ledger.leaderboard(by="model")  # type: ignore[arg-type]


def test_deleted_user_keeps_spend_history(store: StateStore, ledger: Ledger) -> None:
    store.put_user(UserRecord(U, tenants=("research-team",), daily_budget_usd=20.0))
    g = ledger.add_grant(U, 5.0, T0 + timedelta(days=1), "bonus", "admin")
    spend(ledger, 2.0)
    assert store.delete_user(U, 0) is True
    assert store.get_user(U) is None
    assert [(u.model, u.spend_usd) for u in ledger.usage(user=U)] == [("gpt-4o", 2.0)]
    assert [b.key for b in ledger.leaderboard(by="user")] == [U]
    assert ledger.spent_today(U) == 2.0
    assert [x.id for x in ledger.list_grants(U)] == [g.id]


# -- exactness under concurrency ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "grant"),
    [pytest.param(0.7, 0.0, id="allowance"), pytest.param(0.4, 0.3, id="allowance+grant")],
)
def test_threads_never_overbook(backend: Any, budget: float, grant: float) -> None:
    store = backend.open()
    ledger = Ledger(store, clock=fixed(T0))
    if grant:
        ledger.add_grant(U, grant, T0 + timedelta(days=1), "bonus", "admin")
    results = race_threads(lambda: reserve(ledger, 0.1, budget))
    assert len(results) == 20
    assert sum(isinstance(r, Reservation) for r in results) == 7
    assert ledger.status(U, budget).remaining_usd == 0.0


def _reserve_on_a_user(store: StateStore, i: int) -> int:
    r = Ledger(store, clock=fixed(T0)).reserve(U, "t", 0.1, 0.7, f"req-{os.getpid()}")
    return isinstance(r, Reservation)


@pytest.mark.processes
def test_processes_never_overbook(backend: Any) -> None:
    assert race_processes(backend, _reserve_on_a_user) == (12, 7)


def test_store_failure_propagates(tmp_path: Any) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    ledger = Ledger(store, clock=fixed(T0))
    store.close()
    for op in (
        lambda: reserve(ledger, 1.0),
        lambda: ledger.status(U, 10.0),
        lambda: ledger.add_grant(U, 1.0, T0 + timedelta(days=1), "r", "a"),
    ):
        with pytest.raises(StoreUnavailable):
            op()


# -- tenant budgets and periods ----------------------------------------------------------------

MONTHLY = BudgetPeriod("monthly")


def team_reserve(ledger: Ledger, user: str, amount: float, tenant_budget: float | None = 1.0,
                 **kw: Any) -> Any:
    return ledger.reserve(
        user, "team", amount, 100.0, "req", tenant_budget_usd=tenant_budget,
        tenant_period=MONTHLY, **kw
    )


def test_tenant_budget_spans_its_users(ledger: Ledger) -> None:
    a = team_reserve(ledger, "a", 0.6)
    assert isinstance(a, Reservation) and a.tenant_hold_usd == 0.6
    refused = team_reserve(ledger, "b", 0.5)  # b has 100 of their own: the tenant refuses
    assert isinstance(refused, BudgetRefusal)
    assert (refused.scope, refused.period, refused.tenant) == ("tenant", "monthly", "team")
    assert refused.remaining_usd == pytest.approx(0.4) and refused.budget_usd == 1.0
    assert refused.resets_at == "2026-06-01T00:00:00Z"
    denial = refused.denial().payload()
    assert denial["scope"] == "tenant" and denial["tenant_id"] == "team"
    assert denial["period"] == "monthly" and denial["resets_at"] == "2026-06-01T00:00:00Z"
    assert "tenant 'team'" in denial["message"]
    assert isinstance(team_reserve(ledger, "b", 0.4), Reservation)
    # settling a under its estimate frees room for others of the tenant
    ledger.settle(a, 0.1, 1, 1, "m", "p")
    status = ledger.tenant_status("team", 1.0, MONTHLY)
    assert status.spent_usd == pytest.approx(0.1) and status.reserved_usd == pytest.approx(0.4)
    assert status.remaining_usd == pytest.approx(0.5)
    assert isinstance(team_reserve(ledger, "c", 0.5), Reservation)


def test_user_budget_is_judged_before_the_tenant(ledger: Ledger) -> None:
    r = ledger.reserve(U, "team", 5.0, 1.0, "req", tenant_budget_usd=0.5, tenant_period=MONTHLY)
    assert isinstance(r, BudgetRefusal) and r.scope == "user" and r.budget_usd == 1.0
    assert r.resets_at == TOMORROW and r.period == "daily"


def test_grants_lift_only_the_user_budget(ledger: Ledger) -> None:
    ledger.add_grant(U, 5.0, T0 + timedelta(days=1), "bonus", "admin")
    r = ledger.reserve(U, "team", 3.0, 1.0, "req", tenant_budget_usd=2.0, tenant_period=MONTHLY)
    assert isinstance(r, BudgetRefusal) and r.scope == "tenant"
    r = ledger.reserve(U, "team", 2.0, 1.0, "req", tenant_budget_usd=2.0, tenant_period=MONTHLY)
    assert isinstance(r, Reservation) and r.allowance_usd == 1.0
    assert sum(r.grant_holds.values()) == 1.0


def test_no_tenant_budget_counts_tenant_spend_all_the_same(ledger: Ledger) -> None:
    r = team_reserve(ledger, "a", 3.0, tenant_budget=None)
    assert isinstance(r, Reservation)
    ledger.settle(r, 2.0, 1, 1, "m", "p")
    # a budget set later in the period sees what was spent before it
    assert ledger.tenant_status("team", 2.5, MONTHLY).remaining_usd == pytest.approx(0.5)
    assert isinstance(team_reserve(ledger, "a", 0.6, tenant_budget=2.5), BudgetRefusal)


def test_weekly_user_budget_carries_over_days(store: StateStore) -> None:
    weekly = BudgetPeriod("weekly")
    monday = datetime(2026, 5, 11, 9, tzinfo=UTC)
    ledger = Ledger(store, clock=fixed(monday))
    r = ledger.reserve(U, None, 6.0, 10.0, "req", period=weekly)
    assert isinstance(r, Reservation) and r.day == "2026-05-11"
    ledger.settle(r, 6.0, 1, 1, "m", "p")
    sunday = datetime(2026, 5, 17, 23, tzinfo=UTC)
    refused = ledger.reserve(U, None, 5.0, 10.0, "req", now=sunday, period=weekly)
    assert isinstance(refused, BudgetRefusal)
    assert refused.period == "weekly" and refused.resets_at == "2026-05-18T00:00:00Z"
    assert refused.spent_usd == 6.0 and refused.remaining_usd == 4.0
    status = ledger.status(U, 10.0, sunday, weekly)
    assert status.remaining_usd == 4.0 and status.period_starts_at == "2026-05-11T00:00:00Z"
    # the next week starts afresh; spend history stays on its UTC day
    next_monday = datetime(2026, 5, 18, 0, 0, 1, tzinfo=UTC)
    assert isinstance(ledger.reserve(U, None, 10.0, 10.0, "r", now=next_monday, period=weekly),
                      Reservation)
    assert ledger.spent_today(U, monday) == 6.0


def _reserve_on_a_tenant(store: StateStore, i: int) -> int:
    # every thread its own user with room to spare: only the tenant's budget binds
    r = Ledger(store, clock=fixed(T0)).reserve(
        f"u{os.getpid()}-{i}", "team", 0.1, 5.0, "req",
        tenant_budget_usd=0.7, tenant_period=BudgetPeriod("monthly"),
    )
    return isinstance(r, Reservation)


@pytest.mark.processes
def test_processes_never_overbook_a_tenant(backend: Any) -> None:
    assert race_processes(backend, _reserve_on_a_tenant) == (12, 7)
    status = Ledger(backend.open(), clock=fixed(T0)).tenant_status(
        "team", 0.7, BudgetPeriod("monthly")
    )
    assert status.reserved_usd == pytest.approx(0.7) and status.remaining_usd == 0.0


# -- asynchronous jobs: recorded at creation, trued up once when their result is read ----------


def _job(ledger: Ledger, amount: float = 2.0, job_id: str = "resp_1") -> Reservation:
    """A job created under a reservation of `amount`, charged that amount (as a queued job is)."""
    r = reserve(ledger, amount, 10.0, model="gpt-4o", provider="openai")
    assert isinstance(r, Reservation)
    assert ledger.record_job(r, "openai", job_id, "gpt-4o", amount, 40, 0)
    assert ledger.settle(r, amount, 40, 0, "gpt-4o", "openai").applied
    return r


@pytest.mark.parametrize(
    ("real", "spent_after"),
    [
        pytest.param(0.5, 0.5, id="refund-the-difference"),
        pytest.param(3.5, 3.5, id="charge-the-extra"),
        pytest.param(2.0, 2.0, id="exactly-reserved"),
    ],
)
def test_true_up_corrects_the_charge_to_the_real_cost(
    ledger: Ledger, real: float, spent_after: float
) -> None:
    _job(ledger)
    assert ledger.status(U, 10.0).spent_usd == pytest.approx(2.0)
    t = ledger.true_up_job("openai", "resp_1", real, 100, 900)
    assert t is not None
    assert t.charged_usd == pytest.approx(2.0) and t.cost_usd == pytest.approx(real)
    assert t.adjustment_usd == pytest.approx(real - 2.0)
    assert t.job.user_id == U and t.job.tenant == "research-team" and t.job.model == "gpt-4o"
    assert t.job.request_id == "req-1"  # the creating request's span, from its reservation
    status = ledger.status(U, 10.0)
    assert status.spent_usd == pytest.approx(spent_after)
    assert status.remaining_usd == pytest.approx(10.0 - spent_after)
    # the tenant's row and the spend row (one request, the real tokens) follow
    assert ledger.tenant_status("research-team", 100.0).spent_usd == pytest.approx(spent_after)
    [row] = ledger.usage(user=U)
    assert (row.spend_usd, row.tokens_in, row.tokens_out, row.requests) == (
        pytest.approx(spent_after), 100, 900, 1,
    )
    job = ledger.job("openai", "resp_1")
    assert job is not None and job.trued_up_us is not None
    assert job.cost == round(real * 1e9)


def test_true_up_happens_once(ledger: Ledger) -> None:
    _job(ledger)
    assert ledger.true_up_job("openai", "resp_1", 0.5, 10, 10) is not None
    assert ledger.true_up_job("openai", "resp_1", 0.1, 10, 10) is None  # a second read: nothing
    assert ledger.status(U, 10.0).spent_usd == pytest.approx(0.5)
    assert ledger.true_up_job("openai", "unknown", 0.1, 1, 1) is None
    assert ledger.true_up_job("google", "resp_1", 0.1, 1, 1) is None  # jobs are per route


def test_a_job_is_recorded_once_and_only_under_a_known_reservation(ledger: Ledger) -> None:
    r = _job(ledger)
    assert not ledger.record_job(r, "openai", "resp_1", "gpt-4o", 9.0, 1, 1)  # known: unchanged
    job = ledger.job("openai", "resp_1")
    assert job is not None and job.charged == 2_000_000_000 and job.reservation_id == r.id
    ghost = Reservation("r_missing", U, None, 1.0, "2026-05-17", "req", "o", T0, 1.0)
    assert not ledger.record_job(ghost, "openai", "resp_2", "gpt-4o", 1.0, 1, 1)
    assert ledger.job("openai", "resp_2") is None


def test_a_job_never_read_stays_charged_its_reservation(ledger: Ledger) -> None:
    _job(ledger, 2.0)
    assert ledger.status(U, 10.0).spent_usd == pytest.approx(2.0)
    job = ledger.job("openai", "resp_1")
    assert job is not None and job.trued_up_us is None and job.cost is None


def test_concurrent_true_ups_apply_once(backend: Any) -> None:
    """Two readers (each its own store connection, as two workers) race: one true-up applies."""
    first = Ledger(backend.open(), clock=fixed(T0))
    _job(first, 2.0)
    ledgers = [Ledger(backend.open(), clock=fixed(T0)) for _ in range(4)]
    barrier = threading.Barrier(len(ledgers))
    results: list[Any] = []

    def read(ledger: Ledger) -> None:
        barrier.wait()
        results.append(ledger.true_up_job("openai", "resp_1", 0.25, 5, 5))

    threads = [threading.Thread(target=read, args=(lg,)) for lg in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert first.status(U, 10.0).spent_usd == pytest.approx(0.25)


def test_job_objects_keep_their_first_record(ledger: Ledger) -> None:
    rec = {"user_id": U, "tenant": "t", "models": ["gpt-4o"], "estimate_usd": 1.5}
    assert ledger.job_object("openai", "file:f1") is None
    assert ledger.record_job_object("openai", "file:f1", rec)
    assert not ledger.record_job_object("openai", "file:f1", {**rec, "user_id": "mallory"})
    assert ledger.job_object("openai", "file:f1") == rec
    assert ledger.job_object("google", "file:f1") is None  # per route


# -- API key budgets: a part of the user's, per the user's period, shared along a rotation ----

KEY = KeyBudget("k_new", "k_first", 1.0)  # a rotated key: its row is its first key's


def test_key_budget_refuses_while_its_user_has_room(ledger: Ledger) -> None:
    a = reserve(ledger, 0.6, key_budget=KEY)
    assert isinstance(a, Reservation) and a.key_hold_usd == 0.6 and a.key_budget == KEY
    refused = reserve(ledger, 0.5, key_budget=KEY)  # the user has 9.4 left: the key refuses
    assert isinstance(refused, BudgetRefusal)
    assert (refused.scope, refused.key_id, refused.period) == ("key", "k_new", "daily")
    assert refused.budget_usd == 1.0 and refused.remaining_usd == pytest.approx(0.4)
    assert refused.resets_at == TOMORROW  # the user's period
    denial = refused.denial().payload()
    assert denial["error"] == "budget_exceeded" and denial["scope"] == "key"
    assert denial["key_id"] == "k_new" and denial["resets_at"] == TOMORROW
    assert "API key 'k_new'" in denial["message"]
    # the same request without the key's budget fits: only the key refused
    assert isinstance(reserve(ledger, 0.5), Reservation)
    ledger.settle(a, 0.1, 1, 1, "m", "p")  # under its estimate: room again
    status = ledger.key_status(KEY)
    assert (status.spent_usd, status.remaining_usd) == (pytest.approx(0.1), pytest.approx(0.9))
    assert isinstance(reserve(ledger, 0.5, key_budget=KEY), Reservation)
    # every key of the chain draws on the same row
    other = KeyBudget("k_first", "k_first", 1.0)
    assert ledger.key_status(other).reserved_usd == pytest.approx(0.5)


def test_key_refusal_comes_after_the_user_and_tenant(ledger: Ledger) -> None:
    r = reserve(ledger, 5.0, budget=1.0, key_budget=KEY)
    assert isinstance(r, BudgetRefusal) and r.scope == "user"
    r = team_reserve(ledger, "a", 2.0, tenant_budget=1.0, key_budget=KeyBudget("k", "k", 0.5))
    assert isinstance(r, BudgetRefusal) and r.scope == "tenant"


def test_key_budget_follows_the_users_period(ledger: Ledger) -> None:
    weekly = BudgetPeriod("weekly")
    r = reserve(ledger, 0.8, key_budget=KEY, period=weekly)
    assert isinstance(r, Reservation)
    ledger.settle(r, 0.8, 1, 1, "m", "p")
    later = datetime(2026, 5, 17, 23, tzinfo=UTC)  # the same week
    refused = ledger.reserve(U, None, 0.3, 10.0, "req", now=later, period=weekly, key_budget=KEY)
    assert isinstance(refused, BudgetRefusal) and refused.scope == "key"
    assert refused.period == "weekly" and refused.resets_at == "2026-05-18T00:00:00Z"
    monday = datetime(2026, 5, 18, 0, 0, 1, tzinfo=UTC)
    assert isinstance(
        ledger.reserve(U, None, 0.3, 10.0, "req", now=monday, period=weekly, key_budget=KEY),
        Reservation,
    )


def _reserve_on_a_key(store: StateStore, i: int) -> int:
    # one user with room to spare, every thread its own key of one rotation chain (its own key
    # id, one budget row): only the key's budget binds
    key = KeyBudget(f"k_{os.getpid()}_{i}", "k_chain", 0.7)
    r = Ledger(store, clock=fixed(T0)).reserve(U, "team", 0.1, 50.0, "req", key_budget=key)
    return isinstance(r, Reservation)


@pytest.mark.processes
def test_processes_never_overbook_a_key(backend: Any) -> None:
    assert race_processes(backend, _reserve_on_a_key) == (12, 7)
    ledger = Ledger(backend.open(), clock=fixed(T0))
    status = ledger.key_status(KeyBudget("k", "k_chain", 0.7))
    assert status.reserved_usd == pytest.approx(0.7) and status.remaining_usd == 0.0
    assert ledger.status(U, 50.0).reserved_usd == pytest.approx(0.7)
