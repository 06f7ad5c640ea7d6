"""Rate leases (governance/rate_leases.py) over every state store backend: take, use, return,
expiry, the near-limit fallback, and never more than the limit under concurrency."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from candela_mitm.governance.rate_leases import (
    LeaseRules,
    RateLeases,
    block_size,
    idle_block_size,
)
from candela_mitm.governance.ratelimit import RateDecision, RateLimiter
from candela_mitm.state import StateStore
from candela_mitm.state.ports import US_PER_S, to_us
from tests.core.governance.races import hammer_processes

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)
RULES = LeaseRules(requests=8, headroom=4, lifetime_s=1.0, checks=1)  # a block at once
W = 60 * US_PER_S


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    @property
    def us(self) -> int:
        return to_us(self.now)


def count(store: StateStore, user: str, now_us: int) -> int:
    return store.rate_take(user, 10**9, 0, W, now_us, now_us).count


@pytest.mark.parametrize(("room", "n"), [(100, 8), (20, 5), (8, 2), (7, 0), (0, 0)])
def test_block_size(room: int, n: int) -> None:
    assert block_size(RULES, room) == n


def checked(limiter: RateLimiter, leases: RateLeases, user: str, limit: int,
            clock: Clock) -> bool:
    """One request as RateLimit admits it: from the block, else checked in the store (which
    may ask for a block)."""
    if leases.use(user, limit, clock.us) is not None:
        return True
    d = limiter.check(user, limit, now=clock())
    if d.allowed:
        ask = leases.ask(user, limit, d)
        if ask is not None:
            leases.took(ask, ask.take())
    return d.allowed


def test_take_use_expire_and_return(store: StateStore) -> None:
    clock = Clock()
    limiter = RateLimiter(store, clock=clock)
    leases = RateLeases(store, RULES, clock=clock)
    assert leases.use("u", 100, clock.us) is None
    assert checked(limiter, leases, "u", 100, clock)  # in the store; a block of 8 taken
    assert count(store, "u", clock.us) == 9
    for i in range(8):
        d = leases.use("u", 100, clock.us)
        assert d is not None and d.allowed and d.remaining == 100 - 9 + 8 - (i + 1)
    assert leases.use("u", 100, clock.us) is None  # used up: the next is checked in the store
    assert checked(limiter, leases, "u", 100, clock)  # and takes a new block
    assert count(store, "u", clock.us) == 18
    assert leases.use("u", 100, clock.us) is not None
    clock.now += timedelta(seconds=1.5)  # past its stamp: not used any more
    assert leases.use("u", 100, clock.us) is None
    assert leases.flush() == 7  # its unused part given back
    assert count(store, "u", clock.us) == 11  # 1 + 8 + 1 + 1: what was admitted
    assert leases.held() == 0


def test_a_changed_limit_drops_the_block_and_shutdown_returns_all(store: StateStore) -> None:
    clock = Clock()
    limiter = RateLimiter(store, clock=clock)
    leases = RateLeases(store, RULES, clock=clock)
    assert checked(limiter, leases, "u", 100, clock)
    assert leases.use("u", 50, clock.us) is None  # another limit: checked in the store
    assert leases.flush() == 8
    assert checked(limiter, leases, "v", 100, clock)
    assert leases.flush(everything=True) == 8
    assert count(store, "u", clock.us) == 1 and count(store, "v", clock.us) == 1
    assert not leases.due()


def test_near_the_limit_every_request_is_checked_in_the_store(store: StateStore) -> None:
    clock = Clock()
    limiter = RateLimiter(store, clock=clock)
    leases = RateLeases(store, RULES, clock=clock)
    admitted = sum(checked(limiter, leases, "u", 20, clock) for _ in range(30))
    assert admitted == 20
    assert count(store, "u", clock.us) == 20
    leases.flush(everything=True)
    assert count(store, "u", clock.us) == 20  # every block was used: nothing given back
    # a window with room for fewer than two blocks' worth is never leased
    assert leases.ask("w", 20, RateDecision(True, 20, 7, 0, 0)) is None
    assert leases.ask("w", 20, RateDecision(False, 20, 100, 1, 0)) is None


def test_a_dead_processs_block_ages_out_and_is_never_overused(store: StateStore) -> None:
    clock = Clock()
    limiter = RateLimiter(store, clock=clock)
    dead = RateLeases(store, RULES, clock=clock)
    assert checked(limiter, dead, "u", 20, clock)  # a block of 4 (room 19 / 4), then it dies
    assert count(store, "u", clock.us) == 5
    mine = RateLeases(store, RULES, clock=clock)
    assert sum(checked(limiter, mine, "u", 20, clock) for _ in range(30)) == 15
    clock.now += timedelta(seconds=62)  # past its stamp + the window
    assert checked(limiter, mine, "u", 20, clock)
    assert count(store, "u", clock.us) <= 20


def test_disabled_takes_and_uses_none(store: StateStore) -> None:
    clock = Clock()
    limiter = RateLimiter(store, clock=clock)
    leases = RateLeases(store, RULES, clock=clock)
    assert checked(limiter, leases, "u", 100, clock)
    leases.rules = LeaseRules(enabled=False)
    assert leases.use("u", 100, clock.us) is None
    assert leases.ask("u", 100, RateDecision(True, 100, 90, 0, 0)) is None
    assert leases.flush() == 8


LIMIT = 150


def hammer(store: StateStore, n: int, out: list[tuple[int, int]]) -> None:
    limiter = RateLimiter(store)
    leases = RateLeases(store, LeaseRules(requests=8, headroom=4, lifetime_s=0.05, checks=1))
    admitted = leased = 0
    for _ in range(n):
        now = datetime.now(UTC)
        if leases.use("u", LIMIT, to_us(now)) is not None:
            admitted += 1
            leased += 1
            continue
        d = limiter.check("u", LIMIT, now=now)
        if d.allowed:
            admitted += 1
            ask = leases.ask("u", LIMIT, d)
            if ask is not None:
                leases.took(ask, ask.take())
        leases.flush()
    leases.flush(everything=True)
    out.append((admitted, leased))


def test_threads_never_pass_the_limit_and_the_window_counts_each_request_once(
    store: StateStore,
) -> None:
    out: list[tuple[int, int]] = []
    workers = [threading.Thread(target=hammer, args=(store, 80, out)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    admitted = sum(a for a, _ in out)
    assert sum(x for _, x in out) > 0  # blocks were used
    assert admitted <= LIMIT  # all within one minute: never more than the limit
    assert count(store, "u", to_us(datetime.now(UTC))) == admitted  # unused parts given back


def _hammered(store: StateStore, n: int) -> tuple[int, int]:
    out: list[tuple[int, int]] = []
    hammer(store, n, out)
    return out[0]


@pytest.mark.processes
def test_processes_never_pass_the_limit(backend: Any) -> None:
    out = hammer_processes(backend, _hammered, 80)
    admitted = sum(a for a, _ in out)
    assert sum(x for _, x in out) > 0
    assert admitted <= LIMIT
    assert count(backend.open(), "u", to_us(datetime.now(UTC))) == admitted


def test_a_block_is_taken_for_a_user_checked_twice_within_its_lifetime(store: StateStore) -> None:
    """The default (`checks` 2): a user who sends one request every few seconds is checked in
    the store each time, with no block taken and given back for each (two more store calls);
    two checks within a block's lifetime take one. (Idle blocks off: with them, two checks
    within an idle block's lifetime take an idle one, below.)"""
    clock = Clock()
    limiter = RateLimiter(store, clock=clock)
    leases = RateLeases(
        store, LeaseRules(requests=8, headroom=4, lifetime_s=1.0, idle_lifetime_s=0), clock=clock
    )
    takes = 0
    for _ in range(5):  # one request every 3 s
        assert checked(limiter, leases, "slow", 100, clock)
        takes += leases.held()
        clock.now += timedelta(seconds=3)
    assert takes == 0 and count(store, "slow", clock.us) == 5  # each one checked, no block
    assert checked(limiter, leases, "slow", 100, clock)  # 3 s after the last: no block
    assert leases.held() == 0
    clock.now += timedelta(milliseconds=500)
    assert checked(limiter, leases, "slow", 100, clock)  # within 1 s of the last: a block
    assert leases.held() == 1  # one block
    assert leases.use("slow", 100, clock.us) is not None  # the next one from it



