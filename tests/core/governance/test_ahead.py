"""Budget slices and rate leases asked ahead (governance/slices.py, governance/rate_leases.py):
under a steady pace, after warm-up, no request makes a store call of its own before it is
forwarded, and the store sees a small, counted number of calls per request. Counts, never
timings: the clocks are the test's, every store call goes through a counting wrapper."""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from candela_mitm.config import BudgetSlices, RateLimitLeases
from candela_mitm.governance.ledger import Ledger, Reservation
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.governance.rate_leases import LeaseRules, RateLeases, TakeAsk, next_block_size
from candela_mitm.governance.ratelimit import RateLimiter
from candela_mitm.governance.slices import Ask, SliceRules, Slices, next_size
from candela_mitm.state import StateStore
from candela_mitm.state.ports import US_PER_S, to_us, usd_to_nano

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)
U = "alice@example.com"
LIMIT = 100_000_000  # the bench's requests per minute
DAILY = BudgetPeriod("daily", "UTC")


class Counting:
    """The store, each method call counted by name (`path` marks the calls a request makes
    before it would be forwarded)."""

    def __init__(self, inner: StateStore) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()
        self.path = 0
        self.on_path = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def counted(*a: Any, **kw: Any) -> Any:
            self.calls[name] += 1
            if self.on_path:
                self.path += 1
            return attr(*a, **kw)

        return counted


class Clocks:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.t)

    def mono(self) -> float:
        return 100.0 + self.t


def take_block(leases: RateLeases, ask: TakeAsk) -> None:
    leases.took(ask, ask.take())


def take_slice(slices: Slices, ask: Ask) -> None:
    slices.took(ask, ask.reserve())


def drive(store: StateStore, pace: float, seconds: float, latency: int = 8,
          jitter: float = 0.0, holds: tuple[float, ...] = (0.001,)) -> tuple[
    Counting, list[int], list[int]
]:
    """`pace` requests a second for `seconds` of one user, each as RateLimit and Budget make
    it: a rate block's request else a check in the store, a hold carved from a slice else a
    reservation of its own; the asks (and the next ones, ahead) are run `latency` requests
    later (0: right after the request), as a background store call; spend settled at once, flushed every flush_s, blocks
    given back every lifetime / 2; `jitter`: each gap between requests varies by up to that
    fraction (seeded: the same every run); `holds`: each request's hold, in turn. Returns the counter, the store calls each request made
    before it would be forwarded, and the store calls made before each request (the last: at
    the end, the slices and blocks returned)."""
    c = Clocks()
    counting = Counting(store)
    ledger = Ledger(counting, clock=c.now)  # type: ignore[arg-type]
    limiter = RateLimiter(counting, clock=c.now)  # type: ignore[arg-type]
    srules = SliceRules.of(BudgetSlices())  # the defaults
    lrules = LeaseRules.of(RateLimitLeases())
    slices = Slices(ledger, srules, clock=c.now, monotonic=c.mono)
    leases = RateLeases(counting, lrules, clock=c.now)  # type: ignore[arg-type]
    pending: list[tuple[int, Callable[[], None]]] = []
    path: list[int] = []
    before_each: list[int] = []
    next_flush = srules.flush_s
    next_return = lrules.lifetime_s / 2
    n = int(pace * seconds)
    rnd = random.Random(21)
    for i in range(n):
        c.t = c.t + (1 + rnd.uniform(-jitter, jitter)) / pace if i else 0.0
        for due, run in [p for p in pending if p[0] <= i]:
            pending.remove((due, run))
            run()
        if c.t >= next_flush:
            slices.flush()
            next_flush += srules.flush_s
        if c.t >= next_return:
            leases.flush()
            next_return += lrules.lifetime_s / 2
        before_each.append(sum(counting.calls.values()))
        now_us = to_us(c.now())
        before = counting.path
        counting.on_path = True
        decision = leases.use(U, LIMIT, now_us)
        if decision is None:
            d = limiter.check(U, LIMIT)
            assert d.allowed
            ask = leases.ask(U, LIMIT, d)
        else:
            ask = leases.ask_next(U, LIMIT, now_us)
        if ask is not None:
            pending.append((i + latency, functools.partial(take_block, leases, ask)))
        k = slices.key_of(U, 1e6, DAILY, None, None, DAILY, None, c.now())
        hold = holds[i % len(holds)]
        res = slices.carve(k, hold, f"span-{i}")
        if res is None:
            got = ledger.reserve(U, None, hold, 1e6, f"span-{i}")
            assert isinstance(got, Reservation)
            res = got
            sask = slices.ask(res)
        else:
            sask = slices.ask_next(res)
        counting.on_path = False
        path.append(counting.path - before)
        if sask is not None:
            pending.append((i + latency, functools.partial(take_slice, slices, sask)))
        if not latency:  # answered at once (an idle user's next request comes seconds later)
            for due, run in [p for p in pending if p[0] <= i]:
                pending.remove((due, run))
                run()
        if res.slice:
            slices.settle(res, 0.0005, 10, 10, "gpt-4o", "openai")
        else:
            ledger.settle(res, 0.0005, 10, 10, "gpt-4o", "openai")
    c.t += 5
    for _, run in pending:
        run()
    slices.flush(everything=True)
    leases.flush(everything=True)
    status = ledger.status(U, 1e6)
    assert round(status.spent_usd, 6) == round(n * 0.0005, 6)  # every request's spend, once
    assert status.reserved_usd == 0 and slices.held() == 0 and leases.held() == 0
    before_each.append(sum(counting.calls.values()))
    return counting, path, before_each


