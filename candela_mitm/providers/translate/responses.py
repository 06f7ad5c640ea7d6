"""Translation between OpenAI Chat Completions and Anthropic's Messages API, streams included."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any
from urllib.parse import unquote_to_bytes

from candela_mitm.providers.sse import SseParser
from candela_mitm.providers.usage import OutputCounter, Usage, usage_from_anthropic

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI clients often leave it out

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_TOOL_CHOICES: dict[str, dict[str, Any]] = {
    "auto": {"type": "auto"},
    "none": {"type": "none"},
    "required": {"type": "any"},
}

# A non-SSE answer on a streamed request (an upstream error body) is kept up to this size.
_MAX_UNPARSED = 64 * 1024


# --- requests ------------------------------------------------------------------------------


def openai_to_anthropic_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion request as a Messages API body (`model` kept; the caller
    removes it for Vertex). OpenAI-only knobs with no Anthropic equivalent (penalties, seed,
    logit_bias, response_format, stream_options, ...) are dropped; what would change the
    answer's shape (n > 1, roles or parts Anthropic cannot express) raises ValueError."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        raise ValueError("'messages' is required")
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list")
    if not messages:
        raise ValueError("'messages' must not be empty")
    n = body.get("n")
    if n is not None and n != 1:
        raise ValueError("'n' other than 1 is not supported: the Messages API returns one choice")

    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(_system_blocks(m.get("content"), i))
            continue
        if role == "user":
            _append_turn(turns, "user", _user_blocks(m.get("content"), i))
        elif role == "assistant":
            _append_turn(turns, "assistant", _assistant_blocks(m, i))
        elif role == "tool":
            _append_turn(turns, "user", [_tool_result(m, i)])
        elif role == "function":
            raise ValueError(
                f"messages[{i}]: the legacy 'function' role is not supported; use 'tool'"
            )
        else:
            raise ValueError(f"messages[{i}]: unknown role {role!r}")
    if not turns:
        raise ValueError("'messages' holds no user or assistant message")

    out: dict[str, Any] = {}
    if "model" in body:
        out["model"] = body["model"]
    out["max_tokens"] = _max_tokens(body)
    out["messages"] = turns
    if system:
        # a plain string unless a block carries cache_control, which only a list can hold
        if any("cache_control" in b for b in system):
            out["system"] = system
        else:
            out["system"] = "\n\n".join(b["text"] for b in system)
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list):
        if not all(isinstance(s, str) for s in stop):
            raise ValueError("'stop' must be a string or a list of strings")
        if stop:
            out["stop_sequences"] = list(stop)
    elif stop is not None:
        raise ValueError("'stop' must be a string or a list of strings")
    if body.get("stream"):
        out["stream"] = True
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}

    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise ValueError("'tools' must be a list")
        if tools:
            out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and out.get("tools"):
        # Anthropic rejects tool_choice without tools; OpenAI ignores it
        out["tool_choice"] = choice
    return out


def _max_tokens(body: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"'{key}' must be a positive integer")
        return v
    return DEFAULT_MAX_TOKENS


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return  # an empty message adds nothing, and Anthropic rejects empty content
    if turns and turns[-1]["role"] == role:
        # Anthropic requires alternating roles: tool results and a following user message
        # (or two user messages in a row) become one turn
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _text_block(text: str, part: dict[str, Any] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if part is not None and isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _parts(content: Any, i: int) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise ValueError(f"messages[{i}]: 'content' must be a string or a list of content parts")


def _system_blocks(content: Any, i: int) -> list[dict[str, Any]]:
    blocks = []
    for part in _parts(content, i):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError(f"messages[{i}]: system messages may hold only text parts")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"messages[{i}]: a text part needs a string 'text'")
        if text:
            blocks.append(_text_block(text, part))
    return blocks


def _user_blocks(content: Any, i: int) -> list[dict[str, Any]]:
    if content is None:
        raise ValueError(f"messages[{i}]: a user message needs 'content'")
    return [b for b in (_part(p, i) for p in _parts(content, i)) if b is not None]


def _part(part: Any, i: int) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        raise ValueError(f"messages[{i}]: each content part must be an object")
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise ValueError(f"messages[{i}]: a {kind} part needs a string '{kind}'")
        return _text_block(text, part) if text else None
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise ValueError(f"messages[{i}]: an image_url part needs a 'url'")
        block = {"type": "image", "source": _image_source(url, i)}
        if isinstance(part.get("cache_control"), dict):
            block["cache_control"] = part["cache_control"]
        return block
    if kind == "file":
        f = part.get("file")
        data = f.get("file_data") if isinstance(f, dict) else None
        if not isinstance(data, str) or not data.startswith("data:application/pdf"):
            raise ValueError(
                f"messages[{i}]: only file parts carrying a PDF as a data: URL are supported"
            )
        media_type, b64 = _data_url(data, i)
        return {
            "type": "document",
            "source": {"type": "base64", "media_type": media_type, "data": b64},
        }
    raise ValueError(f"messages[{i}]: content part type {kind!r} is not supported")


def _image_source(url: str, i: int) -> dict[str, Any]:
    if url.startswith("data:"):
        media_type, b64 = _data_url(url, i)
        return {"type": "base64", "media_type": media_type, "data": b64}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise ValueError(f"messages[{i}]: image URLs must be data:, http: or https: URLs")


def _data_url(url: str, i: int) -> tuple[str, str]:
    """data:[<media type>][;base64],<data> -> (media type, base64 text)."""
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise ValueError(f"messages[{i}]: a malformed data: URL")
    params = head.split(";")
    media_type = params[0] or "text/plain"
    if "base64" in params[1:]:
        return media_type, payload
    # a percent-encoded data URL: Anthropic only takes base64
    return media_type, base64.b64encode(unquote_to_bytes(payload)).decode("ascii")


def _assistant_blocks(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    content = m.get("content")
    blocks: list[dict[str, Any]] = []
    if content is not None:
        blocks = [b for b in (_part(p, i) for p in _parts(content, i)) if b is not None]
    calls = m.get("tool_calls")
    if calls is None:
        return blocks
    if not isinstance(calls, list):
        raise ValueError(f"messages[{i}]: 'tool_calls' must be a list")
    for call in calls:
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise ValueError(f"messages[{i}]: only function tool calls are supported")
        fn = call.get("function")
        call_id = call.get("id")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not call_id:
            raise ValueError(f"messages[{i}]: a tool call needs an 'id' and a function 'name'")
        blocks.append(
            {"type": "tool_use", "id": call_id, "name": fn["name"], "input": _arguments(fn, i)}
        )
    return blocks


def _arguments(fn: dict[str, Any], i: int) -> dict[str, Any]:
    raw = fn.get("arguments")
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError as e:
        raise ValueError(f"messages[{i}]: tool call arguments are not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"messages[{i}]: tool call arguments must be a JSON object")
    return value


def _tool_result(m: dict[str, Any], i: int) -> dict[str, Any]:
    call_id = m.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise ValueError(f"messages[{i}]: a tool message needs 'tool_call_id'")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = m.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content is not None:
        parts = [b for b in (_part(p, i) for p in _parts(content, i)) if b is not None]
        if parts:
            block["content"] = parts
    return block


def _tool(t: Any, i: int) -> dict[str, Any]:
    if not isinstance(t, dict) or t.get("type", "function") != "function":
        raise ValueError(f"tools[{i}]: only function tools are supported")
    fn = t.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"tools[{i}]: a function tool needs a 'name'")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    elif not isinstance(params, dict):
        raise ValueError(f"tools[{i}]: 'parameters' must be a JSON schema object")
    out: dict[str, Any] = {"name": fn["name"]}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    out["input_schema"] = params
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice is None:
        out = None
    elif isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise ValueError(f"'tool_choice' {choice!r} is not one of auto, none, required")
        out = dict(_TOOL_CHOICES[choice])
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str) or not name:
            raise ValueError(
                "'tool_choice' must name a function: {type: function, function: {name}}"
            )
        out = {"type": "tool", "name": name}
    else:
        raise ValueError("'tool_choice' must be a string or an object")
    if parallel is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


# --- responses -----------------------------------------------------------------------------


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

    def _block_start(self, ev: dict[str, Any]) -> bytes:
        block = ev.get("content_block")
        if not isinstance(block, dict):
            return b""
        if block.get("type") == "text":
            text = block.get("text")
            return _sse(self._chunk({"content": text})) if text else b""
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
            text = delta.get("text")
            return _sse(self._chunk({"content": text})) if text else b""
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