# -- idle blocks: a user checked twice within an idle block's lifetime ---------------------------

IDLE = LeaseRules(requests=32, headroom=4, lifetime_s=1.0, idle_lifetime_s=30.0)  # checks: 2


class Proc:
    """One process's rate step as RateLimit makes it: a request from its block (then the next
    block asked ahead), else checked in the store (then a block asked); the asks' store calls
    made at once, the unused parts given back (flush) before each request."""

    def __init__(self, store: StateStore, rules: LeaseRules, clock: Clock) -> None:
        self.clock = clock
        self.limiter = RateLimiter(store, clock=clock)
        self.leases = RateLeases(store, rules, clock=clock)
        self.checks = self.from_block = 0
        self.given_back = 0
        self.lifetimes: list[int] = []  # each block's lifetime, as asked

    def request(self, user: str, limit: int) -> bool:
        self.given_back += self.leases.flush()
        now_us = self.clock.us
        if self.leases.use(user, limit, now_us) is not None:
            self.from_block += 1
            self._take(self.leases.ask_next(user, limit, now_us))
            return True
        self.checks += 1
        d = self.limiter.check(user, limit, now=self.clock())
        if d.allowed:
            self._take(self.leases.ask(user, limit, d))
        return d.allowed

    def _take(self, ask: Any) -> None:
        if ask is not None:
            self.lifetimes.append(ask.lifetime_us)
            self.leases.took(ask, ask.take())