@pytest.mark.parametrize(
    ("pace", "jitter"),
    [(100.0, 0.0), (800.0, 0.0), (100.0, 0.5)],  # one of the bench's 8 users; all of them
)
def test_steady_load_makes_no_store_call_on_the_path_after_warm_up(
    store: StateStore, pace: float, jitter: float
) -> None:
    counting, path, calls = drive(store, pace, seconds=10.0, jitter=jitter)
    n = len(path)
    warm = int(pace)  # the first second
    assert sum(path[:warm]) > 0  # the first requests reserve and check on their own
    assert sum(path[warm:]) == 0, [i for i, p in enumerate(path) if p and i >= warm][:10]
    # every store call after the first second (slices and blocks taken, spend recorded,
    # returns, the shutdown's too) per request: under 0.05 at the bench's pace per user (8
    # users, ~800 req/s together) and at all of it by one user
    steady = (calls[-1] - calls[warm]) / (n - warm)
    assert steady < 0.05, (steady, counting.calls)
    # today's defaults before this change made ~0.29 a request at the bench (bench/README.md)
    assert calls[-1] / n < 0.1, (calls[-1] / n, counting.calls)


@pytest.mark.parametrize(
    ("gap", "holds"), [(17.0, (0.001, 0.008, 0.032)), (22.0, (0.001, 0.004, 0.016))]
)
def test_an_idle_user_with_requests_of_varied_size_is_admitted_in_memory(
    store: StateStore, gap: float, holds: tuple[float, ...]
) -> None:
    """Scenario 3 as `make bench` runs it: a user's requests come ~17-22 s apart (± 10%), their
    max_tokens cycling 16, 128, 512 (holds growing 4 or 8 times each), asks answered before the
    next request, flushes between requests. From its fourth request on (its first of the
    largest size may find a slice sized before that size was seen), none makes a store call
    before it would be forwarded: the next rate block and slice are taken ahead, a
    block's stamp passing between two requests does not lose its pace, a slice taken ahead is
    asked again before it outlives MAX_AGE_S unused, and a slice holds the largest request
    seen lately, not only the one that asked."""
    counting, path, _ = drive(store, pace=1 / gap, seconds=gap * 30, latency=0, jitter=0.1,
                              holds=holds)
    assert len(path) == 30
    assert path[3:] == [0] * 27, (path, counting.calls)
    # a block of one a request at this pace (what its lifetime holds), none given back (blocks
    # of two gave one back each: 29 returns); the last at the end
    assert counting.calls["rate_take"] <= 30 and counting.calls["rate_return"] <= 2


