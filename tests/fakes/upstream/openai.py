"""OpenAI's wire format in the fake upstream: chat, Responses, embeddings, models (also Gemini's and LM Studio's OpenAI-compatible APIs)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

from candela_mitm.providers.usage import Usage

from .server import (
    FakeUpstream,
    _bad_request,
    _Ctx,
    _id,
    _json_reply,
    _openai_error,
    _pieces,
    _Reply,
    _route,
    _sse,
    _stream_reply,
)

# ------------------------------------------------------------------------------------------------
# OpenAI (also Gemini's /v1beta/openai, LM Studio and Ollama's /v1)


def _openai_usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_chat(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    if not body.get("model") or not isinstance(body.get("messages"), list):
        return _bad_request("openai", "'model' and 'messages' are required")
    model = str(body["model"])
    k = ctx.knobs
    cid, created = _id("chatcmpl-"), int(time.time())
    headers = [("x-request-id", _id("req_")), ("openai-processing-ms", "1")]
    if not body.get("stream"):
        answer: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": k.reply_text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _openai_usage(k.usage),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if k.omit_usage:
            del answer["usage"]
        return _json_reply(200, answer, headers)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    include_usage = include_usage and not k.omit_usage

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    def gen() -> Iterator[bytes]:
        yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
        for piece in _pieces(k.reply_text, k.n_chunks):
            yield chunk({"content": piece}, None)
        yield chunk({}, "stop")
        if include_usage:
            yield _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                    "choices": [],
                    "usage": _openai_usage(k.usage),
                }
            )
        yield b"data: [DONE]\n\n"

    return _stream_reply("text/event-stream; charset=utf-8", gen(), headers)


def _responses_usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.input_tokens + u.output_tokens,
    }


def _openai_responses(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    if not body.get("model") or "input" not in body:
        return _bad_request("openai", "'model' and 'input' are required")
    k = ctx.knobs
    rid, mid, created = _id("resp_"), _id("msg_"), int(time.time())

    def response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    def message(status: str, text: str) -> dict[str, Any]:
        content = (
            [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            if status == "completed"
            else []
        )
        return {
            "id": mid,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    headers = [("x-request-id", _id("req_"))]
    if body.get("background"):
        # queued: the answer carries no usage; GET /v1/responses/{id} serves it once it is over
        queued = {**response("queued", [], None), "background": True}
        with fake._lock:
            fake.objects[rid] = {
                **response("completed", [message("completed", k.reply_text)], _responses_usage(k.usage)),
                "background": True,
            }
        return _json_reply(200, queued, headers)
    if not body.get("stream"):
        return _json_reply(
            200,
            response("completed", [message("completed", k.reply_text)], _responses_usage(k.usage)),
            headers,
        )

    def gen() -> Iterator[bytes]:
        seq = iter(range(1_000_000))

        def ev(type_: str, **fields: Any) -> bytes:
            return _sse({"type": type_, "sequence_number": next(seq), **fields}, type_)

        yield ev("response.created", response=response("in_progress", [], None))
        yield ev("response.in_progress", response=response("in_progress", [], None))
        yield ev("response.output_item.added", output_index=0, item=message("in_progress", ""))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield ev(
            "response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part
        )
        for piece in _pieces(k.reply_text, k.n_chunks):
            yield ev(
                "response.output_text.delta",
                item_id=mid,
                output_index=0,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        yield ev(
            "response.output_text.done",
            item_id=mid,
            output_index=0,
            content_index=0,
            text=k.reply_text,
            logprobs=[],
        )
        yield ev(
            "response.content_part.done",
            item_id=mid,
            output_index=0,
            content_index=0,
            part={**part, "text": k.reply_text},
        )
        done = message("completed", k.reply_text)
        yield ev("response.output_item.done", output_index=0, item=done)
        yield ev(
            "response.completed", response=response("completed", [done], _responses_usage(k.usage))
        )

    return _stream_reply("text/event-stream; charset=utf-8", gen(), headers)


def _stored(fake: FakeUpstream, object_id: str, kind: str) -> _Reply:
    """An object the fake created, served back by id (404 in OpenAI's shape if unknown)."""
    with fake._lock:
        obj = fake.objects.get(object_id)
    if obj is None:
        return _json_reply(
            404,
            _openai_error(f"No {kind} found with id '{object_id}'.", "invalid_request_error", None),
        )
    return _json_reply(200, obj, [("x-request-id", _id("req_"))])


def _openai_response_get(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    return _stored(fake, ctx.params["id"], "response")


def _openai_run(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    """An Assistants run (openai.types.beta.threads.Run): queued, with no usage until it is over."""
    body = ctx.body
    if not isinstance(body.get("assistant_id"), str):
        return _bad_request("openai", "'assistant_id' is required")
    thread_id = ctx.params.get("thread_id") or _id("thread_")
    run_id, created = _id("run_"), int(time.time())

    def run(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": run_id,
            "object": "thread.run",
            "created_at": created,
            "assistant_id": body["assistant_id"],
            "thread_id": thread_id,
            "status": status,
            "started_at": None if status == "queued" else created,
            "expires_at": created + 600 if status == "queued" else None,
            "cancelled_at": None,
            "failed_at": None,
            "completed_at": created + 1 if status == "completed" else None,
            "required_action": None,
            "last_error": None,
            "model": body.get("model") or "gpt-4o-mini",
            "instructions": body.get("instructions") or "",
            "tools": [],
            "metadata": {},
            "incomplete_details": None,
            "usage": usage,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_prompt_tokens": body.get("max_prompt_tokens"),
            "max_completion_tokens": body.get("max_completion_tokens"),
            "truncation_strategy": {"type": "auto", "last_messages": None},
            "response_format": "auto",
            "tool_choice": "auto",
            "parallel_tool_calls": True,
        }

    with fake._lock:
        u = ctx.knobs.usage  # a run's usage (openai.types.beta.threads.run.Usage): three counts
        fake.objects[run_id] = run(
            "completed",
            {
                "prompt_tokens": u.input_tokens,
                "completion_tokens": u.output_tokens,
                "total_tokens": u.input_tokens + u.output_tokens,
            },
        )
    return _json_reply(200, run("queued", None), [("x-request-id", _id("req_"))])


def _openai_run_get(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    return _stored(fake, ctx.params["id"], "run")


def _multipart(ctx: _Ctx) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, by name."""
    from email.parser import BytesParser
    from email.policy import HTTP

    ctype = ctx.rec.headers.get("content-type", "")
    msg = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode() + ctx.rec.body
    )
    out: dict[str, bytes] = {}
    if msg.is_multipart():
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                out[name] = payload
    return out


def _file_object(fid: str, size: int, purpose: str, filename: str) -> dict[str, Any]:
    """openai.types.FileObject"""
    return {"id": fid, "object": "file", "bytes": size, "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None}


def _openai_file_upload(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    fields = _multipart(ctx)
    if "file" not in fields or "purpose" not in fields:
        return _bad_request("openai", "'file' and 'purpose' are required")
    fid = _id("file-")
    with fake._lock:
        fake.objects[fid] = {"content": fields["file"]}
    return _json_reply(
        200, _file_object(fid, len(fields["file"]), fields["purpose"].decode(), "batch.jsonl")
    )


def _openai_file_content(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    with fake._lock:
        obj = fake.objects.get(ctx.params["id"])
    if obj is None or "content" not in obj:
        return _stored(fake, ctx.params["id"], "file")
    return _Reply(200, obj["content"], [("Content-Type", "application/octet-stream")])


def _openai_batch(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    """POST /v1/batches: validating; GET serves it completed, with its output file (one chat
    completion per input line, each the knobs' usage) and the batch's usage (their sum)."""
    body = ctx.body
    with fake._lock:
        source = fake.objects.get(str(body.get("input_file_id")))
    if source is None or "content" not in source:
        return _json_reply(
            400, _openai_error("Input file not found", "invalid_request_error", None)
        )
    lines = [json.loads(x) for x in source["content"].splitlines() if x.strip()]
    k, created = ctx.knobs, int(time.time())
    bid, out_id = _id("batch_"), _id("file-")
    output = []
    for line in lines:
        model = line["body"]["model"]
        output.append(json.dumps({
            "id": _id("batch_req_"), "custom_id": line.get("custom_id"),
            "response": {"status_code": 200, "request_id": _id("req_"), "body": {
                "id": _id("chatcmpl-"), "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": k.reply_text},
                             "finish_reason": "stop"}],
                "usage": _openai_usage(k.usage)}},
            "error": None,
        }))
    n = len(lines)

    def batch(status: str, done: bool) -> dict[str, Any]:
        u = k.usage
        return {
            "id": bid, "object": "batch", "endpoint": body.get("endpoint"),
            "errors": None, "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"), "status": status,
            "output_file_id": out_id if done else None, "error_file_id": None,
            "created_at": created, "in_progress_at": created if done else None,
            "expires_at": created + 86400, "finalizing_at": created if done else None,
            "completed_at": created if done else None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": n, "completed": n if done else 0, "failed": 0},
            "metadata": body.get("metadata"),
            "model": lines[0]["body"]["model"] if lines else None,
            "usage": {
                "input_tokens": u.input_tokens * n,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.output_tokens * n,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": (u.input_tokens + u.output_tokens) * n,
            } if done else None,
        }

    with fake._lock:
        fake.objects[bid] = batch("completed", True)
        fake.objects[out_id] = {"content": ("\n".join(output) + "\n").encode()}
    return _json_reply(200, batch("validating", False))


def _openai_batch_get(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    return _stored(fake, ctx.params["id"], "batch")


def _openai_embeddings(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    if not body.get("model") or "input" not in body:
        return _bad_request("openai", "'model' and 'input' are required")
    inputs = (
        body["input"]
        if isinstance(body["input"], list)
        and body["input"]
        and not isinstance(body["input"][0], int)
        else [body["input"]]
    )
    data = []
    for i, item in enumerate(inputs):
        seed = hashlib.sha256(json.dumps(item).encode()).digest()
        vec = [b / 255.0 for b in seed[:8]]
        emb: Any = vec
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    u = ctx.knobs.usage
    return _json_reply(
        200,
        {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": u.input_tokens, "total_tokens": u.input_tokens},
        },
    )


def _openai_models(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    data = [
        {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"}
        for m in fake.models
    ]
    if "id" in ctx.params:
        if ctx.params["id"] not in fake.models:
            return _json_reply(
                404,
                _openai_error(
                    f"The model '{ctx.params['id']}' does not exist",
                    "invalid_request_error",
                    "model_not_found",
                ),
            )
        return _json_reply(200, next(d for d in data if d["id"] == ctx.params["id"]))
    return _json_reply(200, {"object": "list", "data": data})


_route("POST", r"/v1/chat/completions", "openai.chat", "openai", "openai")(_openai_chat)
_route("POST", r"/v1/responses", "openai.responses", "openai", "openai")(_openai_responses)
_route("GET", r"/v1/responses/(?P<id>[^/]+)", "openai.responses.retrieve", "openai", "openai")(
    _openai_response_get
)
_route("POST", r"/v1/threads/(?P<thread_id>[^/]+)/runs", "openai.runs", "openai", "openai")(
    _openai_run
)
_route("POST", r"/v1/threads/runs", "openai.runs", "openai", "openai")(_openai_run)
_route("POST", r"/v1/files", "openai.files", "openai", "openai")(_openai_file_upload)
_route("GET", r"/v1/files/(?P<id>[^/]+)/content", "openai.files.content", "openai", "openai")(
    _openai_file_content
)
_route("POST", r"/v1/batches", "openai.batches", "openai", "openai")(_openai_batch)
# OpenAI's batch ids start with batch_ (Gemini's /v1/batches/{id} is served by gemini.py)
_route("GET", r"/v1/batches/(?P<id>batch_[^/]+)", "openai.batches.retrieve", "openai", "openai")(
    _openai_batch_get
)
_route(
    "GET", r"/v1/threads/(?P<thread_id>[^/]+)/runs/(?P<id>[^/]+)", "openai.runs.retrieve",
    "openai", "openai",
)(_openai_run_get)
_route("POST", r"/v1/embeddings", "openai.embeddings", "openai", "openai")(_openai_embeddings)
# Gemini's OpenAI-compatible endpoint: the same wire format, Google credentials
_route("POST", r"/v1beta/openai/chat/completions", "gemini_openai.chat", "openai", "gemini_openai")(
    _openai_chat
)
_route("POST", r"/v1beta/openai/embeddings", "gemini_openai.embeddings", "openai", "gemini_openai")(
    _openai_embeddings
)
_route("GET", r"/v1/models", "openai.models", "openai", "openai")(_openai_models)
_route("GET", r"/v1/models/(?P<id>[^/]+)", "openai.models", "openai", "openai")(_openai_models)
_route("GET", r"/v1beta/openai/models", "gemini_openai.models", "openai", "gemini_openai")(
    _openai_models
)


