"""Realtime frames: what a WebSocket session's JSON events name (a model) and report (usage).

Three protocols (providers/catalogue/operation.py `Protocol`):
- `openai-realtime` (`/v1/realtime`): the client names a model in the URL and may switch it in
  `session.update` (`session.model`); each `response.done` carries `response.usage` with
  `input_token_details`/`output_token_details` split into text, audio and cached tokens.
- `openai-responses` (the Responses API's WebSocket mode): each `response.create` names its
  model; `response.completed` (or `.incomplete`/`.failed`) carries the Responses usage.
- `gemini-live` (Gemini Live and Vertex Live): the first `setup` frame names the model
  (`models/x`, or a Vertex resource name); server messages carry `usageMetadata` with
  `responseTokenCount` and per-modality details.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from candela_mitm.providers.usage import Usage, usage_from_gemini, usage_from_openai

Frame = dict[str, Any]

_RESPONSES_DONE = ("response.completed", "response.incomplete", "response.failed")


def parse_frame(content: bytes) -> Frame | None:
    """A frame's JSON object, or None (binary audio, not JSON, not an object)."""
    try:
        obj = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _model_name(value: object) -> str | None:
    """A model as named in a frame: Gemini's `models/x` and Vertex's
    `projects/p/locations/l/publishers/google/models/x` are the model `x`."""
    if not isinstance(value, str) or not value.strip():
        return None
    name = value.strip()
    if "models/" in name:
        name = name.rsplit("models/", 1)[1]
    return name or None


_ABSENT = object()


def _model_field(protocol: str, frame: Frame) -> object:
    """The raw `model` value a client frame sets, or _ABSENT when it sets none. A Responses
    `response.create` naming two different models (top level and `response`) is ambiguous: it
    sets None, which names no model and is refused."""
    kind = frame.get("type")
    if protocol == "openai-realtime":
        session = frame.get("session")
        if kind == "session.update" and isinstance(session, dict):
            return session.get("model", _ABSENT)
    elif protocol == "openai-responses":
        if kind == "response.create":
            inner = frame.get("response")
            named = [
                where["model"]
                for where in (frame, inner)
                if isinstance(where, dict) and "model" in where
            ]
            if not named:
                return _ABSENT
            return named[0] if all(m == named[0] for m in named) else None
    elif protocol == "gemini-live":
        setup = frame.get("setup")
        if isinstance(setup, dict):
            return setup.get("model", _ABSENT)
    return _ABSENT


def model_named(protocol: str, frame: Frame) -> str | None:
    """The model a client frame names (checked before the frame is forwarded), or None."""
    value = _model_field(protocol, frame)
    return None if value is _ABSENT else _model_name(value)


def names_model_badly(protocol: str, frame: Frame) -> bool:
    """A frame setting `model` to something that is not a model name (empty, not a string):
    refused, as it would reach the provider unchecked."""
    value = _model_field(protocol, frame)
    return value is not _ABSENT and _model_name(value) is None


def asks_for_work(protocol: str, frame: Frame) -> bool:
    """A client frame that asks the provider for a response, one request of the session against
    the user's rate limits: Realtime's and Responses' `response.create`; in Live, a
    `clientContent` that completes the turn (the default of neither side: Live waits for more
    otherwise) or a `toolResponse` (the model continues with it). Audio a provider answers on
    its own (voice-activity detection) asks for nothing: its response is counted when its usage
    frame arrives (governance/sessions.py SessionLimits)."""
    if protocol in ("openai-realtime", "openai-responses"):
        return frame.get("type") == "response.create"
    if protocol == "gemini-live":
        content = frame.get("clientContent", frame.get("client_content"))
        if isinstance(content, dict):
            done = content.get("turnComplete", content.get("turn_complete"))
            if done is True:
                return True
        return "toolResponse" in frame or "tool_response" in frame
    return False


def needs_model_first(protocol: str) -> bool:
    """Gemini Live's first client frame must be `setup` (it names the model); Responses'
    `response.create` frames each name theirs. Realtime named it in the URL."""
    return protocol in ("gemini-live", "openai-responses")


