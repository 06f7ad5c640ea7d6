"""Span timestamps: RFC 3339 UTC to the millisecond, cached per second without going stale."""

from datetime import UTC, datetime

import pytest

from candela_mitm.observability import spans


@pytest.mark.parametrize(
    "ns, expected",
    [
        (1_779_019_200_000_000_000, "2026-05-17T12:00:00.000Z"),
        (1_779_019_200_999_999_999, "2026-05-17T12:00:00.999Z"),  # truncated, never rounded up
        (1_779_019_201_000_500_000, "2026-05-17T12:00:01.000Z"),  # the next second: re-formatted
        (1_779_019_200_123_456_789, "2026-05-17T12:00:00.123Z"),  # and back (a clock step)
    ],
)
def test_utc_now_iso(monkeypatch, ns, expected):
    monkeypatch.setattr(spans.time, "time_ns", lambda: ns)
    assert spans.utc_now_iso() == expected
    # what it replaced: datetime's isoformat to the millisecond
    moment = datetime.fromtimestamp(ns // 1000 / 1e6, UTC)
    assert expected == moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_recent_spans_of_one_user_are_the_newest_of_theirs():
    from candela_mitm.observability.spans import Span, SpanStore, traces_payload

    store = SpanStore(capacity=10)
    for i in range(6):
        store.add(Span(f"s{i}", "t", None, "2026-01-01T00:00:00Z", user="a" if i % 2 else "b"))
    assert [s.span_id for s in store.recent(2, "a")] == ["s5", "s3"]
    assert [s.span_id for s in store.recent(10, "b")] == ["s4", "s2", "s0"]
    assert [s.span_id for s in store.recent(3)] == ["s5", "s4", "s3"]
    assert traces_payload(store, "50", "nobody") == {"spans": [], "count": 0}


def test_ids_are_random_hex_each_handed_out_once() -> None:
    """Trace and span ids come from os.urandom read 4 KiB at a time: each is fresh, across a
    read's end too."""
    from candela_mitm.observability.spans import new_span_id, new_trace_id

    spans = [new_span_id() for _ in range(2000)]  # past several 4 KiB reads
    traces = [new_trace_id() for _ in range(600)]
    assert all(len(s) == 16 and int(s, 16) >= 0 for s in spans)
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in traces)
    assert len(set(spans)) == len(spans) and len(set(traces)) == len(traces)


def test_a_forked_child_never_hands_out_its_parents_ids() -> None:
    """The bytes read ahead are forgotten in a forked child (workers fork): otherwise parent
    and child would give the next requests the same ids."""
    from candela_mitm.observability.spans import new_span_id
    from tests.forking import in_a_fork

    new_span_id()  # bytes read ahead in the parent
    _, child = in_a_fork(new_span_id)  # the child's next id
    assert len(child) == 16 and child != new_span_id()
