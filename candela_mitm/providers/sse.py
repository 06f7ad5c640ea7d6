"""Server-sent events: an incremental parser that keeps each event's raw bytes for pass-through."""

from __future__ import annotations

import re
from dataclasses import dataclass

# One whole event of one `data:` line, ASCII, nothing after its blank line (`data: {...}\n\n`,
# how providers stream each delta): a match object or None. One C scan: 0.7 µs on a 180-byte
# OpenAI chunk, where startswith, endswith, find, `in` and isascii take 0.85.
one_ascii_data_line = re.compile(rb"data: [^\r\n\x80-\xff]*\n\n").fullmatch


@dataclass(frozen=True)
class SseEvent:
    event: str  # "" when the event has no `event:` field ("message" by the spec)
    data: str  # data lines joined with "\n"
    raw: bytes  # the exact bytes of the event, separator included


def encode(data: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    body = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (head + body + "\n").encode()


class SseParser:
    """Feed bytes as they arrive; get whole events back. Handles \\n, \\r\\n and \\r line ends."""

    def __init__(self, max_buffer: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._max = max_buffer

    @property
    def buffered(self) -> bool:
        """Whether part of an event is waiting for the rest."""
        return bool(self._buf)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if (
            not self._buf
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n") == len(chunk) - 2
            and b"\r" not in chunk
        ):
            # the common chunk, nothing buffered before it: one event of one line, whole
            # (`data: {...}\n\n`, as providers stream each delta), parsed as below without
            # the buffer's copies and the three separators' searches: a 512-token
            # stream is 512 of them (bench/README.md, issue 21)
            ev = _parse_block(bytes(chunk))
            return [ev] if ev is not None else []
        self._buf += chunk
        events: list[SseEvent] = []
        while True:
            end, sep_len = self._find_boundary()
            if end < 0:
                break
            raw = bytes(self._buf[: end + sep_len])
            del self._buf[: end + sep_len]
            ev = _parse_block(raw)
            if ev is not None:
                events.append(ev)
        if len(self._buf) > self._max:
            # a peer that never ends an event: keep memory bounded, drop what cannot be parsed
            self._buf.clear()
        return events

    def flush(self) -> list[SseEvent]:
        """At the end of the stream: a last event without its blank line still counts."""
        if not self._buf.strip():
            rest = bytes(self._buf)
            self._buf.clear()
            return [SseEvent("", "", rest)] if rest else []
        raw = bytes(self._buf)
        self._buf.clear()
        ev = _parse_block(raw)
        return [ev] if ev is not None else [SseEvent("", "", raw)]

    def _find_boundary(self) -> tuple[int, int]:
        buf = self._buf
        best = -1
        best_len = 0
        for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
            i = buf.find(sep)
            if i >= 0 and (best < 0 or i < best):
                best, best_len = i, len(sep)
        return best, best_len


def _parse_block(raw: bytes) -> SseEvent | None:
    text = raw.decode("utf-8", errors="replace")
    event = ""
    data: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return SseEvent(event, "\n".join(data), raw)