def in_window(times: list[int], now_us: int) -> int:
    """Requests admitted in the 60 seconds up to now."""
    return sum(1 for t in times if now_us - W < t <= now_us)


@pytest.mark.parametrize(("want", "room", "n"), [(5.4, 100, 5), (0.3, 100, 1), (90, 1000, 32),
                                                 (5.4, 12, 3), (5.4, 7, 0), (0.9, 8, 1),
                                                 (0.9, 7, 0)])
def test_idle_block_size(want: float, room: int, n: int) -> None:
    assert idle_block_size(IDLE, want, room) == n


def test_an_idle_users_requests_come_from_blocks_after_the_second_check(
    store: StateStore,
) -> None:
    """One request every 5 s (the bench's idle users): the first two are checked in the store,
    the second takes an idle block (5: nine tenths of the 6 its pace asks in 30 s), and every
    later one is admitted from a block, the next asked when the one in use is spent. The window
    never counts fewer than the requests admitted in the last minute; it over-counts by at most
    three blocks (the rest of the one in use, the one waiting; the requests of those taken up
    to 30 s before the minute)."""
    clock = Clock()
    p = Proc(store, IDLE, clock)
    admitted: list[int] = []
    over = []
    for i in range(60):  # 5 minutes
        assert p.request("idle", 100)
        admitted.append(clock.us)
        counted = count(store, "idle", clock.us)
        assert counted >= in_window(admitted, clock.us)  # never under-counts
        over.append(counted - in_window(admitted, clock.us))
        if i == 1:
            assert p.leases.held() == 1  # the second check took a block
        clock.now += timedelta(seconds=5)
    assert p.checks == 2 and p.from_block == 58
    assert set(p.lifetimes) == {30 * US_PER_S}  # idle blocks only
    assert max(over) <= 3 * 5, over
    assert p.given_back == 0  # each one spent before its stamp
    clock.now += timedelta(seconds=31)
    p.given_back += p.leases.flush()
    assert p.leases.held() == 0
    # the rest of the last one (asked when the one before was spent) was given back
    assert count(store, "idle", clock.us) >= in_window(admitted, clock.us)


def test_the_rest_of_an_idle_block_is_given_back_after_its_stamp(store: StateStore) -> None:
    clock = Clock()
    p = Proc(store, IDLE, clock)
    assert p.request("u", 100)
    clock.now += timedelta(seconds=5)
    assert p.request("u", 100)  # checked in the store: an idle block of 5, stamped 30 s ahead
    assert count(store, "u", clock.us) == 7
    clock.now += timedelta(seconds=5)
    assert p.request("u", 100) and p.from_block == 1  # then the user goes quiet
    clock.now += timedelta(seconds=24)  # 29 s after the take: not past its stamp
    assert p.leases.flush() == 0 and p.leases.held() == 1
    assert p.leases.use("u", 100, clock.us) is not None  # still usable
    clock.now += timedelta(seconds=2)  # past it: not used, and its 3 unused given back
    assert p.leases.use("u", 100, clock.us) is None
    assert p.leases.flush() == 3
    assert p.leases.held() == 0
    assert count(store, "u", clock.us) == 4  # the 4 admitted, each counted once


def test_near_the_limit_no_idle_block_every_request_is_checked(store: StateStore) -> None:
    """Room for fewer than `headroom` blocks of two: no idle block, exact checks in the store."""
    clock = Clock()
    p = Proc(store, IDLE, clock)
    admitted = []
    for _ in range(24):  # 2 minutes, one every 5 s: 12 a minute against a limit of 9
        if p.request("u", 9):
            admitted.append(clock.us)
        assert in_window(admitted, clock.us) <= 9
        clock.now += timedelta(seconds=5)
    assert p.from_block == 0 and p.leases.held() == 0 and p.checks == 24
    assert len(admitted) == 18  # 9 in each minute, exactly
    # with more room: a block, never more than the room / headroom (12 - 2 left: 2 of 5)
    q = Proc(store, IDLE, clock)
    assert q.request("v", 12)
    clock.now += timedelta(seconds=5)
    assert q.request("v", 12)
    assert count(store, "v", clock.us) == 4