def test_a_take_waits_a_quarter_of_the_users_gap_and_a_busy_users_none() -> None:
    from candela_mitm.governance.ahead import ASK_AFTER_MAX_S, ask_after

    assert ask_after(0.0) == ask_after(0.003) == 0.0  # a busy user's next request is near
    assert ask_after(0.4) == pytest.approx(0.1)
    assert ask_after(17.0) == ASK_AFTER_MAX_S == 0.5


@pytest.mark.parametrize(("pace", "after"), [(1 / 17, 0.5), (1000.0, 0.0)])
def test_the_asks_carry_how_long_their_take_may_wait(
    store: StateStore, pace: float, after: float
) -> None:
    """Every block and slice asked for an idle user (a request every 17 s) may wait 0.5 s before
    it is taken; a busy user's (1,000 a second) none."""
    seen: list[float] = []
    real_block, real_slice = take_block, take_slice

    def block(leases: RateLeases, ask: TakeAsk) -> None:
        seen.append(ask.after_s)
        real_block(leases, ask)

    def slice_(slices: Slices, ask: Ask) -> None:
        seen.append(ask.after_s)
        real_slice(slices, ask)

    globals()["take_block"], globals()["take_slice"] = block, slice_
    try:
        drive(store, pace=pace, seconds=30 / pace, latency=0)
    finally:
        globals()["take_block"], globals()["take_slice"] = real_block, real_slice
    assert len(seen) >= 2 and set(seen) == {after}, seen


def test_without_asking_ahead_requests_fall_back_to_the_store(store: StateStore) -> None:
    """The same pace with the asks ahead dropped (as before issue 21's follow-up): requests
    reserve and check on their own each time a slice or block runs out."""
    counting = Counting(store)
    c = Clocks()
    ledger = Ledger(counting, clock=c.now)  # type: ignore[arg-type]
    slices = Slices(ledger, SliceRules.of(BudgetSlices()), clock=c.now, monotonic=c.mono)
    fallbacks = 0
    for i in range(800):
        c.t = i / 800
        k = slices.key_of(U, 1e6, DAILY, None, None, DAILY, None, c.now())
        res = slices.carve(k, 0.001, f"span-{i}")
        if res is None:
            fallbacks += 1
            got = ledger.reserve(U, None, 0.001, 1e6, f"span-{i}")
            assert isinstance(got, Reservation)
            ask = slices.ask(got)
            if ask is not None:
                slices.took(ask, ask.reserve())
    assert fallbacks > 800 / 32  # one at least per slice of 32 holds


def test_next_sizes_follow_demand_within_the_caps() -> None:
    r = SliceRules(requests=32, headroom=8, max_requests=1024, demand_s=1.0)
    hold = usd_to_nano(0.001)
    assert next_size(r, hold, 800 * hold, 10**18) == 800 * hold  # a second of demand
    assert next_size(r, hold, 1 * hold, 10**18) == 32 * hold  # a slow user: `requests`
    assert next_size(r, hold, 10**6 * hold, 10**18) == 1024 * hold  # max_requests
    assert next_size(r, hold, 800 * hold, 80 * hold) == 10 * hold  # what is left / headroom
    assert next_size(r, hold, 800 * hold, 15 * hold) == 0  # near the end: none
    lr = LeaseRules(requests=32, headroom=4, lifetime_s=1.0, max_requests=1024, checks=1)
    assert next_block_size(lr, 800.0, 10**9) == 800  # a lifetime's demand
    assert next_block_size(lr, 1.0, 10**9) == 32
    assert next_block_size(lr, 10**6, 10**9) == 1024
    assert next_block_size(lr, 800.0, 400) == 100  # the room / headroom
    assert next_block_size(lr, 800.0, 7) == 0


