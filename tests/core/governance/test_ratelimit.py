"""Rate limiter contract: a sliding minute, exact across threads and processes, both backends."""

from __future__ import annotations

import multiprocessing
import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from candela_mitm.errors import StoreUnavailable
from candela_mitm.governance.ratelimit import (
    Admission,
    RateDecision,
    RateLimiter,
    TokenLimits,
    policy_headers,
)
from candela_mitm.state import StateStore
from candela_mitm.state.ports import to_us
from candela_mitm.state.sqlite import SqliteStateStore
from tests.core.governance.races import race_processes, race_threads

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)  # on a minute boundary


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def limiter(store: StateStore) -> RateLimiter:
    return RateLimiter(store, clock=lambda: T0)


def test_no_double_burst_at_a_minute_boundary(limiter: RateLimiter) -> None:
    # five requests just before the minute turns ...
    assert all(limiter.check("u", 5, now=at(59.9)).allowed for _ in range(5))
    # ... leave nothing just after it: a fixed window would grant five more here
    assert not limiter.check("u", 5, now=at(60.1)).allowed
    assert not limiter.check("u", 5, now=at(119.8)).allowed
    # they leave the window exactly a minute after they were counted
    assert [limiter.check("u", 5, now=at(119.9)).allowed for _ in range(6)] == [True] * 5 + [False]


def test_remaining_and_retry_after(limiter: RateLimiter) -> None:
    decisions = [limiter.check("u", 3, now=at(t)) for t in (0, 10, 20)]
    assert [(d.allowed, d.remaining, d.retry_after_s) for d in decisions] == [
        (True, 2, 0),
        (True, 1, 0),
        (True, 0, 0),
    ]
    # while allowed, window_resets_at says when the oldest counted request frees its slot
    assert {d.window_resets_at for d in decisions} == {"2026-05-17T12:01:00Z"}

    denied = limiter.check("u", 3, now=at(30))
    assert denied == RateDecision(False, 3, 0, 30, to_us(T0) + 60_000_000)
    assert denied.window_resets_at == "2026-05-17T12:01:00Z"
    assert limiter.check("u", 3, now=at(59.5)).retry_after_s == 1  # rounded up
    assert limiter.check("u", 3, now=at(45.25)).retry_after_s == 15

    freed = limiter.check("u", 3, now=at(60))
    assert (freed.allowed, freed.remaining, freed.window_resets_at) == (
        True,
        0,
        "2026-05-17T12:01:10Z",
    )


def test_window_resets_at_rounds_up_to_the_second(limiter: RateLimiter) -> None:
    limiter.check("u", 1, now=at(0.25))
    denied = limiter.check("u", 1, now=at(1))
    assert (denied.window_resets_at, denied.retry_after_s) == ("2026-05-17T12:01:01Z", 60)


def test_denied_requests_consume_nothing(limiter: RateLimiter) -> None:
    assert limiter.check("u", 2, now=at(0)).allowed
    assert limiter.check("u", 2, now=at(30)).allowed
    for t in range(31, 60):
        assert not limiter.check("u", 2, now=at(t)).allowed
    after = limiter.check("u", 2, now=at(60))
    assert (after.allowed, after.remaining) == (True, 0)  # only the request at 0 has left


def test_users_have_their_own_windows(limiter: RateLimiter) -> None:
    assert limiter.check("alice", 1).allowed
    assert not limiter.check("alice", 1).allowed
    assert limiter.check("bob", 1).allowed


def test_limit_zero_admits_nothing(limiter: RateLimiter) -> None:
    d = limiter.check("u", 0)
    assert (d.allowed, d.limit, d.remaining, d.retry_after_s) == (False, 0, 0, 60)
    assert d.window_resets_at == "2026-05-17T12:01:00Z"
    assert limiter.check("u", 1).allowed  # and counted nothing


def test_negative_limit_is_an_error(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError):
        limiter.check("u", -1)


