"""Ollama's native API in the fake upstream: chat, generate, tags, version, pull."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from .server import (
    FakeUpstream,
    _bad_request,
    _Ctx,
    _json_reply,
    _Knobs,
    _now_iso,
    _pieces,
    _Reply,
    _route,
    _stream_reply,
)

# ------------------------------------------------------------------------------------------------
# Ollama native


def _ollama_final(model: str, k: _Knobs) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": _now_iso(),
        "done": True,
        "done_reason": "stop",
        "total_duration": 1_000_000,
        "load_duration": 100_000,
        "prompt_eval_count": k.usage.input_tokens,
        "prompt_eval_duration": 200_000,
        "eval_count": k.usage.output_tokens,
        "eval_duration": 700_000,
    }


def _ollama_generate(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    if not body.get("model"):
        return _bad_request("ollama", "model is required")
    model, k = str(body["model"]), ctx.knobs
    chat = ctx.params["op"] == "chat"

    def part(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}

    if body.get("stream") is False:
        return _json_reply(200, {**_ollama_final(model, k), **part(k.reply_text)})

    def gen() -> Iterator[bytes]:
        for piece in _pieces(k.reply_text, k.n_chunks):
            yield (
                json.dumps(
                    {"model": model, "created_at": _now_iso(), **part(piece), "done": False}
                ).encode()
                + b"\n"
            )
        yield json.dumps({**_ollama_final(model, k), **part("")}).encode() + b"\n"

    return _stream_reply("application/x-ndjson", gen())


def _ollama_tags(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    models = [
        {
            "name": m,
            "model": m,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 2019393189,
            "digest": hashlib.sha256(m.encode()).hexdigest(),
            "details": {
                "format": "gguf",
                "family": "llama",
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        }
        for m in fake.models
    ]
    return _json_reply(200, {"models": models})


def _ollama_version(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    return _json_reply(200, {"version": "0.6.0"})


def _ollama_pull(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    body = ctx.body
    name = body.get("model") or body.get("name")
    if not name:
        return _bad_request("ollama", "model is required")
    if body.get("stream") is False:
        return _json_reply(200, {"status": "success"})
    digest = "sha256:" + hashlib.sha256(str(name).encode()).hexdigest()
    total, n = 4096, max(1, ctx.knobs.n_chunks)

    def gen() -> Iterator[bytes]:
        yield b'{"status":"pulling manifest"}\n'
        for i in range(n + 1):
            line = {
                "status": f"pulling {digest[7:19]}",
                "digest": digest,
                "total": total,
                "completed": total * i // n,
            }
            yield json.dumps(line).encode() + b"\n"
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            yield json.dumps({"status": status}).encode() + b"\n"

    return _stream_reply("application/x-ndjson", gen())


_route("POST", r"/api/(?P<op>chat|generate)", "ollama.generate", "ollama", "none")(_ollama_generate)
_route("GET", r"/api/tags", "ollama.tags", "ollama", "none")(_ollama_tags)
_route("GET", r"/api/version", "ollama.version", "ollama", "none")(_ollama_version)
_route("POST", r"/api/pull", "ollama.pull", "ollama", "none")(_ollama_pull)
