"""Rate leases (governance/rate_leases.py) over every state store backend: take, use, return,
expiry, the near-limit fallback, and never more than the limit under concurrency."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from candela_mitm.governance.rate_leases import LeaseRules, RateLeases, block_size
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
    two checks within a block's lifetime take one."""
    clock = Clock()
    limiter = RateLimiter(store, clock=clock)
    leases = RateLeases(store, LeaseRules(requests=8, headroom=4, lifetime_s=1.0), clock=clock)
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