def test_denial_is_a_429_with_retry_after(limiter: RateLimiter) -> None:
    limiter.check("u", 1, now=at(0))
    denial = limiter.check("u", 1, now=at(20)).denial()
    assert (denial.status, denial.error, denial.headers) == (
        429,
        "rate_limited",
        {"Retry-After": "40"},
    )
    assert denial.payload()["limit"] == 1
    assert denial.payload()["window_resets_at"] == "2026-05-17T12:01:00Z"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sliding_window_is_exact(limiter: RateLimiter, seed: int) -> None:
    """Against a brute-force model: admit iff fewer than `limit` admitted in (t - 60 s, t]."""
    rng = random.Random(seed)
    limit = 4
    times = sorted(rng.uniform(0, 300) for _ in range(120))
    admitted: list[float] = []
    for t in times:
        t = round(t, 6)
        expected = sum(1 for a in admitted if a > t - 60) < limit
        assert limiter.check("u", limit, now=at(t)).allowed is expected, t
        if expected:
            admitted.append(t)
    # and so no 60-second span ever holds more than `limit`
    assert all(sum(1 for b in admitted if a <= b < a + 60) <= limit for a in admitted)
    assert len(admitted) > limit * 4  # the trace did span several windows


def test_threads_are_exact(backend: Any) -> None:
    limiter = RateLimiter(backend.open(), clock=lambda: T0)
    results = race_threads(lambda: limiter.check("u", 7).allowed)
    assert (len(results), sum(results)) == (20, 7)


def _ten_checks(store: StateStore, i: int) -> int:
    limiter = RateLimiter(store, clock=lambda: T0)
    return sum(limiter.check("u", 7).allowed for _ in range(10))


@pytest.mark.processes
def test_processes_are_exact(backend: Any) -> None:
    # one thread a process, ten checks each
    assert race_processes(backend, _ten_checks, per_process=1) == (2, 7)


def test_store_failure_propagates(tmp_path: Any) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    store.close()
    with pytest.raises(StoreUnavailable):
        RateLimiter(store).check("u", 10)


# -- tokens per minute and requests in flight ----------------------------------------------------

def test_token_limits_hold_every_kind_or_none(limiter: RateLimiter) -> None:
    limits = TokenLimits(input_tokens=100, total_tokens=150)
    a = Admission("u")
    decisions = limiter.admit_tokens(a, limits, 60, 50, now=at(0))
    assert [(d.kind, d.allowed, d.remaining) for d in decisions] == [
        ("input_tokens", True, 40),
        ("total_tokens", True, 40),
    ]
    b = Admission("u")
    [refused] = limiter.admit_tokens(b, limits, 30, 20, now=at(10))  # total 160 > 150
    assert (refused.kind, refused.allowed, refused.limit) == ("total_tokens", False, 150)
    assert refused.retry_after_s == 50 and refused.window_resets_at == "2026-05-17T12:01:00Z"
    assert b.token_entry is None  # nothing held
    denial = refused.denial().payload()
    assert denial["limit_kind"] == "total_tokens" and denial["retry_after_s"] == 50
    # a's real usage was 10 + 5: the rest of its estimate frees at once
    limiter.correct_tokens(a, 10, 5)
    assert all(d.allowed for d in limiter.admit_tokens(b, limits, 30, 20, now=at(11)))


def test_no_token_limits_hold_nothing(limiter: RateLimiter) -> None:
    a = Admission("u")
    assert limiter.admit_tokens(a, TokenLimits(), 10**9, 10**9) == []
    assert a.token_entry is None


def test_concurrency_leases(limiter: RateLimiter) -> None:
    a, b, c = Admission("u"), Admission("u"), Admission("u")
    assert limiter.acquire(a, 2, "host:1").allowed and limiter.acquire(b, 2, "host:1").allowed
    refused = limiter.acquire(c, 2, "host:1")
    assert (refused.allowed, refused.kind, refused.retry_after_s) == (False, "concurrency", 1)
    limiter.finish(a, None)
    assert a.lease_id is None and limiter.acquire(c, 2, "host:1").allowed
    assert not limiter.acquire(Admission("u"), 0, "host:1").allowed  # 0 admits nothing


