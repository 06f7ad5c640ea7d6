"""Requests: an OpenAI Chat Completions request as an Anthropic Messages API request."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import unquote_to_bytes

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI clients often leave it out

_TOOL_CHOICES: dict[str, dict[str, Any]] = {
    "auto": {"type": "auto"},
    "none": {"type": "none"},
    "required": {"type": "any"},
}


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
