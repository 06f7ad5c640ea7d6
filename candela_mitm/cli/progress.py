"""Progress: one line on stderr, rewritten in place, while long CLI work runs; nothing when piped.

A few lines rather than a library: the line is only drawn when stderr is a terminal (so logs,
pipes and CI output stay clean), redrawn at most every `interval_s`, and erased at the end so
the command's own last line (`ok: ...`, `exported ...`) is what stays on screen.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

ERASE = "\r\x1b[K"  # carriage return, then clear to the end of the line


def wanted(stream: TextIO) -> bool:
    """A terminal that can redraw a line, unless CANDELA_PROGRESS=0 says otherwise."""
    if os.environ.get("CANDELA_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class Progress:
    """`with Progress("verify", "entries") as p: work(progress=p.update)`."""

    def __init__(
        self,
        label: str,
        unit: str,
        stream: TextIO | None = None,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = wanted(self.stream)
        self.interval_s = interval_s
        self.clock = clock
        self._last = float("-inf")
        self._drawn = False

    def update(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self._last < self.interval_s and not (total is not None and done >= total):
            return
        self._last = now
        self.stream.write(ERASE + self.line(done, total))
        self.stream.flush()
        self._drawn = True

    def line(self, done: int, total: int | None) -> str:
        if total:
            pct = min(100, done * 100 // total)
            return f"{self.label}: {done:,} of {total:,} {self.unit} ({pct}%)"
        return f"{self.label}: {done:,} {self.unit}"

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._drawn:
            self.stream.write(ERASE)
            self.stream.flush()
            self._drawn = False
