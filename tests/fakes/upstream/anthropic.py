"""Anthropic's Messages API in the fake upstream: direct, count_tokens, models, and Claude on Vertex (rawPredict)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

from candela_mitm.providers.usage import Usage

from .server import (
    _VERTEX,
    ANTHROPIC_VERTEX_VERSION,
    FakeUpstream,
    _bad_request,
    _Ctx,
    _id,
    _json_reply,
    _Knobs,
    _named,
    _pieces,
    _Reply,
    _route,
    _sse,
    _stream_reply,
)

# ------------------------------------------------------------------------------------------------
# Anthropic Messages (direct, Vertex rawPredict, Bedrock invoke)


def _anthropic_usage(u: Usage, output_tokens: int) -> dict[str, Any]:
    # Anthropic counts cache reads apart from input_tokens; the fake's Usage includes them
    return {
        "input_tokens": u.input_tokens - u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": output_tokens,
    }


def _anthropic_message(model: str, k: _Knobs, mid: str) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": k.reply_text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(k.usage, k.usage.output_tokens),
    }


def _anthropic_events(model: str, k: _Knobs, mid: str) -> Iterator[tuple[str, dict[str, Any]]]:
    start = {
        **_anthropic_message(model, k, mid),
        "content": [],
        "stop_reason": None,
        "usage": _anthropic_usage(k.usage, 1),
    }
    yield "message_start", {"type": "message_start", "message": start}
    yield (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield "ping", {"type": "ping"}
    for piece in _pieces(k.reply_text, k.n_chunks):
        yield (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": k.usage.output_tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def _check_anthropic_body(
    body: dict[str, Any], version: str | None, need_model: bool
) -> str | None:
    if need_model and not body.get("model"):
        return "model: Field required"
    if not isinstance(body.get("messages"), list):
        return "messages: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    # The platforms document one value; anthropic SDK 2.x sends its API date there instead
    # (AnthropicVertex/AnthropicBedrock 2.12: "2026-10-21"), so a date is accepted as well.
    got = body.get("anthropic_version")
    if version is not None and got != version and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(got)):
        return f"anthropic_version: must be {version}"
    return None


def _anthropic_messages(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    err = _check_anthropic_body(body, None, need_model=True)
    if err:
        return _bad_request("anthropic", err)
    return _anthropic_answer(str(body["model"]), bool(body.get("stream")), ctx.knobs)


def _anthropic_answer(model: str, stream: bool, k: _Knobs) -> _Reply:
    mid = _id("msg_")
    headers = [("request-id", _id("req_"))]
    if not stream:
        return _json_reply(200, _anthropic_message(model, k, mid), headers)
    return _stream_reply(
        "text/event-stream; charset=utf-8",
        (_sse(o, e) for e, o in _anthropic_events(model, k, mid)),
        headers,
    )


def _anthropic_count(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    return _json_reply(200, {"input_tokens": ctx.knobs.usage.input_tokens})


def _anthropic_models(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
        for m in fake.models
    ]
    return _json_reply(
        200,
        {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        },
    )


def _vertex_anthropic(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    err = _check_anthropic_body(body, ANTHROPIC_VERTEX_VERSION, need_model=False)
    if err:
        return _bad_request("anthropic", err)
    stream = ctx.params["method"] == "streamRawPredict"
    if stream != bool(body.get("stream")):
        return _bad_request(
            "anthropic", f"{ctx.params['method']} wants stream={str(stream).lower()}"
        )
    return _anthropic_answer(ctx.params["model"], stream, ctx.knobs)


_named("anthropic.models")(_anthropic_models)  # GET /v1/models with an anthropic-version
def _batch_object(
    bid: str, n: int, ended: bool, results_url: str | None
) -> dict[str, Any]:
    """A MessageBatch (anthropic.types.messages.MessageBatch)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    counts = {"processing": 0 if ended else n, "succeeded": n if ended else 0, "errored": 0,
              "canceled": 0, "expired": 0}
    return {
        "id": bid,
        "type": "message_batch",
        "processing_status": "ended" if ended else "in_progress",
        "request_counts": counts,
        "ended_at": now if ended else None,
        "created_at": now,
        "expires_at": now,
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": results_url,
    }


def _anthropic_batch(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    """POST /v1/messages/batches: in progress; GET serves it ended, its results one line per
    request (each a succeeded Message with the knobs' usage, under the request's model)."""
    reqs = ctx.body.get("requests")
    if not isinstance(reqs, list) or not reqs:
        return _bad_request("anthropic", "requests: Field required")
    bid = _id("msgbatch_")
    k = ctx.knobs
    lines = []
    for req in reqs:
        params = req.get("params") or {}
        lines.append(json.dumps({
            "custom_id": req.get("custom_id"),
            "result": {"type": "succeeded",
                       "message": _anthropic_message(str(params.get("model")), k, _id("msg_"))},
        }))
    host = ctx.rec.headers.get("host", "api.anthropic.com")
    results_url = f"http://{host}/v1/messages/batches/{bid}/results"
    with fake._lock:
        fake.objects[bid] = _batch_object(bid, len(reqs), True, results_url)
        fake.objects[bid + "/results"] = {"jsonl": "\n".join(lines) + "\n"}
    return _json_reply(200, _batch_object(bid, len(reqs), False, None))


def _anthropic_batch_get(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    key = ctx.params["id"] + ("/results" if ctx.rec.route_path.endswith("/results") else "")
    with fake._lock:
        obj = fake.objects.get(key)
    if obj is None:
        return _json_reply(404, {"type": "error", "error": {"type": "not_found_error",
                                                           "message": "Not found"}})
    if "jsonl" in obj:
        return _Reply(200, obj["jsonl"].encode(), [("Content-Type", "application/x-jsonl")])
    return _json_reply(200, obj)


_route("POST", r"/v1/messages", "anthropic.messages", "anthropic", "anthropic")(_anthropic_messages)
_route("POST", r"/v1/messages/batches", "anthropic.batches", "anthropic", "anthropic")(
    _anthropic_batch
)
_route("GET", r"/v1/messages/batches/(?P<id>[^/]+)", "anthropic.batches.get", "anthropic", "anthropic")(
    _anthropic_batch_get
)
_route(
    "GET", r"/v1/messages/batches/(?P<id>[^/]+)/results", "anthropic.batches.results",
    "anthropic", "anthropic",
)(_anthropic_batch_get)
_route("POST", r"/v1/messages/count_tokens", "anthropic.count_tokens", "anthropic", "anthropic")(
    _anthropic_count
)
_route(
    "POST",
    _VERTEX + r"/anthropic/models/(?P<model>[^/:]+):(?P<method>rawPredict|streamRawPredict)",
    "vertex.anthropic",
    "anthropic",
    "google",
)(_vertex_anthropic)