def test_reconcile_frees_leases_of_dead_processes(limiter: RateLimiter) -> None:
    assert limiter.acquire(Admission("u"), 2, "host:dead").allowed
    assert limiter.acquire(Admission("u"), 2, "host:alive").allowed
    assert limiter.reconcile_leases(lambda owner: owner != "host:dead") == 1
    assert [x.owner for x in limiter.store.leases()] == ["host:alive"]


def test_policy_headers() -> None:
    now = to_us(T0)
    decisions = [
        RateDecision(True, 60, 59, 0, now + 30_500_000),
        RateDecision(True, 4, 3, 0, now, "concurrency"),
        RateDecision(True, 5000, 4000, 0, now + 60_000_000, "output_tokens"),
    ]
    assert policy_headers(decisions, now) == {
        "RateLimit-Policy": '"requests";q=60;w=60, "concurrency";q=4, "output_tokens";q=5000;w=60',
        "RateLimit": '"requests";r=59;t=31, "concurrency";r=3, "output_tokens";r=4000;t=60',
    }
    assert policy_headers([], now) == {}


def _admit_tokens(store: StateStore, i: int) -> int:
    limiter = RateLimiter(store, clock=lambda: T0)
    decisions = limiter.admit_tokens(Admission("u"), TokenLimits(total_tokens=700), 40, 60)
    return all(d.allowed for d in decisions)


@pytest.mark.processes
def test_processes_never_exceed_a_token_limit(backend: Any) -> None:
    assert race_processes(backend, _admit_tokens) == (12, 7)  # 7 x 100 tokens fit in 700


def test_a_tenant_token_limit_binds_its_users_together(limiter: RateLimiter) -> None:
    team = TokenLimits(output_tokens=100)
    a = Admission("a")
    decisions = limiter.admit_tokens(a, TokenLimits(), 0, 60, now=at(0), tenant="t",
                                     tenant_limits=team)
    assert [(d.scope, d.kind, d.remaining, d.name) for d in decisions] == [
        ("tenant", "output_tokens", 40, "tenant_output_tokens")
    ]
    # b has no limit of its own: the tenant's window refuses it, and holds nothing of it
    b = Admission("b")
    [refused] = limiter.admit_tokens(b, TokenLimits(total_tokens=10**6), 0, 60, now=at(1),
                                     tenant="t", tenant_limits=team)
    assert (refused.allowed, refused.scope, refused.kind) == (False, "tenant", "output_tokens")
    denial = refused.denial().payload()
    assert denial["scope"] == "tenant" and "for the tenant" in denial["message"]
    # another tenant is not affected; a's real usage frees the rest of its estimate
    assert limiter.admit_tokens(Admission("b"), TokenLimits(), 0, 60, now=at(2), tenant="u",
                                tenant_limits=team)[0].allowed
    limiter.correct_tokens(a, 0, 10)
    ok = limiter.admit_tokens(b, TokenLimits(total_tokens=10**6), 0, 60, now=at(3), tenant="t",
                              tenant_limits=team)
    assert [(d.scope, d.allowed) for d in ok] == [("user", True), ("tenant", True)]
    headers = policy_headers(ok, to_us(at(3)))
    assert headers["RateLimit-Policy"] == (
        '"total_tokens";q=1000000;w=60, "tenant_output_tokens";q=100;w=60'
    )


# -- requests in flight per tenant ---------------------------------------------------------------