def test_a_block_asked_ahead_waits_and_never_exceeds_the_limit(store: StateStore) -> None:
    """Two blocks of one user at once: the second is used once the first is spent, and the
    window never admits more than the limit."""
    c = Clocks()
    leases = RateLeases(store, LeaseRules(requests=8, headroom=2, lifetime_s=1.0, checks=1), clock=c.now)
    limiter = RateLimiter(store, clock=c.now)
    limit = 40
    admitted = 0
    for i in range(200):
        c.t = i * 0.01
        now_us = to_us(c.now())
        if leases.use(U, limit, now_us) is not None:
            admitted += 1
            ask = leases.ask_next(U, limit, now_us)
        else:
            d = limiter.check(U, limit)
            if not d.allowed:
                continue
            admitted += 1
            ask = leases.ask(U, limit, d)
        if ask is not None:
            leases.took(ask, ask.take())
    assert admitted <= limit  # 2 s of a 60-second window: never more than the limit
    leases.flush(everything=True)
    window = store.rate_take(U, 10**9, 0, 60 * US_PER_S, to_us(c.now()), to_us(c.now()))
    assert window.count == admitted  # what was not used given back


class Mono:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def sliced(store: StateStore, budget: float = 100.0) -> tuple[Ledger, Slices, Mono, Any]:
    """A slice of 10 holds of 1.0 taken (a budget reserving on its own twice)."""
    ledger = Ledger(store, clock=lambda: T0)
    mono = Mono()
    rules = SliceRules(requests=10, headroom=4, flush_s=0.05, idle_s=5.0, record_s=0.0)
    slices = Slices(ledger, rules, clock=lambda: T0, monotonic=mono)
    own = ledger.reserve(U, None, 1.0, budget, "span-own")
    assert isinstance(own, Reservation)
    ask = slices.ask(own) or slices.ask(own)
    assert ask is not None and slices.took(ask, ask.reserve())
    ledger.release(own)
    return ledger, slices, mono, slices.key_of(U, budget, DAILY, None, None, DAILY, None, T0)


def test_a_slice_asked_ahead_waits_until_the_one_in_use_is_spent(store: StateStore) -> None:
    ledger, slices, mono, k = sliced(store, budget=1000.0)
    held = []
    for i in range(7):
        r = slices.carve(k, 1.0, f"s{i}")
        assert r is not None
        held.append(r)
        assert slices.ask_next(r) is None  # more than a quarter of it free
    r = slices.carve(k, 1.0, "s7")  # 2 of 10 left: the next is asked
    assert r is not None
    held.append(r)
    ask = slices.ask_next(r)
    assert ask is not None and ask.ahead
    assert slices.ask_next(r) is None  # one ask in flight
    assert slices.took(ask, ask.reserve())
    assert ledger.status(U, 1000.0).reserved_usd == 10.0 + ask.amount_usd  # both held
    first = held[0].slice
    more = [slices.carve(k, 1.0, f"t{i}") for i in range(3)]
    assert [m.slice == first for m in more if m] == [True, True, False]  # spent, then the next
    for m in [*held, *more]:
        assert m is not None
        slices.settle(m, 0.5, 1, 1, "gpt-4o", "openai")
    slices.flush()
    assert slices.held() == 1  # the first returned once spent and settled
    slices.flush(everything=True)
    status = ledger.status(U, 1000.0)
    assert (status.spent_usd, status.reserved_usd) == (5.5, 0.0)


def test_a_slice_asked_ahead_near_the_end_is_returned_unused(store: StateStore) -> None:
    ledger, slices, mono, k = sliced(store, budget=100.0)
    held = [slices.carve(k, 1.0, f"s{i}") for i in range(8)]
    last = held[-1]
    assert last is not None
    ask = slices.ask_next(last)
    assert ask is not None  # sized on what was left beside the first: (100 - 1 - 10) / 4, 22
    # meanwhile another process spent most of the budget
    other = Ledger(store, clock=lambda: T0, owner="other-process")
    spent = other.reserve(U, None, 60.0, 100.0, "span-other")
    assert isinstance(spent, Reservation)
    other.settle(spent, 60.0, 1, 1, "gpt-4o", "openai")
    got = ask.reserve()
    # the store held it (30 were left beside the first), but that is not 4 such slices
    assert isinstance(got, Reservation) and got.amount_usd == 22.0
    assert slices.took(ask, got)
    held += [slices.carve(k, 1.0, "s8"), slices.carve(k, 1.0, "s9")]  # the first's last two
    assert slices.carve(k, 1.0, "s10") is None  # not the one taken near the end
    slices.flush()
    # the first is held while two of its requests are in flight; the one ahead returned
    assert ledger.status(U, 100.0).reserved_usd == 10.0
    for h in held:
        assert h is not None
        slices.release(h)
    slices.flush()
    assert ledger.status(U, 100.0).reserved_usd == 0 and slices.held() == 0


