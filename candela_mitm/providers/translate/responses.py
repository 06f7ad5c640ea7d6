"""Responses: Anthropic Messages API answers (JSON and SSE) as OpenAI Chat Completions."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from candela_mitm.providers.observed import OutputCounter
from candela_mitm.providers.sse import SseParser
from candela_mitm.providers.usage import Usage, usage_from_anthropic

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# A non-SSE answer on a streamed request (an upstream error body) is kept up to this size.
_MAX_UNPARSED = 64 * 1024


def anthropic_to_openai_response(
    msg: dict[str, Any], model: str, created: int | None = None
) -> dict[str, Any]:
    """A Messages API response (or error) as an OpenAI chat.completion (or OpenAI error)."""
    err = _error_of(msg)
    if err is not None:
        return {"error": err}
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {
                        "name": block.get("name", ""),
                        "arguments": json.dumps(block.get("input") or {}),
                    },
                }
            )
        # thinking and server-tool blocks have no place in a chat.completion message
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-" + str(msg.get("id") or uuid.uuid4().hex),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(msg.get("stop_reason")),
            }
        ],
        "usage": _openai_usage(_usage_of(msg.get("usage"))),
    }


def _finish_reason(stop_reason: Any) -> str:
    return _FINISH_REASONS.get(stop_reason, "stop")


def _usage_of(raw: Any) -> Usage:
    """An Anthropic `usage` object read by the one Anthropic usage rule (usage.py: cache reads
    and writes counted into input, cache writes and their TTLs, server tools, speed)."""
    return usage_from_anthropic({"usage": raw}) or Usage()


def _openai_usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _error_of(msg: Any) -> dict[str, Any] | None:
    """The OpenAI `error` object for an Anthropic or Google (Vertex) error body, else None."""
    if isinstance(msg, list) and len(msg) == 1:
        msg = msg[0]  # Vertex sometimes wraps its error in a one-element list
    if not isinstance(msg, dict):
        return None
    err = msg.get("error")
    if msg.get("type") != "error" and not isinstance(err, dict):
        return None
    if not isinstance(err, dict):
        err = {}
    if msg.get("type") == "error" or "type" in err:
        kind = str(err.get("type") or "api_error")
        return {"message": str(err.get("message", "")), "type": kind, "param": None, "code": kind}
    # Google style: {"error": {"code": 400, "message": ..., "status": "INVALID_ARGUMENT"}}
    status = str(err.get("status") or "upstream_error")
    return {
        "message": str(err.get("message", "")),
        "type": status.lower(),
        "param": None,
        "code": status,
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class AnthropicToOpenAIStream:
    """Anthropic SSE bytes in (split anywhere), OpenAI chat.completion.chunk SSE bytes out."""

    def __init__(self, model: str, include_usage: bool, created: int | None = None) -> None:
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created
        self._id = "chatcmpl-" + uuid.uuid4().hex
        self._parser = SseParser()
        self._raw_usage: dict[str, Any] = {}  # Anthropic's counters, latest value of each
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._events = 0
        self._unparsed = bytearray()
        self._finished = False
        self._reported = False  # message_delta brought the whole usage
        self._observed = OutputCounter("anthropic")

    @property
    def usage(self) -> Usage:
        return _usage_of(self._raw_usage)

    @property
    def reported(self) -> bool:
        return self._reported

    @property
    def observed_output(self) -> int:
        return self._observed.tokens

    def feed(self, data: bytes) -> bytes:
        if self._events == 0 and len(self._unparsed) < _MAX_UNPARSED:
            self._unparsed += data[: _MAX_UNPARSED - len(self._unparsed)]
        return b"".join(self._event(ev.event, ev.data) for ev in self._parser.feed(data))

    def finish(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        out = [self._event(ev.event, ev.data) for ev in self._parser.flush()]
        if self._events == 0 and self._unparsed.strip():
            # not SSE at all: the upstream answered a streamed request with a JSON error
            try:
                err = _error_of(json.loads(self._unparsed))
            except ValueError:
                err = None
            if err is not None:
                out.append(_sse({"error": err}))
        if self.include_usage:
            out.append(_sse(self._chunk(usage=_openai_usage(self.usage))))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)

    def _chunk(
        self,
        delta: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        if usage is not None:
            chunk["choices"] = []
            chunk["usage"] = usage
        else:
            chunk["choices"] = [
                {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
            ]
        return chunk

    def _event(self, name: str, data: str) -> bytes:
        if not data:
            return b""
        self._observed.see(data, name)
        try:
            ev = json.loads(data)
        except ValueError:
            return b""  # a garbled event: drop it rather than break the client's stream
        if not isinstance(ev, dict):
            return b""
        if self._events == 0:
            self._unparsed.clear()  # it is SSE after all
        self._events += 1
        kind = ev.get("type") or name
        if kind == "message_start":
            msg = _dict(ev.get("message"))
            if msg.get("id"):
                self._id = "chatcmpl-" + str(msg["id"])
            self._merge_usage(msg.get("usage"))
            return _sse(self._chunk({"role": "assistant", "content": ""}))
        if kind == "content_block_start":
            return self._block_start(ev)
        if kind == "content_block_delta":
            return self._block_delta(ev)
        if kind == "message_delta":
            self._merge_usage(ev.get("usage"))
            self._reported = self._reported or isinstance(ev.get("usage"), dict)
            delta = _dict(ev.get("delta"))
            if delta.get("stop_reason") is not None:
                return _sse(self._chunk({}, _finish_reason(delta["stop_reason"])))
            return b""
        if kind == "error":
            err = _error_of(ev) or {"message": "", "type": "api_error", "param": None}
            return _sse({"error": err})
        return b""  # ping, content_block_stop, message_stop, and events added later

    def _merge_usage(self, raw: Any) -> None:
        # message_delta counts are cumulative and may repeat or omit message_start's fields
        if isinstance(raw, dict):
            self._raw_usage.update({k: v for k, v in raw.items() if isinstance(v, int)})

    def _text(self, text: Any) -> bytes:
        return _sse(self._chunk({"content": text})) if text else b""

    def _block_start(self, ev: dict[str, Any]) -> bytes:
        block = ev.get("content_block")
        if not isinstance(block, dict):
            return b""
        if block.get("type") == "text":
            return self._text(block.get("text"))
        if block.get("type") == "tool_use":
            index = len(self._tool_index)
            self._tool_index[_int(ev.get("index"))] = index
            call = {
                "index": index,
                "id": block.get("id", ""),
                "type": "function",
                "function": {"name": block.get("name", ""), "arguments": ""},
            }
            out = _sse(self._chunk({"tool_calls": [call]}))
            if block.get("input"):
                # a block may start with its input whole rather than stream it
                args = json.dumps(block["input"])
                out += _sse(self._chunk(self._args_delta(index, args)))
            return out
        return b""

    def _block_delta(self, ev: dict[str, Any]) -> bytes:
        delta = ev.get("delta")
        if not isinstance(delta, dict):
            return b""
        if delta.get("type") == "text_delta":
            return self._text(delta.get("text"))
        if delta.get("type") == "input_json_delta":
            index = self._tool_index.get(_int(ev.get("index")))
            part = delta.get("partial_json")
            if index is None or not part:
                return b""
            return _sse(self._chunk(self._args_delta(index, part)))
        return b""  # thinking, signature and citation deltas have no chat.completion field

    @staticmethod
    def _args_delta(index: int, args: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, "function": {"arguments": args}}]}


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int:
    return v if isinstance(v, int) else -1


class AnthropicToOpenAIJson:
    """A non-streamed Messages API answer, buffered and translated whole at finish()."""

    def __init__(self, model: str, include_usage: bool = True, created: int | None = None) -> None:
        # include_usage is accepted so both translators are built alike; a chat.completion
        # always carries usage
        self.model = model
        self.created = created
        self._buf = bytearray()
        self._usage = Usage()
        self._reported = False
        self._finished = False

    @property
    def usage(self) -> Usage:
        """Zero until finish(): a JSON body can only be read whole."""
        return Usage(self._usage.input_tokens, self._usage.output_tokens, self._usage.cached_tokens)

    @property
    def reported(self) -> bool:
        return self._reported

    @property
    def observed_output(self) -> int:
        return 0  # one body, read whole: nothing streams

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        return b""

    def finish(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        raw = bytes(self._buf)
        self._buf.clear()
        try:
            msg = json.loads(raw)
        except ValueError:
            return raw
        err = _error_of(msg)
        if err is not None:
            out: dict[str, Any] = {"error": err}
        elif isinstance(msg, dict):
            self._usage = _usage_of(msg.get("usage"))
            self._reported = isinstance(msg.get("usage"), dict)
            out = anthropic_to_openai_response(msg, self.model, self.created)
        else:
            return raw
        return json.dumps(out).encode()
