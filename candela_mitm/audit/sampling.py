"""Sampling: refusals of unknown callers reach the append-only ledger at a bounded rate, the rest counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Sampler:
    """A token bucket of `per_minute` entries (bursts up to that many): `take()` says whether
    this one is recorded and, if so, how many were passed over since the last one recorded
    (written on that entry, so the ledger says how many it does not hold)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.tokens = float(per_minute)
        self.at = clock()
        self.skipped = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None: not recorded (counted as skipped); else the number skipped before this one."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.per_minute, self.tokens + (now - self.at) * self.per_minute / 60)
            self.at = now
            if self.tokens < 1:
                self.skipped += 1
                return None
            self.tokens -= 1
            skipped, self.skipped = self.skipped, 0
            return skipped