def test_a_slice_or_block_asked_before_an_admin_change_is_returned(store: StateStore) -> None:
    ledger, slices, mono, k = sliced(store, budget=1000.0)
    held = [slices.carve(k, 1.0, f"s{i}") for i in range(8)]
    assert held[-1] is not None
    ask = slices.ask_next(held[-1])
    assert ask is not None
    slices.retire_all()  # an admin change while the ask is in flight
    assert slices.took(ask, ask.reserve())
    assert slices.carve(k, 1.0, "late") is None
    for h in held:
        assert h is not None
        slices.release(h)
    slices.flush()
    assert slices.held() == 0 and ledger.status(U, 1000.0).reserved_usd == 0
    c = Clocks()
    leases = RateLeases(store, LeaseRules(requests=8, headroom=2, checks=1), clock=c.now)
    limiter = RateLimiter(store, clock=c.now)
    d = limiter.check(U, 1000)
    block = leases.ask(U, 1000, d)
    assert block is not None
    leases.retire_all()  # a reload while the block is being taken
    assert leases.took(block, block.take())
    assert leases.use(U, 1000, to_us(c.now())) is None
    assert leases.flush() == 8 and leases.held() == 0


def test_idle_users_rate_steps_make_no_store_call_after_their_second(store: StateStore) -> None:
    """Scenario 3's pattern with the default config: 24 users, 5 requests a second together,
    each user every ~5 s (gaps varying by a fifth, seeded), for 4 minutes; the asks run 8
    requests later (a background store call), blocks given back every half second. From each
    user's third request on, no rate step makes a store call before it would be forwarded (idle
    blocks, then the next asked ahead); the store sees a few calls per user a minute."""
    c = Clocks()
    counting = Counting(store)
    limiter = RateLimiter(counting, clock=c.now)  # type: ignore[arg-type]
    rules = LeaseRules.of(RateLimitLeases())
    leases = RateLeases(counting, rules, clock=c.now)  # type: ignore[arg-type]
    rnd = random.Random(3)
    users = [f"user-{i}" for i in range(24)]
    due = sorted((rnd.uniform(0, 5), u) for u in users)
    seen: Counter[str] = Counter()
    pending: list[tuple[int, TakeAsk]] = []
    late_path = requests = 0
    next_return = 0.5
    while due[0][0] < 240:
        t, u = due.pop(0)
        c.t = t
        for p in [p for p in pending if p[0] <= requests]:
            pending.remove(p)
            take_block(leases, p[1])
        while c.t >= next_return:
            leases.flush()
            next_return += 0.5
        now_us = to_us(c.now())
        before = counting.path
        counting.on_path = True
        if leases.use(u, 60, now_us) is not None:
            ask = leases.ask_next(u, 60, now_us)
        else:
            d = limiter.check(u, 60)
            assert d.allowed
            ask = leases.ask(u, 60, d)
        counting.on_path = False
        if ask is not None:
            pending.append((requests + 8, ask))
        if seen[u] >= 2:
            late_path += counting.path - before
        seen[u] += 1
        requests += 1
        due.append((t + 5 * (1 + rnd.uniform(-0.2, 0.2)), u))
        due.sort()
    for _, ask in pending:
        take_block(leases, ask)
    c.t += 31
    leases.flush(everything=True)
    assert requests > 1100 and leases.held() == 0
    assert late_path == 0
    # every store call, off the path after the second checks: 2 checks per user, then a take
    # per idle block of ~4 requests and a return for some (1,152 requests: 48 checks, 271
    # takes, 101 returns, 0.37 a request; every request was a check on the path before)
    calls = sum(counting.calls.values())
    assert counting.calls["rate_hit"] == 2 * len(users)
    assert calls / requests < 0.5, counting.calls
