"""Host refusals into the audit trail: the host guard's ring buffer read by one proxy per host."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from candela_mitm.enforcement.host import STATE_PATH, joined

log = logging.getLogger("candela.enforce")

EVENTS_LOCK = "/run/candela/enforce-events.lock"  # held by the one proxy reading the refusals


class RefusalFeed:
    """The host guard's refusals into the audit trail: a thread of the proxy reads the pinned ring
    buffer and records each as a `bypass_attempt` entry (enforcement="host"), from which
    candela_bypass_attempts_total is counted.

    One reader per host (a ring buffer has one consumer position): the feed holding an flock on
    `lock_path` reads; the others (workers, a second proxy) wait and take over when it exits.
    Refusals made while no proxy reads wait in the ring buffer, as many as fit. An entry the
    audit writer does not accept is counted in `lost` and logged: the kernel refused the
    connection all the same.
    """

    def __init__(
        self,
        record: Callable[..., bool],
        *,
        pin_dir: str | None = None,
        lock_path: str = EVENTS_LOCK,
        poll_ms: int = 200,
        retry_s: float = 1.0,
    ) -> None:
        self.record = record
        self.pin_dir = pin_dir
        self.lock_path = lock_path
        self.poll_ms = poll_ms
        self.retry_s = retry_s  # how often a waiting feed tries the lock again
        self.recorded = 0
        self.lost = 0
        self.reading = threading.Event()  # set while this feed holds the lock and reads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="candela-refusals", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain what the ring buffer holds into the audit writer, then stop (before it closes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _lock(self) -> int | None:
        Path(self.lock_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _run(self) -> None:
        from candela_mitm.ebpf import host

        while not self._stop.is_set():
            try:
                fd = self._lock()
            except OSError as e:
                log.warning("host refusals: cannot take %s: %s", self.lock_path, e)
                fd = None
            if fd is None:
                self._stop.wait(self.retry_s)
                continue
            try:
                with host.PinnedEvents(self.pin_dir or host.PIN_DIR) as events:
                    self.reading.set()
                    while not self._stop.is_set():
                        self._audit(events.poll(self.poll_ms))
                    self._audit(events.poll(0))
            except Exception as e:  # reading fails open: the kernel refuses all the same
                log.warning("host refusals: reading the ring buffer failed: %s", e)
                self._stop.wait(self.retry_s)
            finally:
                self.reading.clear()
                os.close(fd)  # releases the lock

    def _audit(self, events: Sequence[Any]) -> None:
        from candela_mitm.enforcement.bypass import audit_record

        for ev in events:
            action, fields = audit_record(ev, enforcement="host")
            if self.record(action, **fields):
                self.recorded += 1
            else:
                self.lost += 1
                log.error(
                    "host refusal not audited (the audit queue refused it): %s", ev.describe()
                )


def start_refusal_feed(
    record: Callable[..., bool], state_path: str = STATE_PATH
) -> RefusalFeed | None:
    """A running RefusalFeed when host enforcement is on and this process is in Candela's cgroup
    (started with --enforce host or `candela enforce exec`); None otherwise."""
    if not joined(state_path=state_path):
        return None
    feed = RefusalFeed(record)
    feed.start()
    return feed
