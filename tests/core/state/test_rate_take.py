"""The state contract of rate_take and rate_return (rate leases), on SQLite, Redis and memory;
on Redis, the window key's TTL covers its entry stamped furthest ahead."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from candela_mitm.state.ports import US_PER_S, NewReservation, StateStore
from candela_mitm.state.redis import RedisStateStore

W = 60 * US_PER_S
T = 1_000 * US_PER_S
IDLE = 30 * US_PER_S  # an idle block's lifetime (governance/rate_leases.py)


def test_a_lease_takes_what_the_window_has_room_for(store: StateStore) -> None:
    for i in range(3):
        assert store.rate_hit("u", 10, W, T + i).allowed
    got = store.rate_take("u", 10, 5, W, T + 10, T + 10 + US_PER_S)
    assert (got.granted, got.count, got.oldest_us) == (5, 8, T)
    got = store.rate_take("u", 10, 5, W, T + 20, T + 20 + US_PER_S)
    assert (got.granted, got.count) == (2, 10)  # only what is left
    assert store.rate_take("u", 10, 5, W, T + 30, T + 30 + US_PER_S).granted == 0
    assert not store.rate_hit("u", 10, W, T + 40).allowed
    # the leased entries count until their stamp + the window, past the plain ones'
    later = T + 3 + W
    assert store.rate_hit("u", 10, W, later).allowed  # the three plain ones have left
    assert store.rate_hit("u", 10, W, later + 1).allowed
    assert store.rate_hit("u", 10, W, later + 2).allowed
    assert not store.rate_hit("u", 10, W, later + 3).allowed
    assert store.rate_hit("u", 10, W, T + 10 + US_PER_S + W).allowed  # the first lease's left


def test_an_unused_part_is_returned(store: StateStore) -> None:
    stamp = T + US_PER_S
    assert store.rate_take("u", 4, 4, W, T, stamp).granted == 4
    assert not store.rate_hit("u", 4, W, T + 1).allowed
    assert store.rate_return("u", stamp, 3) == 3
    assert store.rate_return("u", stamp + 1, 3) == 0  # another stamp: not this lease's
    assert store.rate_hit("u", 4, W, T + 2).allowed
    assert store.rate_hit("u", 4, W, T + 3).allowed
    assert store.rate_hit("u", 4, W, T + 4).allowed
    assert not store.rate_hit("u", 4, W, T + 5).allowed
    assert store.rate_return("u", stamp, 5) == 1  # no more than it holds
    assert store.rate_return("nobody", stamp, 1) == 0
    got = store.rate_take("u", 4, 9, W, T + 6, stamp)
    assert (got.granted, got.count) == (1, 4)


def test_keys_are_apart(store: StateStore) -> None:
    assert store.rate_take("a", 3, 3, W, T, T + 1).granted == 3
    assert store.rate_take("b", 3, 3, W, T, T + 1).granted == 3
    assert store.rate_return("a", T + 1, 3) == 3
    assert not store.rate_hit("b", 3, W, T + 2).allowed


def count(store: StateStore, key: str, now_us: int) -> int:
    return store.rate_take(key, 10**9, 0, W, now_us, now_us).count


def test_a_block_stamped_far_ahead_counts_until_its_stamp_and_the_window(
    store: StateStore,
) -> None:
    """An idle block's entries (stamped 30 s ahead) count in the window until their stamp + the
    window, through plain checks in between: pruning goes by now - window, not by their take."""
    stamp = T + IDLE
    assert store.rate_take("u", 10, 3, W, T, stamp).granted == 3
    for i in range(3):  # plain checks after the take
        assert store.rate_hit("u", 10, W, T + (i + 1) * US_PER_S).count == 4 + i
    late = T + 10 * US_PER_S + W  # every plain one has left the window; the block's have not
    assert count(store, "u", late) == 3
    assert store.rate_hit("u", 4, W, late).allowed  # 3 + 1
    assert not store.rate_hit("u", 4, W, late + 1).allowed
    assert count(store, "u", stamp + W - 1) == 4  # the block's 3 and the check at `late`
    assert count(store, "u", stamp + W) == 1  # at stamp + window they leave
    assert store.rate_return("u", stamp, 3) == 0  # gone already: nothing to give back


def test_a_return_leaves_a_far_stamped_blocks_used_part(store: StateStore) -> None:
    stamp = T + IDLE
    assert store.rate_take("u", 10, 5, W, T, stamp).granted == 5
    assert store.rate_hit("u", 10, W, T + 1).count == 6
    assert store.rate_return("u", stamp, 2) == 2  # after the stamp: 3 were used
    assert count(store, "u", stamp + 1) == 4
    assert count(store, "u", T + 1 + W) == 3  # the plain one has left, the used part counts
    assert count(store, "u", stamp + W) == 0


# -- Redis: the window key's TTL ----------------------------------------------------------------


@pytest.fixture
def on_redis(redis_url: str) -> Iterator[tuple[RedisStateStore, redis.Redis]]:
    store = RedisStateStore(redis_url, prefix=f"c-ttl-{uuid.uuid4().hex[:12]}:")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield store, client
    client.close()
    store.close()


def needs_ms(newest_us: int, now_us: int) -> int:
    """What the key must live, from a check at now_us, for its newest entry to count."""
    return (newest_us + W - now_us) // 1000


def test_on_redis_no_script_shortens_the_ttl_below_a_far_stamped_block(
    on_redis: tuple[RedisStateStore, redis.Redis],
) -> None:
    store, client = on_redis
    key = store.prefix + "rate:u"
    stamp = T + IDLE
    assert store.rate_take("u", 10, 3, W, T, stamp).granted == 3
    assert client.pttl(key) >= needs_ms(stamp, T) - 1000  # (what the call itself took)
    for i in range(1, 4):  # plain checks: each one's TTL would be the window + 1 s alone
        now = T + i * US_PER_S
        assert store.rate_hit("u", 10, W, now).count == 3 + i
        assert client.pttl(key) >= needs_ms(stamp, now) > W // 1000 + 1000
    now = T + 5 * US_PER_S
    new = NewReservation("r1", "u", "t", "2026-05-17", 1, 10_000, "req-r1", "host:1", now)
    hit, _ = store.rate_hit_reserve("u", 10, W, now, new)  # the same text, embedded
    assert hit.allowed and hit.count == 7
    assert client.pttl(key) >= needs_ms(stamp, now)
    now = T + 6 * US_PER_S
    assert count(store, "u", now) == 7  # a read (a take of none) does not shorten it either
    assert client.pttl(key) >= needs_ms(stamp, now)
    assert client.pttl(key) <= needs_ms(stamp, now) + 1000  # nor keeps it longer than needed
    assert client.zcard(key) == 7


def test_on_redis_a_plain_window_key_lives_a_second_past_the_window(
    on_redis: tuple[RedisStateStore, redis.Redis],
) -> None:
    store, client = on_redis
    key = store.prefix + "rate:p"
    assert store.rate_hit("p", 10, W, T).allowed
    assert W // 1000 < client.pttl(key) <= W // 1000 + 1000
    assert store.rate_return("p", T, 1) == 1
    assert client.exists(key) == 0  # emptied: gone
    assert not store.rate_hit("p", 0, W, T).allowed  # a refusal on no key leaves none
    assert client.exists(key) == 0
