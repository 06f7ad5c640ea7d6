"""The state contract of rate_take and rate_return (rate leases), on SQLite, Redis and memory."""

from __future__ import annotations

from candela_mitm.state.ports import US_PER_S, StateStore

W = 60 * US_PER_S
T = 1_000 * US_PER_S


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
