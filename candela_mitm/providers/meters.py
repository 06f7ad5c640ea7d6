"""Meters: the framing of a response body (SSE, NDJSON, AWS event stream, JSON), fed as it passes
to the usage readers of its wire (providers/readers.py)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping

from candela_mitm.providers.eventstream import EventMessage, EventStreamDecoder, EventStreamError
from candela_mitm.providers.readers import Reader, reader_for
from candela_mitm.providers.sse import SseParser
from candela_mitm.providers.usage import (
    METRICS_KEY,
    Usage,
    load_json,
    usage_from_bedrock_headers,
)

MAX_BODY = 32 * 1024 * 1024  # the most of one body (or one stream line/element) held in memory
_TAIL = 256 * 1024  # past MAX_BODY a JSON body keeps only its end, where every format puts usage


class UsageMeter(ABC):
    """Reads one response's usage as its body passes. feed() never raises; usage reads any time.

    `usage` is what the body has shown so far (the response headers' counts when it shows
    none), so a stream cut short still settles on the tokens it carried.
    """

    def __init__(self, reader: Reader, fallback: Usage | None = None) -> None:
        self._reader = reader
        self._fallback = fallback
        self._finished = False
        self.fault: str | None = None  # why the meter stopped reading the body, if it did

    @property
    def saw_output(self) -> bool:
        """True once the first output content (a token, a tool call, a body with content) passed."""
        return self._reader.saw_output

    @property
    def error(self) -> str | None:
        """The first error the provider reported inside the body or stream."""
        return self._reader.error

    @property
    def reported(self) -> bool:
        """Did the answer report its whole usage? False: none, or a first part only (a stream
        cut after Anthropic's `message_start`), and `usage` is what passed."""
        return self._fallback is not None or self._reader.reported

    @property
    def observed_output(self) -> int:
        """Output tokens estimated from the streamed text that passed (OutputCounter)."""
        return self._reader.observed.tokens

    @property
    def usage(self) -> Usage:
        u = self._reader.usage() or self._fallback
        return u.copy() if u else Usage()

    def feed(self, data: bytes) -> None:
        if not data or self._finished or self.fault is not None:
            return
        try:
            self._feed(bytes(data))
        except Exception as e:  # metering must never break the response it watches
            self.fault = f"{type(e).__name__}: {e}"

    def finish(self) -> None:
        """The body ended: read what a last unterminated event or the buffered JSON holds."""
        if self._finished:
            return
        self._finished = True
        if self.fault is not None:
            return
        try:
            self._finish()
        except Exception as e:
            self.fault = f"{type(e).__name__}: {e}"

    @abstractmethod
    def _feed(self, data: bytes) -> None:
        """Read the next bytes of the body (may raise: feed() turns that into a fault)."""

    def _finish(self) -> None:  # noqa: B027 - a hook: most meters read everything in _feed
        """The body ended: read what is left over (a last unterminated event, a buffered body)."""


class _SseMeter(UsageMeter):
    def __init__(self, reader: Reader, fallback: Usage | None, max_body: int) -> None:
        super().__init__(reader, fallback)
        self._parser = SseParser(max_buffer=max_body)

    def _feed(self, data: bytes) -> None:
        for ev in self._parser.feed(data):
            self._take(ev.data, ev.event)

    def _finish(self) -> None:
        for ev in self._parser.flush():
            self._take(ev.data, ev.event)

    def _take(self, data: str, event: str) -> None:
        if data and data != "[DONE]":
            self._reader.take(data, event)


class _NdjsonMeter(UsageMeter):
    def __init__(self, reader: Reader, fallback: Usage | None, max_body: int) -> None:
        super().__init__(reader, fallback)
        self._buf = bytearray()
        self._max = max_body

    def _feed(self, data: bytes) -> None:
        self._buf += data
        end = self._buf.rfind(b"\n")
        if end < 0:
            if len(self._buf) > self._max:
                self._buf.clear()  # a line past the bound: its rest will not parse and is skipped
            return
        lines = bytes(self._buf[:end])
        del self._buf[: end + 1]
        for line in lines.split(b"\n"):
            self._take(line)

    def _finish(self) -> None:
        self._take(bytes(self._buf))
        self._buf.clear()

    def _take(self, line: bytes) -> None:
        line = line.strip()
        if line:
            self._reader.take(line.decode("utf-8", "replace"))


class _EventStreamMeter(UsageMeter):
    """Bedrock's invoke-with-response-stream (base64 model events) and converse-stream."""

    def __init__(self, reader: Reader, fallback: Usage | None) -> None:
        super().__init__(reader, fallback)
        self._decoder = EventStreamDecoder()

    def _feed(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except EventStreamError as e:
            for m in e.messages:
                self._take(m)
            self.fault = str(e)
            return
        for m in messages:
            self._take(m)

    def _finish(self) -> None:
        if self._decoder.pending:
            self.fault = f"event stream cut mid-message ({self._decoder.pending} bytes)"

    def _take(self, m: EventMessage) -> None:
        kind = m.headers.get(":message-type")
        if kind in ("exception", "error"):
            if self._reader.error is None:
                name = m.headers.get(":exception-type") or m.headers.get(":error-code") or kind
                obj = load_json(m.payload)
                msg = None
                if isinstance(obj, dict):
                    msg = obj.get("message") or obj.get("Message")
                self._reader.error = f"{name}: {msg}" if msg else str(name)
            return
        event = str(m.headers.get(":event-type") or "")
        if event == "chunk" or m.payload.startswith(_CHUNK_PREFIX):
            inner = _chunk_bytes(m.payload)
            if inner is not None:
                self._reader.take(inner.decode("utf-8", "replace"))
        else:
            # converse-stream: the event type names the event, the payload is its JSON
            self._reader.take(m.payload.decode("utf-8", "replace"), event)


_CHUNK_PREFIX = b'{"bytes":"'


def _chunk_bytes(payload: bytes) -> bytes | None:
    """The model event inside an invoke-with-response-stream chunk `{"bytes": "<base64>"}`."""
    if payload.startswith(_CHUNK_PREFIX):
        # the usual shape: slice the base64 out instead of parsing the wrapper
        end = payload.find(b'"', len(_CHUNK_PREFIX))
        try:
            return base64.b64decode(payload[len(_CHUNK_PREFIX) : end], validate=True)
        except (ValueError, binascii.Error):
            pass  # an escaped character or an odd wrapper: parse it properly below
    obj = load_json(payload)
    b64 = obj.get("bytes") if isinstance(obj, dict) else None
    if not isinstance(b64, str):
        return None
    try:
        return base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error):
        return None


class _JsonArrayScanner:
    """Cuts a top-level JSON array into its elements' text as each one closes.

    Gemini's streamGenerateContent without alt=sse streams such an array. Only structural
    characters are visited (a regex jumps over the rest), so the cost stays linear.
    """

    _SPECIAL = re.compile(rb'[{}\[\]"\\]')

    def __init__(self, max_element: int) -> None:
        self._buf = bytearray()
        self._max = max_element
        self._scan = 0  # where the next scan starts
        self._depth = 0  # 1 inside the top-level array
        self._in_str = False
        self._skip = -1  # the position of a character escaped by a backslash
        self._start = -1  # where the element being read starts

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        cut = 0
        for m in self._SPECIAL.finditer(self._buf, self._scan):
            i = m.start()
            if i == self._skip:
                continue
            c = self._buf[i]
            if self._in_str:
                if c == 0x5C:  # backslash
                    self._skip = i + 1
                elif c == 0x22:
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c in (0x7B, 0x5B):  # { [
                if self._depth == 1:
                    self._start = i
                self._depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == 1 and self._start >= 0:
                    out.append(bytes(self._buf[self._start : i + 1]))
                    self._start = -1
                    cut = i + 1
        self._scan = len(self._buf)
        if self._start < 0:
            cut = len(self._buf)  # between elements: nothing to keep
        elif self._start > cut:
            cut = self._start
        if cut:
            del self._buf[:cut]
            self._scan -= cut
            self._skip -= cut
            if self._start >= 0:
                self._start -= cut
        if len(self._buf) > self._max:
            raise ValueError(f"a JSON array element is larger than {self._max} bytes")
        return out


_BODY_MARKERS = (b'"usage', b"eval_count", b"invocationMetrics")
_NOT_SPACE = re.compile(rb"[^ \t\n\r\x0b\x0c]")  # what bytes.lstrip() keeps


class _JsonBodyMeter(UsageMeter):
    """A body read whole at the end: a JSON object, or a JSON array read element by element."""

    def __init__(self, reader: Reader, fallback: Usage | None, max_body: int) -> None:
        super().__init__(reader, fallback)
        self._max = max_body
        self._buf = bytearray()
        self._tail: bytearray | None = None  # past max_body: only the end of the body
        self._array: _JsonArrayScanner | None = None
        self._sniffed = False
        self._marked = False  # a usage key has been seen in the body
        self._seen = 0
        self._parsed_at = -1

    def _feed(self, data: bytes) -> None:
        self._seen += len(data)
        if self._array is not None:
            self._take_elements(data)
        elif self._tail is not None:
            self._tail += data
            self._mark(self._tail, len(data))
            if len(self._tail) > 2 * _TAIL:
                del self._tail[:-_TAIL]
        else:
            self._buf += data
            self._mark(self._buf, len(data))
            if not self._sniffed:
                # the first byte past ASCII whitespace (bytes.lstrip's), found without a copy
                first = _NOT_SPACE.search(self._buf)
                if first is None:
                    return
                self._sniffed = True
                if first.group() == b"[":
                    self._array = _JsonArrayScanner(self._max)
                    buffered = bytes(self._buf)
                    self._buf.clear()
                    self._take_elements(buffered)
                    return
            if len(self._buf) > self._max:
                self._tail = bytearray(self._buf[-_TAIL:])
                self._buf = bytearray()

    def _mark(self, buf: bytearray, added: int) -> None:
        # until a usage key has passed, a read before the end has nothing new to parse
        if not self._marked:
            # searched in place from where the new bytes start (a copy of them cost a body's copy)
            start = max(0, len(buf) - (added + 32))
            for m in _BODY_MARKERS:
                if buf.find(m, start) >= 0:
                    self._marked = True
                    break

    def _take_elements(self, data: bytes) -> None:
        assert self._array is not None
        for element in self._array.feed(data):
            self._reader.take(element.decode("utf-8", "replace"))

    def _finish(self) -> None:
        self._parse()

    def _read_now(self) -> None:
        if not self._finished and self.fault is None and self._marked:
            try:
                self._parse()
            except Exception as e:
                self.fault = f"{type(e).__name__}: {e}"

    @property
    def usage(self) -> Usage:
        self._read_now()
        return super().usage

    @property
    def reported(self) -> bool:
        self._read_now()
        return super().reported

    def _parse(self) -> None:
        if self._array is not None or self._seen == self._parsed_at:
            return
        self._parsed_at = self._seen
        if self._tail is not None:
            self._reader.saw_output = True  # a body past the bound carries output
            docs = _salvage(bytes(self._tail))
        else:
            docs = _documents(bytes(self._buf)) or _salvage(bytes(self._buf))
        for doc in docs:
            self._reader.take_obj(doc)


def _documents(body: bytes) -> list[object]:
    """Every whole JSON document in a body: one object, an array's elements, NDJSON, or SSE."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return []
    obj = load_json(text)
    if obj is not None:
        return obj if isinstance(obj, list) else [obj]
    if text.startswith(("data:", "event:", ":")):
        parser = SseParser(max_buffer=len(body) + 1)
        events = parser.feed(body) + parser.flush()
        found = (load_json(ev.data) for ev in events if ev.data and ev.data != "[DONE]")
        return [o for o in found if o is not None]
    # a cut-off array or a run of documents: everything up to the first one that does not parse
    decoder = json.JSONDecoder()
    docs: list[object] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n[,]":
            i += 1
        if i >= n:
            break
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            break
        docs.append(obj)
    return docs


_USAGE_VALUE = re.compile(r'"(usage|usageMetadata|usage_metadata|' + METRICS_KEY + r')"\s*:\s*\{')
_OLLAMA_COUNT = re.compile(r'"(prompt_eval_count|eval_count)"\s*:\s*(\d+)')


def _salvage(body: bytes) -> list[object]:
    """The usage objects found in part of a JSON body (its end, or a prefix of it)."""
    text = body.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    found: dict[str, object] = {}
    for m in _USAGE_VALUE.finditer(text):
        try:
            value, _ = decoder.raw_decode(text, m.end() - 1)
        except ValueError:
            continue
        found[m.group(1)] = value  # the last complete one of each key
    for m in _OLLAMA_COUNT.finditer(text):
        found[m.group(1)] = int(m.group(2))
    return [found] if found else []


def _media_type(content_type: str | None, headers: Mapping[str, str] | None) -> str:
    if content_type is None and headers is not None:
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    return (content_type or "").split(";", 1)[0].strip().lower()


_NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)


def meter_for(
    wire: str,
    stream: bool,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    max_body: int = MAX_BODY,
) -> UsageMeter:
    """The meter for one response of `wire`, chosen by its content type (then by `stream`).

    `headers` are the response headers: their content type is used when `content_type` is None,
    and Bedrock's token-count headers are the usage until the body shows one.
    """
    reader = reader_for(wire)
    fallback = usage_from_bedrock_headers(headers) if headers is not None else None
    media = _media_type(content_type, headers)
    if media == "text/event-stream":
        return _SseMeter(reader, fallback, max_body)
    if media == "application/vnd.amazon.eventstream":
        return _EventStreamMeter(reader, fallback)
    if media in _NDJSON_TYPES or (wire == "ollama" and stream):
        return _NdjsonMeter(reader, fallback, max_body)
    if stream and not media:
        if wire == "bedrock":
            return _EventStreamMeter(reader, fallback)
        return _SseMeter(reader, fallback, max_body)
    return _JsonBodyMeter(reader, fallback, max_body)
