"""enforcement/refusals.py: the host guard's refusals audited, one reader per host."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from candela_mitm.enforcement import refusals as enforce


class FakePinnedEvents:
    """host.PinnedEvents over a shared list: poll takes what is there."""

    queue: list[object] = []
    opened = 0

    def __init__(self, pin_dir: str) -> None:
        FakePinnedEvents.opened += 1

    def poll(self, timeout_ms: int = 100) -> list[object]:
        out, FakePinnedEvents.queue[:] = list(FakePinnedEvents.queue), []
        if not out:
            time.sleep(timeout_ms / 1000)
        return out

    def __enter__(self) -> FakePinnedEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _event(reason: int, tgid: int) -> object:
    from candela_mitm.enforcement.bypass import BypassEvent
    from tests.core.enforcement.test_bypass import raw_event

    return BypassEvent.from_bytes(raw_event(reason=reason, tgid=tgid, comm=b"cdl-probe"))


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_refusal_feed_audits_each_event_and_only_one_feed_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from candela_mitm.ebpf import host

    monkeypatch.setattr(host, "PinnedEvents", FakePinnedEvents)
    FakePinnedEvents.queue = []
    recorded: list[tuple[str, dict[str, object]]] = []

    def record(action: str, **fields: object) -> bool:
        recorded.append((action, fields))
        return len(recorded) != 3  # the third entry is refused by the audit queue

    lock = str(tmp_path / "run" / "events.lock")
    first = enforce.RefusalFeed(record, lock_path=lock, poll_ms=10, retry_s=0.02)
    second = enforce.RefusalFeed(record, lock_path=lock, poll_ms=10, retry_s=0.02)
    first.start()
    try:
        assert first.reading.wait(3)
        second.start()
        FakePinnedEvents.queue += [_event(5, 100), _event(2, 101)]
        assert _wait(lambda: len(recorded) == 2)
        assert [(a, f["reason"], f["tgid"], f["comm"], f["enforcement"]) for a, f in recorded] == [
            ("bypass_attempt", "provider_port", 100, "cdl-probe", "host"),
            ("bypass_attempt", "udp_port", 101, "cdl-probe", "host"),
        ]
        assert not second.reading.is_set()  # one consumer of the ring buffer per host
        first.stop()
        assert second.reading.wait(3)  # the waiting one takes over
        FakePinnedEvents.queue += [_event(6, 102), _event(7, 103)]
        assert _wait(lambda: len(recorded) == 4)
        assert (second.recorded, second.lost) == (1, 1)
        assert (first.recorded, first.lost) == (2, 0)
    finally:
        first.stop()
        second.stop()
    assert not second.reading.is_set()
