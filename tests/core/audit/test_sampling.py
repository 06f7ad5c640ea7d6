"""audit/sampling.py: a bounded rate of entries, and the count of those passed over."""

from __future__ import annotations

from candela_mitm.audit.sampling import Sampler


def test_a_burst_is_cut_at_the_rate_and_the_skipped_are_counted_on_the_next_entry():
    now = [0.0]
    s = Sampler(per_minute=3, clock=lambda: now[0])
    assert [s.take() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 20  # one token back (3 a minute)
    assert s.take() == 2 and s.take() is None
    now[0] += 600  # refilled, never past the burst
    assert [s.take() for _ in range(4)] == [1, 0, 0, None]


def test_a_million_refusals_in_a_minute_make_at_most_a_burst_and_the_rate():
    now = [0.0]
    s = Sampler(per_minute=60, clock=lambda: now[0])
    taken = 0
    for i in range(1_000_000):
        now[0] = i * 60 / 1_000_000
        taken += s.take() is not None
    assert taken <= 60 + 60 + 1  # the burst it started with, and a minute's refill
