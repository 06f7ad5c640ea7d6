"""Spans: one per proxied request, W3C trace context in and out, and a bounded store of recent ones."""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    parent_id: str | None  # the caller's span, when a traceparent came in
    flags: str = "01"

    @classmethod
    def from_headers(cls, traceparent: str | None) -> TraceContext:
        """Honour a valid incoming traceparent; otherwise start a new trace (W3C rules)."""
        if traceparent:
            m = _TRACEPARENT.match(traceparent.strip().lower())
            if m:
                version, trace_id, parent_id, flags = m.groups()
                if version != "ff" and trace_id != "0" * 32 and parent_id != "0" * 16:
                    return cls(trace_id, parent_id, flags)
        return cls(new_trace_id(), None)

    def traceparent_for(self, span_id: str) -> str:
        return f"00-{self.trace_id}-{span_id}-{self.flags}"


# Trace and span ids come from the OS's CSPRNG, as secrets.token_hex's do, read 4 KiB at a
# time: every request takes a span id and (sending no traceparent) a trace id, and each
# secrets.token_hex was a getrandom system call of its own, 5-8 µs on caches gone cold
# between requests (bench/README.md, twenty-second session).
_RANDOM_READ = 4096
_random = b""
_random_at = 0
_random_lock = threading.Lock()


def _random_hex(n: int) -> str:
    """`n` bytes from the OS's CSPRNG as hex (secrets.token_hex(n)), each handed out once."""
    global _random, _random_at
    with _random_lock:
        at = _random_at
        if at + n > len(_random):
            _random, at = os.urandom(_RANDOM_READ), 0
        _random_at = at + n
        return _random[at : at + n].hex()


def _forget_random() -> None:
    """In a forked child: never hand out the bytes the parent will (the same ids twice)."""
    global _random, _random_at, _random_lock
    _random, _random_at, _random_lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_random)


def new_trace_id() -> str:
    return _random_hex(16)


def new_span_id() -> str:
    return _random_hex(8)


_second: tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """Now in UTC to the millisecond (truncated), e.g. 2026-05-17T12:00:00.123Z.

    Twice per request: the part up to the second is formatted once a second.
    """
    global _second
    now = time.time_ns()
    sec, ns = divmod(now, 1_000_000_000)
    if sec != _second[0]:
        _second = (sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{ns // 1_000_000:03d}Z"


@dataclass
class Span:
    span_id: str
    trace_id: str
    parent_span_id: str | None
    timestamp: str
    user: str | None = None
    tenant: str | None = None
    provider: str | None = None
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    usage_source: str | None = None  # reported | observed | reserved (governance/accounting.py)
    duration_ms: float = 0.0
    ttft_ms: float | None = None
    status: str = "ok"  # ok | error | denied
    http_status: int | None = None
    error: str | None = None
    stream: bool = False
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["duration_ms"] = round(self.duration_ms, 3)
        if self.ttft_ms is not None:
            d["ttft_ms"] = round(self.ttft_ms, 3)
        d["cost_usd"] = round(self.cost_usd, 10)
        return d


class SpanStore:
    """The most recent spans in memory, newest first; thread-safe, bounded."""

    def __init__(self, capacity: int = 1000) -> None:
        self._spans: deque[Span] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, span: Span) -> None:
        with self._lock:
            self._spans.append(span)

    def recent(self, limit: int = 50, user: str | None = None) -> list[Span]:
        """The newest `limit` spans; only `user`'s when a user is named."""
        with self._lock:
            items = list(self._spans)
        items.reverse()
        if user is not None:
            items = [s for s in items if s.user == user]
        return items[:limit]


def traces_payload(
    store: SpanStore, limit_param: str | None, user: str | None = None
) -> dict[str, Any]:
    """GET /_local/api/traces: default 50, at most 200; `user`'s spans only when one is named."""
    limit = 50
    if limit_param:
        try:
            limit = int(limit_param)
        except ValueError:
            limit = 50
    limit = max(1, min(limit, 200))
    spans = [s.to_json() for s in store.recent(limit, user)]
    return {"spans": spans, "count": len(spans)}
