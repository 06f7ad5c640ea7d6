"""A write gate for SQLite files shared by threads and processes: queue, do not sleep.

Used by the state store and the audit ledger's writer, whose files several workers share.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

# Longest pause between two tries of another process's flock: a transaction holds it for tens of
# microseconds (the audit ledger's, a few hundred with its fsync).
MAX_PAUSE_S = 0.0002

# Which process this is, without a getpid() system call on every transaction (glibc no longer
# caches it): bumped in the child after each fork, so state inherited from a parent is redone.
_process_generation = 0


def _after_fork_in_child() -> None:
    global _process_generation
    _process_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def this_process() -> int:
    """A number that changes in a child after fork(): cheaper than getpid() per call."""
    return _process_generation


class WriteGate:
    """Write transactions queue here instead of in SQLite's lock.

    SQLite answers a writer that finds the lock taken by sleeping in its busy handler (1, 2, 5,
    10 ms ... steps): under load most of a request's time went to those sleeps. Writers of one
    process queue on a lock, woken the moment the holder is done; those of several processes
    (workers) take an flock of `<db>.lock`, tried again every 20 to 200 µs (flock cannot wait
    with a timeout, and a writer must give up after its timeout: fail closed). SQLite's own
    lock still guards against every other writer (the admin CLI, another tool).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(f"{path}.lock")
        self._pid = -1
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def _for_this_process(self) -> None:
        # after a fork the inherited descriptor shares the parent's flock: open our own
        if self._pid != this_process():
            self._thread_lock = threading.Lock()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = this_process()

    def acquire(self, timeout_s: float) -> bool:
        self._for_this_process()
        deadline = time.monotonic() + timeout_s
        if not self._thread_lock.acquire(timeout=timeout_s):
            return False
        assert self._fd is not None
        pause = 0.00002
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    self._thread_lock.release()
                    raise
            if time.monotonic() >= deadline:
                self._thread_lock.release()
                return False
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)

    def try_acquire(self) -> bool:
        """Take the gate only if it is free now, in this process and across processes."""
        self._for_this_process()
        if not self._thread_lock.acquire(blocking=False):
            return False
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            self._thread_lock.release()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        if self._fd is not None and self._pid == this_process():
            os.close(self._fd)
        self._fd = None
        self._pid = -1
