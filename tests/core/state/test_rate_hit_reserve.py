"""The state contract of rate_hit_reserve (an idle request's admission in one call: the rate step,
then the reservation), on SQLite, Redis and memory; on Redis one script, one round trip."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from candela_mitm.state.memory import MemoryStateStore
from candela_mitm.state.ports import (
    US_PER_S,
    GrantRow,
    NewReservation,
    StateStore,
    StoreUnreachable,
)
from candela_mitm.state.redis import RedisStateStore
from tests.conftest import RedisServer, StoreBackend

W = 60 * US_PER_S
T = 1_000 * US_PER_S
DAY = "2026-05-17"


def ask(rid: str, amount: int, now_us: int, **kw: object) -> NewReservation:
    """A reservation of user u under tenant t (its budget 10,000 nano-dollars a day)."""
    base = NewReservation(rid, "u", "t", DAY, amount, 10_000, "req-" + rid, "host:1", now_us)
    return replace(base, **kw)


def twin(backend: StoreBackend, tmp_path: Path) -> StateStore:
    """A second store of the backend, empty: the two-step path runs there, beside the fold."""
    if backend.name == "memory":
        return MemoryStateStore()
    if backend.name == "sqlite":
        other = StoreBackend(
            "sqlite", backend.cfg.model_copy(update={"sqlite_path": str(tmp_path / "twin.db")})
        )
    else:
        other = StoreBackend("redis", backend.cfg, prefix=f"candela-twin-{uuid.uuid4().hex[:12]}:")
    store = other.open()
    backend.opened.append(store)  # closed with the backend's
    return store


# (what each step asks: its reservation's amount and extra budgets) -> a tour of every answer
STEPS = [
    ("r1", 3_000, {}),  # admitted and reserved on the allowance
    ("r2", 20_000, {}),  # the user's budget refuses (after the rate step counted it)
    ("r3", 2_000, {"tenant_budget": 1_000, "tenant_period": DAY}),  # the tenant's refuses
    ("r4", 2_000, {"key_id": "k1", "key_budget": 500, "key_period": DAY}),  # the key's refuses
    ("r5", 9_000, {"tenant_budget": 50_000, "tenant_period": DAY,  # allowance, then the grant
                   "key_id": "k1", "key_budget": 50_000, "key_period": DAY}),
    ("r6", 1, {}),  # the rate step refuses: the limit (5) is reached, nothing is reserved
    ("r7", 1, {}),
]


def grant(store: StateStore) -> None:
    store.add_grant(GrantRow("g1", "u", 5_000, 0, 0, T + 3600 * US_PER_S, "why", "admin", T))


def test_it_answers_as_the_rate_step_then_the_reservation(
    backend: StoreBackend, store: StateStore, tmp_path: Path
) -> None:
    two = twin(backend, tmp_path)
    for s in (store, two):
        grant(s)
    for i, (rid, amount, kw) in enumerate(STEPS):
        now = T + i * 1_000
        new = ask(rid, amount, now, **kw)
        hit, result = store.rate_hit_reserve("u", 5, W, now, new)
        want_hit = two.rate_hit("u", 5, W, now)
        want = two.reserve(new) if want_hit.allowed else None
        assert (hit, result) == (want_hit, want), rid
    # every answer was met: reserved (one with a grant's hold), refused by each scope, rate refused
    answers = [store.rate_hit_reserve("u", 5, W, T + 10_000, ask("r8", 1, T + 10_000))]
    assert answers[0][1] is None and not answers[0][0].allowed
    for s in (store, two):
        assert [r.reservation_id for r in s.active_reservations()] == ["r1", "r5"]
        assert s.day_totals("u", DAY).reserved == 10_000  # r1's 3,000 and r5's 7,000
        assert [g.held for g in s.grants("u")] == [2_000]  # r5's rest, on the grant
        assert s.tenant_totals("t", DAY).reserved == 9_000
        assert s.key_totals("k1", DAY).reserved == 9_000


def test_a_budget_refusal_leaves_the_request_counted(store: StateStore) -> None:
    hit, result = store.rate_hit_reserve("u", 2, W, T, ask("r1", 50_000, T))
    assert hit.allowed and hit.count == 1
    assert result is not None and not result.ok and result.scope == "user"
    hit, result = store.rate_hit_reserve("u", 2, W, T + 1, ask("r2", 1, T + 1))
    assert hit.allowed and hit.count == 2 and result is not None and result.ok
    hit, result = store.rate_hit_reserve("u", 2, W, T + 2, ask("r3", 1, T + 2))
    assert (hit.allowed, hit.count, hit.oldest_us, result) == (False, 2, T, None)
    assert [r.reservation_id for r in store.active_reservations()] == ["r2"]
    # the window forgets them as rate_hit's does
    assert store.rate_hit("u", 2, W, T + W + 1).allowed


# -- Redis: one script, one round trip ---------------------------------------------------------


@pytest.fixture
def own_redis(
    redis_server_factory: Callable[[], RedisServer],
) -> Iterator[tuple[RedisStateStore, redis.Redis]]:
    """A store on a redis-server of this test's own (its command counts are this test's), and
    a plain client of the same server."""
    server = redis_server_factory()
    store = RedisStateStore(server.url, prefix="c:")
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield store, client
    client.close()
    store.close()


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def loaded(store: RedisStateStore) -> None:
    """The scripts loaded, as in a running proxy (a fresh server's first EVALSHA of each is
    refused NOSCRIPT, then loaded and sent again)."""
    store.rate_hit_reserve("warm", 5, W, T, ask("warm-1", 1, T, user_id="warm"))
    store.rate_hit("warm", 5, W, T)
    store.reserve(ask("warm-2", 1, T, user_id="warm"))


def test_on_redis_it_is_one_evalsha(own_redis: tuple[RedisStateStore, redis.Redis]) -> None:
    store, client = own_redis
    loaded(store)
    before = evalsha_calls(client)
    hit, result = store.rate_hit_reserve("u", 5, W, T, ask("r1", 3_000, T))
    assert hit.allowed and result is not None and result.ok
    assert evalsha_calls(client) - before == 1
    before = evalsha_calls(client)
    hit = store.rate_hit("u", 5, W, T + 1)
    store.reserve(ask("r2", 1_000, T + 1))
    assert evalsha_calls(client) - before == 2  # what it replaces: two
    # the keys of the two scripts in turn, as they would have written them
    assert client.zcard("c:rate:u") == 2
    assert client.hget("c:res:r1", "status") == "active"
    assert client.hget("c:day:u:" + DAY, "reserved") == "4000"


def test_on_redis_a_rate_refusal_writes_no_reservation(
    own_redis: tuple[RedisStateStore, redis.Redis],
) -> None:
    store, client = own_redis
    loaded(store)
    assert store.rate_hit_reserve("u", 1, W, T, ask("r1", 1, T))[1] is not None
    before = evalsha_calls(client)
    hit, result = store.rate_hit_reserve("u", 1, W, T + 1, ask("r2", 1, T + 1))
    assert not hit.allowed and result is None
    assert evalsha_calls(client) - before == 1
    assert not client.exists("c:res:r2")
    assert client.zscore("c:active", "r2") is None
    assert client.zcard("c:rate:u") == 1  # a refused request is not counted


def test_on_redis_it_runs_again_after_a_script_flush(
    own_redis: tuple[RedisStateStore, redis.Redis],
) -> None:
    """A restarted or flushed Redis has forgotten the script: EVALSHA answers NOSCRIPT and the
    script is loaded again, once (a reserve cannot have run: NOSCRIPT runs nothing)."""
    store, client = own_redis
    assert store.rate_hit_reserve("u", 5, W, T, ask("r1", 1_000, T))[1] is not None
    client.script_flush()
    hit, result = store.rate_hit_reserve("u", 5, W, T + 1, ask("r2", 1_000, T + 1))
    assert hit.allowed and hit.count == 2 and result is not None and result.ok
    assert client.hget("c:day:u:" + DAY, "reserved") == "2000"  # held once, not twice
    assert [r.reservation_id for r in store.active_reservations()] == ["r1", "r2"]


# -- Redis: the same script awaited on the event loop (redis-py's asyncio client) ---------------


def test_on_the_loop_it_answers_as_the_thread_does(redis_url: str) -> None:
    loop_store = RedisStateStore(redis_url, prefix=f"c-loop-{uuid.uuid4().hex[:8]}:")
    thread_store = RedisStateStore(redis_url, prefix=f"c-thread-{uuid.uuid4().hex[:8]}:")
    try:
        for s in (loop_store, thread_store):
            grant(s)

        async def steps() -> list[object]:
            out = []
            for i, (rid, amount, kw) in enumerate(STEPS):
                now = T + i * 1_000
                out.append(await loop_store.rate_hit_reserve_async("u", 5, W, now, ask(rid, amount, now, **kw)))
            return out

        got = asyncio.run(steps())
        want = [
            thread_store.rate_hit_reserve("u", 5, W, T + i * 1_000, ask(rid, amount, T + i * 1_000, **kw))
            for i, (rid, amount, kw) in enumerate(STEPS)
        ]
        assert got == want
        assert [r[1] is None for r in got] == [False] * 5 + [True] * 2
        for s in (loop_store, thread_store):
            assert [r.reservation_id for r in s.active_reservations()] == ["r1", "r5"]
    finally:
        loop_store.close()
        thread_store.close()


def test_on_the_loop_it_runs_again_after_a_script_flush(
    own_redis: tuple[RedisStateStore, redis.Redis],
) -> None:
    store, client = own_redis

    async def two() -> None:
        first = await store.rate_hit_reserve_async("u", 5, W, T, ask("r1", 1_000, T))
        assert first[1] is not None and first[1].ok
        client.script_flush()
        hit, result = await store.rate_hit_reserve_async("u", 5, W, T + 1, ask("r2", 1_000, T + 1))
        assert hit.count == 2 and result is not None and result.ok

    asyncio.run(two())
    assert client.hget("c:day:u:" + DAY, "reserved") == "2000"
    # a loop of its own (a test's next asyncio.run, a forked worker's): a client of its own
    asyncio.run(store.rate_hit_reserve_async("u", 5, W, T + 2, ask("r3", 1_000, T + 2)))
    assert client.hget("c:day:u:" + DAY, "reserved") == "3000"


def test_on_the_loop_a_refused_connection_is_unreachable(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    store = RedisStateStore(server.url, prefix="c:")
    server.stop()
    with pytest.raises(StoreUnreachable):
        asyncio.run(store.rate_hit_reserve_async("u", 5, W, T, ask("r1", 1, T)))
    store.close()
