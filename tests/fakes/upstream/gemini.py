"""Gemini's native API in the fake upstream: generateContent, streamGenerateContent, countTokens, models (Google AI and Vertex)."""

from __future__ import annotations

import json
import time
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


_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"


def _gemini_batch(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    """models/{model}:batchGenerateContent with inlined requests: a long-running operation over a
    GenerateContentBatch, pending; GET batches/{id} serves it succeeded, each inlined response
    with its usageMetadata (the knobs' usage per request)."""
    batch = ctx.body.get("batch")
    cfg = batch.get("inputConfig") or batch.get("input_config") if isinstance(batch, dict) else None
    reqs = (cfg or {}).get("requests") if isinstance(cfg, dict) else None
    items = reqs.get("requests") if isinstance(reqs, dict) else None
    if not isinstance(items, list) or not items:
        return _bad_request("google", "* batch.input_config.requests: requests is not specified")
    model, k = ctx.params["model"], ctx.knobs
    bid = _id("")
    name = f"batches/{bid}"
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())

    def operation(state: str, output: dict[str, Any] | None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "@type": _BATCH_TYPE,
            "model": f"models/{model}",
            "displayName": str(batch.get("displayName") or batch.get("display_name") or name),
            "createTime": now,
            "updateTime": now,
            "batchStats": {"requestCount": str(len(items))},
            "state": state,
            "name": name,
        }
        if output is not None:
            meta["output"] = output
            meta["endTime"] = now
        return {"name": name, "metadata": meta, **({"done": True} if output is not None else {})}

    responses = [
        {
            "response": _gemini_chunk(k.reply_text, model, _id(""), k, k.usage.output_tokens, True),
            **({"metadata": item["metadata"]} if isinstance(item, dict) and "metadata" in item else {}),
        }
        for item in items
    ]
    with fake._lock:
        fake.objects[bid] = operation(
            "BATCH_STATE_SUCCEEDED", {"inlinedResponses": {"inlinedResponses": responses}}
        )
    return _json_reply(200, operation("BATCH_STATE_PENDING", None))


def _gemini_batch_get(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    with fake._lock:
        op = fake.objects.get(ctx.params["id"])
    if op is None:
        return _json_reply(
            404, _google_error(404, f"batches/{ctx.params['id']} is not found", "NOT_FOUND")
        )
    return _json_reply(200, op)


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
_route(
    "POST",
    r"/(?:v1|v1beta)/models/(?P<model>[^/:]+):batchGenerateContent",
    "gemini.batch",
    "google",
    "gemini",
)(_gemini_batch)
_route("GET", r"/(?:v1|v1beta)/batches/(?P<id>[^/:]+)", "gemini.batch.get", "google", "gemini")(
    _gemini_batch_get
)
_route("GET", r"/(?:v1beta|v1alpha)/models", "gemini.models", "google", "gemini")(_gemini_models)
_route("GET", r"/(?:v1beta|v1alpha)/models/(?P<model>[^/:]+)", "gemini.models", "google", "gemini")(
    _gemini_models
)