def test_two_processes_idle_blocks_never_admit_past_the_limit(store: StateStore) -> None:
    """Two lease managers on one store, one user, each process one request every 2.5 s (idle
    for each: their blocks are idle ones), together past the limit: no 60 s span admits more
    than the limit, and the window never counts fewer than were admitted in it."""
    clock = Clock()
    procs = [Proc(store, IDLE, clock), Proc(store, IDLE, clock)]
    limit = 30
    admitted: list[int] = []
    for i in range(480):  # 10 minutes: 48 requests a minute asked against 30
        clock.now = T0 + timedelta(seconds=1.25 * i)
        if procs[i % 2].request("u", limit):
            admitted.append(clock.us)
            assert in_window(admitted, clock.us) <= limit
        assert count(store, "u", clock.us) >= in_window(admitted, clock.us)
    assert all(p.from_block > 0 for p in procs)  # both admitted from idle blocks
    assert 30 * US_PER_S in procs[0].lifetimes and 30 * US_PER_S in procs[1].lifetimes
    assert len(admitted) >= 10 * limit * 2 // 3  # blocks over-count, not by much
    for p in procs:
        p.leases.flush(everything=True)
    assert count(store, "u", clock.us) >= in_window(admitted, clock.us)


def test_a_busy_user_goes_from_an_idle_block_to_one_second_blocks(store: StateStore) -> None:
    """The idle block in use is spent first; the one-second block asked ahead of its end waits
    for it (no block given back unused), then the one-second blocks carry the busy pace, and
    once it is idle again an idle block."""
    clock = Clock()
    p = Proc(store, IDLE, clock)
    admitted = []

    def request() -> None:
        assert p.request("u", 10_000)
        admitted.append(clock.us)
        assert count(store, "u", clock.us) >= in_window(admitted, clock.us)

    request()
    clock.now += timedelta(seconds=5)
    request()  # an idle block of 5
    for i in range(300):  # 30 s at 10 a second
        clock.now += timedelta(milliseconds=100)
        request()
        if i == 5:  # the idle block spent, the one-second block asked ahead of it in use
            assert p.given_back == 0 and p.lifetimes == [30 * US_PER_S, US_PER_S]
            assert p.checks == 2 and p.from_block == 6
    assert set(p.lifetimes[1:]) == {US_PER_S}  # then one-second blocks
    assert p.checks == 2  # each one asked ahead of the one in use's end
    for _ in range(10):  # then one every 5 s
        clock.now += timedelta(seconds=5)
        request()
    assert p.lifetimes[-1] == 30 * US_PER_S  # idle again
    assert p.checks <= 4
    p.leases.flush(everything=True)
    assert count(store, "u", clock.us) >= in_window(admitted, clock.us)


def idle_hammer(store: StateStore, n: int, out: list[tuple[int, int]]) -> None:
    """Real time: a request every 20 ms, twice a block's lifetime (10 ms): idle blocks (0.5 s),
    then blocks asked ahead as the pace asks."""
    rules = LeaseRules(requests=8, headroom=2, lifetime_s=0.01, idle_lifetime_s=0.5)
    limiter = RateLimiter(store)
    leases = RateLeases(store, rules)
    admitted = leased = 0
    for _ in range(n):
        time.sleep(0.02)
        now = datetime.now(UTC)
        ask = None
        if leases.use("u", LIMIT_IDLE, to_us(now)) is not None:
            admitted += 1
            leased += 1
            ask = leases.ask_next("u", LIMIT_IDLE, to_us(now))
        else:
            d = limiter.check("u", LIMIT_IDLE, now=now)
            if d.allowed:
                admitted += 1
                ask = leases.ask("u", LIMIT_IDLE, d)
        if ask is not None:
            leases.took(ask, ask.take())
        leases.flush()
    leases.flush(everything=True)
    out.append((admitted, leased))


LIMIT_IDLE = 60


def _idle_hammered(store: StateStore, n: int) -> tuple[int, int]:
    out: list[tuple[int, int]] = []
    idle_hammer(store, n, out)
    return out[0]


@pytest.mark.processes
def test_processes_with_idle_blocks_never_pass_the_limit(backend: Any) -> None:
    out = hammer_processes(backend, _idle_hammered, 40)  # 3 x 40 in ~1 s against 60
    admitted = sum(a for a, _ in out)
    assert sum(x for _, x in out) > 0  # blocks were used
    assert admitted <= LIMIT_IDLE
    assert count(backend.open(), "u", to_us(datetime.now(UTC))) == admitted
