"""Response processors: what the client receives of each upstream byte, and the usage read on the way."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping

from candela_mitm.providers.forwarding import ForwardPlan
from candela_mitm.providers.meters import UsageMeter, meter_for
from candela_mitm.providers.observed import OutputCounter
from candela_mitm.providers.readers import live_key
from candela_mitm.providers.sse import SseEvent, SseParser, one_ascii_data_line
from candela_mitm.providers.translate.responses import (
    AnthropicToOpenAIJson,
    AnthropicToOpenAIStream,
)
from candela_mitm.providers.usage import Usage, usage_from_openai


class ResponseProcessor(ABC):
    """Sees the upstream body in order; returns the bytes for the client. Usage readable any time."""

    @abstractmethod
    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes:
        return b""

    @property
    @abstractmethod
    def usage(self) -> Usage: ...

    @property
    def reported(self) -> bool:
        """Did the answer report its whole usage? False: `usage` is only what passed."""
        return False

    @property
    def observed_output(self) -> int:
        """Output tokens estimated from the streamed text that passed (observed.OutputCounter)."""
        return 0

    def __call__(self, data: bytes) -> list[bytes]:
        # mitmproxy's flow.response.stream contract: chunks in order, then b"" once at the end.
        # Return a list: an empty bytes chunk would end an HTTP/1.1 chunked body early.
        out = self.feed(data) if data else self.finish()
        return [out] if out else []


class PassThrough(ResponseProcessor):
    """Bytes go through untouched; a meter reads the usage from them."""

    def __init__(self, meter: UsageMeter) -> None:
        self._meter = meter

    def feed(self, data: bytes) -> bytes:
        self._meter.feed(data)
        return data

    def finish(self) -> bytes:
        self._meter.finish()
        return b""

    @property
    def usage(self) -> Usage:
        return self._meter.usage

    @property
    def reported(self) -> bool:
        return self._meter.reported

    @property
    def observed_output(self) -> int:
        return self._meter.observed_output


class Unmetered(ResponseProcessor):
    """A free read, or an answer with no usage on the wire: bytes go through, nothing is read."""

    def feed(self, data: bytes) -> bytes:
        return data

    @property
    def usage(self) -> Usage:
        return Usage()


class HideOpenAIUsage(ResponseProcessor):
    """An OpenAI stream where Candela asked for usage the client did not: drop that one chunk."""

    def __init__(self) -> None:
        self._parser = SseParser()
        self._usage = Usage()
        self._reported = False
        self._observed = OutputCounter("openai")
        self._whole = True  # nothing buffered in the parser: a whole event may go around it

    def _filter(self, events: list[SseEvent]) -> bytes:
        out = []
        for ev in events:
            self._observed.see(ev.data, ev.event)
            # `"usage":null` on every chunk (OpenAI's, once usage is asked for) is no usage
            if live_key(ev.data, '"usage"') and ev.data.lstrip().startswith("{"):
                try:
                    obj = json.loads(ev.data)
                except ValueError:
                    out.append(ev.raw)
                    continue
                u = usage_from_openai(obj) if isinstance(obj, dict) else None
                if u is not None:
                    self._usage = u
                    self._reported = True
                    if not obj.get("choices"):
                        continue  # the extra chunk: the client never asked for it
            out.append(ev.raw)
        return b"".join(out)

    def __call__(self, data: bytes) -> list[bytes]:
        # A delta passes as it came, in this one frame (mitmproxy calls it once a chunk, a
        # chunk a token): one whole `data:` line with nothing buffered before it, ASCII, no
        # Responses event, no usage in it (or `"usage":null`). Its output is counted on the
        # bytes (one character a byte: what the parser and _filter count on its text), and
        # nothing else is read. 6.9 -> 3.4 µs warm; in a server relaying 512-token streams
        # the processor was 21 µs a chunk, 13% of the event loop's samples in four frames, 10%
        # in two (bench/README.md, issue 21). Anything else goes through the parser.
        if (
            self._whole
            and one_ascii_data_line(data)
            and b'"response.' not in data
            and (b'"usage"' not in data or not live_key(data.decode("ascii"), '"usage"'))
        ):
            self._observed.see_openai_ascii(data)
            return [data]
        return super().__call__(data)

    def feed(self, data: bytes) -> bytes:
        out = self._filter(self._parser.feed(data))
        self._whole = not self._parser.buffered
        return out

    def finish(self) -> bytes:
        return self._filter(self._parser.flush())

    @property
    def usage(self) -> Usage:
        return self._usage

    @property
    def reported(self) -> bool:
        return self._reported

    @property
    def observed_output(self) -> int:
        return self._observed.tokens


class Translated(ResponseProcessor):
    """Anthropic's Messages answer, stream or JSON, translated back to the OpenAI format."""

    def __init__(self, translator: AnthropicToOpenAIStream | AnthropicToOpenAIJson) -> None:
        self._t = translator

    def feed(self, data: bytes) -> bytes:
        return self._t.feed(data)

    def finish(self) -> bytes:
        return self._t.finish()

    @property
    def usage(self) -> Usage:
        return self._t.usage

    @property
    def reported(self) -> bool:
        return self._t.reported

    @property
    def observed_output(self) -> int:
        return self._t.observed_output


_STREAM_TYPES = (
    "text/event-stream",
    "application/x-ndjson",
    "application/jsonl",
    "application/vnd.amazon.eventstream",
)


def is_stream(content_type: str, requested_stream: bool, status: int) -> bool:
    """Is this response a stream to pass through as it arrives (rather than one JSON body)?

    Streaming types always are; so is any successful answer to a streaming request (Gemini's
    JSON-array stream). An error answer to a streaming request is one JSON body.
    """
    ct = content_type.lower()
    if any(t in ct for t in _STREAM_TYPES):
        return True
    return requested_stream and status < 400


def make_processor(
    plan: ForwardPlan, status: int, content_type: str | None, headers: Mapping[str, str]
) -> ResponseProcessor:
    is_sse = bool(content_type) and "text/event-stream" in (content_type or "")
    if plan.translate == "openai-anthropic":
        model = plan.model or ""
        if is_sse and status < 400:
            return Translated(AnthropicToOpenAIStream(model, plan.client_wants_usage))
        return Translated(AnthropicToOpenAIJson(model))
    if plan.response_wire is None:
        return Unmetered()
    if plan.stream and is_sse and plan.response_wire == "openai" and not plan.client_wants_usage:
        return HideOpenAIUsage()
    return PassThrough(meter_for(plan.response_wire, plan.stream, content_type, headers))
