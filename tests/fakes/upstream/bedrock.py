"""Bedrock in the fake upstream: InvokeModel (and its event stream), Converse, and SigV4 verification."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

from candela_mitm.providers.usage import Usage

from .anthropic import (
    _anthropic_events,
    _anthropic_message,
    _check_anthropic_body,
)
from .server import (
    ANTHROPIC_BEDROCK_VERSION,
    FakeUpstream,
    _bad_request,
    _Ctx,
    _id,
    _json_reply,
    _Knobs,
    _pieces,
    _Reply,
    _route,
    _stream_reply,
)

# ------------------------------------------------------------------------------------------------
# Bedrock


def _bedrock_metrics(k: _Knobs) -> dict[str, Any]:
    u = k.usage
    return {
        "inputTokenCount": u.input_tokens - u.cached_tokens,
        "outputTokenCount": u.output_tokens,
        "invocationLatency": 10,
        "firstByteLatency": 5,
        "cacheReadInputTokenCount": u.cached_tokens,
        "cacheWriteInputTokenCount": 0,
    }


def _bedrock_invoke(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    from candela_mitm.providers.eventstream import (
        encode_message,  # the other half of this module's contract
    )

    body = ctx.body
    err = _check_anthropic_body(body, ANTHROPIC_BEDROCK_VERSION, need_model=False)
    if err:
        return _bad_request("bedrock", err)
    k = ctx.knobs
    model, mid = ctx.params["model"], _id("msg_")
    rid = [("x-amzn-RequestId", str(uuid.uuid4()))]
    if ctx.params["op"] == "invoke":
        u = k.usage
        return _json_reply(
            200,
            _anthropic_message(model, k, mid),
            rid
            + [
                ("X-Amzn-Bedrock-Invocation-Latency", "10"),
                ("X-Amzn-Bedrock-Input-Token-Count", str(u.input_tokens - u.cached_tokens)),
                ("X-Amzn-Bedrock-Output-Token-Count", str(u.output_tokens)),
                ("X-Amzn-Bedrock-Cache-Read-Input-Token-Count", str(u.cached_tokens)),
                ("X-Amzn-Bedrock-Cache-Write-Input-Token-Count", "0"),
            ],
        )

    def gen() -> Iterator[bytes]:
        for name, obj in _anthropic_events(model, k, mid):
            if name == "ping":
                continue  # Bedrock does not relay Anthropic's pings
            if name == "message_stop":
                obj = {**obj, "amazon-bedrock-invocationMetrics": _bedrock_metrics(k)}
            payload = {
                "bytes": base64.b64encode(json.dumps(obj).encode()).decode(),
                "p": "abcdefgh",
            }
            yield encode_message(_event_headers("chunk"), json.dumps(payload).encode())

    return _stream_reply(
        "application/vnd.amazon.eventstream",
        gen(),
        rid + [("X-Amzn-Bedrock-Content-Type", "application/json")],
    )


def _event_headers(event_type: str) -> dict[str, str]:
    return {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }


def _converse_usage(u: Usage) -> dict[str, Any]:
    return {
        "inputTokens": u.input_tokens - u.cached_tokens,
        "outputTokens": u.output_tokens,
        "totalTokens": u.input_tokens + u.output_tokens,
        "cacheReadInputTokens": u.cached_tokens,
        "cacheWriteInputTokens": 0,
    }


def _bedrock_converse(fake: FakeUpstream, ctx: _Ctx) -> _Reply:
    from candela_mitm.providers.eventstream import encode_message

    body = ctx.body
    if not isinstance(body.get("messages"), list):
        return _bad_request("bedrock", "messages: required")
    k = ctx.knobs
    rid = [("x-amzn-RequestId", str(uuid.uuid4()))]
    if ctx.params["op"] == "converse":
        return _json_reply(
            200,
            {
                "output": {"message": {"role": "assistant", "content": [{"text": k.reply_text}]}},
                "stopReason": "end_turn",
                "usage": _converse_usage(k.usage),
                "metrics": {"latencyMs": 10},
            },
            rid,
        )

    def gen() -> Iterator[bytes]:
        def ev(name: str, obj: dict[str, Any]) -> bytes:
            return encode_message(_event_headers(name), json.dumps({**obj, "p": "abcd"}).encode())

        yield ev("messageStart", {"role": "assistant"})
        for piece in _pieces(k.reply_text, k.n_chunks):
            yield ev("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
        yield ev("contentBlockStop", {"contentBlockIndex": 0})
        yield ev("messageStop", {"stopReason": "end_turn"})
        yield ev("metadata", {"usage": _converse_usage(k.usage), "metrics": {"latencyMs": 10}})

    return _stream_reply("application/vnd.amazon.eventstream", gen(), rid)


_BEDROCK = r"/model/(?P<model>[^/]+)/(?P<op>"
_route(
    "POST", _BEDROCK + r"invoke|invoke-with-response-stream)", "bedrock.invoke", "bedrock", "sigv4"
)(_bedrock_invoke)
_route("POST", _BEDROCK + r"converse|converse-stream)", "bedrock.converse", "bedrock", "sigv4")(
    _bedrock_converse
)


