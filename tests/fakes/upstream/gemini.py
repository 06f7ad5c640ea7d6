"""Gemini's native API in the fake upstream: generateContent, streamGenerateContent, countTokens, models (Google AI and Vertex)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .server import (
    _VERTEX,
    FakeUpstream,
    _bad_request,
    _Ctx,
    _google_error,
    _id,
    _json_reply,
    _Knobs,
    _pieces,
    _Reply,
    _route,
    _sse,
    _stream_reply,
)

# ------------------------------------------------------------------------------------------------
# Gemini native (Google AI and Vertex)


def _gemini_chunk(
    text: str, model: str, rid: str, k: _Knobs, output_so_far: int, final: bool
) -> dict[str, Any]:
    u = k.usage
    cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if final:
        cand["finishReason"] = "STOP"
    meta: dict[str, Any] = {
        "promptTokenCount": u.input_tokens,
        "candidatesTokenCount": output_so_far,
        "totalTokenCount": u.input_tokens + output_so_far,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": u.input_tokens}],
    }
    if u.cached_tokens:
        meta["cachedContentTokenCount"] = u.cached_tokens
    return {"candidates": [cand], "usageMetadata": meta, "modelVersion": model, "responseId": rid}


def _gemini_generate(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    method, model = ctx.params["method"], ctx.params["model"]
    k = ctx.knobs
    if method == "countTokens":
        total = k.usage.input_tokens
        return _json_reply(
            200,
            {
                "totalTokens": total,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}],
            },
        )
    if not isinstance(body.get("contents"), list):
        return _bad_request(
            "google", "* GenerateContentRequest.contents: contents is not specified"
        )
    rid = _id("")
    if method == "generateContent":
        return _json_reply(
            200, _gemini_chunk(k.reply_text, model, rid, k, k.usage.output_tokens, True)
        )
    pieces = _pieces(k.reply_text, k.n_chunks)
    # candidatesTokenCount grows chunk by chunk: a reader must keep the last value, not add them
    counts = [round((i + 1) * k.usage.output_tokens / len(pieces)) for i in range(len(pieces))]
    chunks = [
        _gemini_chunk(p, model, rid, k, c, i == len(pieces) - 1)
        for i, (p, c) in enumerate(zip(pieces, counts, strict=True))
    ]
    if ctx.rec.query.get("alt") == ["sse"]:
        return _stream_reply("text/event-stream", (_sse(c) for c in chunks))

    def json_array() -> Iterator[bytes]:
        for i, c in enumerate(chunks):
            yield (b"[" if i == 0 else b",\r\n") + json.dumps(c).encode()
        yield b"]"

    return _stream_reply("application/json; charset=UTF-8", json_array())


def _gemini_models(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    def entry(m: str) -> dict[str, Any]:
        return {
            "name": f"models/{m}",
            "version": "001",
            "displayName": m,
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 8192,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
        }

    if "model" in ctx.params:
        if ctx.params["model"] not in fake.models:
            return _json_reply(
                404, _google_error(404, f"models/{ctx.params['model']} is not found", "NOT_FOUND")
            )
        return _json_reply(200, entry(ctx.params["model"]))
    return _json_reply(200, {"models": [entry(m) for m in fake.models]})


_GEMINI_METHODS = r":(?P<method>generateContent|streamGenerateContent|countTokens)"
_route(
    "POST",
    r"/(?:v1|v1beta|v1alpha)/models/(?P<model>[^/:]+)" + _GEMINI_METHODS,
    "gemini.generate",
    "google",
    "gemini",
)(_gemini_generate)
_route(
    "POST",
    _VERTEX + r"/google/models/(?P<model>[^/:]+)" + _GEMINI_METHODS,
    "vertex.gemini",
    "google",
    "google",
)(_gemini_generate)
_route("GET", r"/(?:v1beta|v1alpha)/models", "gemini.models", "google", "gemini")(_gemini_models)
_route("GET", r"/(?:v1beta|v1alpha)/models/(?P<model>[^/:]+)", "gemini.models", "google", "gemini")(
    _gemini_models
)