def _realtime_usage(frame: Frame) -> Usage | None:
    """Realtime's `response.done`: input_token_details / output_token_details (no plural)."""
    resp = frame.get("response")
    if not isinstance(resp, dict) or not isinstance(resp.get("usage"), dict):
        return None
    u = dict(resp["usage"])
    if "input_token_details" in u and "input_tokens_details" not in u:
        u["input_tokens_details"] = u["input_token_details"]
    if "output_token_details" in u and "output_tokens_details" not in u:
        u["output_tokens_details"] = u["output_token_details"]
    usage = usage_from_openai({"usage": u})
    if usage is None:
        return None
    details = u.get("input_tokens_details")
    if isinstance(details, dict):
        cached = details.get("cached_tokens_details")
        if isinstance(cached, dict):
            audio = cached.get("audio_tokens")
            if isinstance(audio, int) and not isinstance(audio, bool) and audio > 0:
                usage.cached_audio_tokens = min(audio, usage.cached_tokens)
    return usage


def _live_usage(frame: Frame) -> Usage | None:
    """Gemini Live's `usageMetadata`: `responseTokenCount`/`responseTokensDetails` are
    generateContent's `candidatesTokenCount`/`candidatesTokensDetails`."""
    m = frame.get("usageMetadata", frame.get("usage_metadata"))
    if not isinstance(m, dict):
        return None
    m = dict(m)
    for live, rest in (
        ("responseTokenCount", "candidatesTokenCount"),
        ("responseTokensDetails", "candidatesTokensDetails"),
        ("response_token_count", "candidates_token_count"),
        ("response_tokens_details", "candidates_tokens_details"),
    ):
        if live in m and rest not in m:
            m[rest] = m.pop(live)
    return usage_from_gemini({"usageMetadata": m})


def model_reported(frame: Frame) -> str | None:
    """The model a usage frame says served the response (Responses and Realtime carry
    `response.model`; Live does not), or None."""
    resp = frame.get("response")
    return _model_name(resp.get("model")) if isinstance(resp, dict) else None


def usage_of(protocol: str, frame: Frame) -> Usage | None:
    """The usage a server frame reports for the work it ends (one response, one turn), or None."""
    kind = frame.get("type")
    if protocol == "openai-realtime":
        return _realtime_usage(frame) if kind == "response.done" else None
    if protocol == "openai-responses":
        return usage_from_openai(frame) if kind in _RESPONSES_DONE else None
    if protocol == "gemini-live":
        return _live_usage(frame)
    return None


def add_usage(total: Usage, more: Usage) -> None:
    """Sum a frame's usage into a session's total, every token kind apart."""
    for name in (
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "reasoning_tokens",
        "input_audio_tokens",
        "cached_audio_tokens",
        "input_image_tokens",
        "input_video_tokens",
        "output_audio_tokens",
        "output_image_tokens",
        "web_search_requests",
    ):
        setattr(total, name, getattr(total, name) + getattr(more, name))


def tokens_by_kind(u: Usage) -> dict[str, int]:
    """A usage's token counts by kind, text apart from audio (for the session's audit entry)."""
    return {
        "input_text": u.input_tokens - u.input_audio_tokens - u.input_image_tokens
        - u.input_video_tokens,
        "input_audio": u.input_audio_tokens,
        "input_cached": u.cached_tokens,
        "output_text": u.output_tokens - u.output_audio_tokens - u.output_image_tokens,
        "output_audio": u.output_audio_tokens,
        "reasoning": u.reasoning_tokens,
    }


# Google's error statuses by the HTTP status of the refusal they stand for
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    402: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


def error_event(
    protocol: str,
    status: int,
    code: str,
    message: str,
    fields: Mapping[str, Any] | None = None,
) -> bytes:
    """The error a client of `protocol` understands, carrying Candela's error code and the
    denial's fields (a rate limit's `limit_kind`, `retry_after_s`, ...).

    Realtime's `error` event (the fields inside its `error` object), the Responses stream's
    `error` event (beside its code), Google's error object (the fields as its ErrorInfo's string
    metadata; Live has no error message of its own: its sessions end with a close frame, sent
    right after)."""
    extra = {k: v for k, v in (fields or {}).items() if k not in ("type", "code", "message")}
    if protocol == "openai-realtime":
        obj: dict[str, Any] = {
            "type": "error",
            "event_id": "event_candela_" + uuid.uuid4().hex[:16],
            "error": {
                "type": "invalid_request_error",
                "code": code,
                "message": message,
                "param": None,
                "event_id": None,
                **extra,
            },
        }
    elif protocol == "openai-responses":
        obj = {"type": "error", "code": code, "message": message, "param": None, **extra}
    else:
        info: dict[str, Any] = {"reason": code, "domain": "candela"}
        if extra:
            info["metadata"] = {k: str(v) for k, v in extra.items()}
        obj = {
            "error": {
                "code": status,
                "message": message,
                "status": _GOOGLE_STATUS.get(status, "FAILED_PRECONDITION"),
                "details": [info],
            }
        }
    return json.dumps(obj).encode()
