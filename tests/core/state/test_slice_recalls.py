"""The state contract of slice recall marks (a refused budget asks the processes holding slices
of it to return them: governance/slices.py), on SQLite, Redis and memory."""

from __future__ import annotations

import threading

from candela_mitm.state.ports import RECALLS_KEPT, SliceRecall, StateStore


def test_marks_are_numbered_in_order_and_read_past_a_number(store: StateStore) -> None:
    assert store.slice_recalls(0) == (0, [])  # none ever made
    assert store.recall_slices("user", "alice@example.com", 10) == 1
    assert store.recall_slices("tenant", "t|odd:name", 20) == 2
    assert store.slice_recalls(0) == (2, [
        SliceRecall(1, "user", "alice@example.com", 10),
        SliceRecall(2, "tenant", "t|odd:name", 20),
    ])
    assert store.slice_recalls(1) == (2, [SliceRecall(2, "tenant", "t|odd:name", 20)])
    assert store.slice_recalls(2) == (2, [])
    assert store.slice_recalls(5) == (2, [])  # past the newest: nothing


def test_only_the_newest_marks_are_kept(store: StateStore) -> None:
    for i in range(RECALLS_KEPT + 10):
        store.recall_slices("user", f"u{i}", i)
    newest, marks = store.slice_recalls(0)
    assert newest == RECALLS_KEPT + 10
    assert [m.seq for m in marks] == list(range(11, RECALLS_KEPT + 11))  # the oldest dropped
    assert store.slice_recalls(newest - 1)[1] == [
        SliceRecall(newest, "user", f"u{RECALLS_KEPT + 9}", RECALLS_KEPT + 9)
    ]


def test_marks_made_at_once_get_distinct_numbers(store: StateStore) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def mark(i: int) -> None:
        for j in range(20):
            n = store.recall_slices("user", f"u{i}-{j}", j)
            with lock:
                got.append(n)

    threads = [threading.Thread(target=mark, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == list(range(1, 81))
    newest, marks = store.slice_recalls(0)
    assert newest == 80 and [m.seq for m in marks] == list(range(1, 81))