def test_a_tenant_concurrency_limit_binds_its_users_together(limiter: RateLimiter) -> None:
    a, b, c = Admission("a"), Admission("b"), Admission("c")
    first = limiter.acquire_tenant(a, "t", 2, "host:1")
    assert (first.allowed, first.scope, first.kind, first.remaining, first.name) == (
        True, "tenant", "concurrency", 1, "tenant_concurrency"
    )
    assert limiter.acquire_tenant(b, "t", 2, "host:1").allowed
    refused = limiter.acquire_tenant(c, "t", 2, "host:2")  # another user, another process
    assert (refused.allowed, refused.scope, refused.retry_after_s) == (False, "tenant", 1)
    assert c.tenant_lease is None
    denial = refused.denial().payload()
    assert (denial["error"], denial["limit_kind"], denial["scope"]) == (
        "rate_limited", "concurrency", "tenant"
    )
    # another tenant, and a user whose id is the tenant's, keep their own places
    assert limiter.acquire_tenant(Admission("a"), "u", 1, "host:1").allowed
    assert limiter.acquire(Admission("t"), 1, "host:1").allowed
    limiter.finish(a, None)  # a request ended: its user's and tenant's places are free
    assert a.tenant_lease is None and limiter.acquire_tenant(c, "t", 2, "host:2").allowed
    assert not limiter.acquire_tenant(Admission("d"), "v", 0, "host:1").allowed  # 0: nothing


def test_release_gives_back_both_places(limiter: RateLimiter) -> None:
    a = Admission("a")
    assert limiter.acquire(a, 1, "host:1").allowed
    assert limiter.acquire_tenant(a, "t", 1, "host:1").allowed
    assert len(limiter.store.leases()) == 2
    limiter.release(a)
    assert limiter.store.leases() == []
    assert limiter.acquire(Admission("a"), 1, "host:1").allowed
    assert limiter.acquire_tenant(Admission("b"), "t", 1, "host:1").allowed


def test_reconcile_frees_tenant_leases_of_dead_processes(limiter: RateLimiter) -> None:
    assert limiter.acquire_tenant(Admission("a"), "t", 2, "host:dead").allowed
    assert limiter.acquire_tenant(Admission("b"), "t", 2, "host:alive").allowed
    assert not limiter.acquire_tenant(Admission("c"), "t", 2, "host:alive").allowed
    assert limiter.reconcile_leases(lambda owner: owner != "host:dead") == 1
    assert limiter.acquire_tenant(Admission("c"), "t", 2, "host:alive").allowed


def test_policy_headers_name_a_tenant_concurrency_limit() -> None:
    now = to_us(T0)
    decisions = [
        RateDecision(True, 4, 3, 0, now, "concurrency"),
        RateDecision(True, 10, 7, 0, now, "concurrency", "tenant"),
    ]
    assert policy_headers(decisions, now) == {
        "RateLimit-Policy": '"concurrency";q=4, "tenant_concurrency";q=10',
        "RateLimit": '"concurrency";r=3, "tenant_concurrency";r=7',
    }


def _hold_a_tenant_place(store: StateStore, i: int, inflight: Any, peak: Any) -> int:
    """Acquire the tenant's place, hold it a moment, give it back, again and again; `inflight`
    counts holders across every process, `peak` its maximum. How many times it held one."""
    limiter = RateLimiter(store)
    n = 0
    for _ in range(15):
        a = Admission(f"user-{i}")
        if not limiter.acquire_tenant(a, "t", 3, f"host:{i}").allowed:
            continue
        with inflight.get_lock():
            inflight.value += 1
            peak.value = max(peak.value, inflight.value)
        n += 1
        threading.Event().wait(0.002)
        with inflight.get_lock():
            inflight.value -= 1
        limiter.release(a)
    return n


@pytest.mark.processes
def test_processes_never_exceed_a_tenant_concurrency_limit(backend: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    inflight, peak = ctx.Value("i", 0), ctx.Value("i", 0)
    _, admitted = race_processes(
        backend, _hold_a_tenant_place, per_process=5, shared=(inflight, peak)
    )
    assert admitted > 3  # places were taken, given back and taken again
    assert 1 <= peak.value <= 3
