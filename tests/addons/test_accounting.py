"""Accounting: the answer streamed or buffered through its processor, priced once it is whole."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from candela_mitm.addons.accounting import Accounting
from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.router import Router

from .conftest import ALICE_KEY, make_flow, run_hooks

USAGE = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}


def chat(stream: bool = False):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return make_flow(
        "/proxy/openai/v1/chat/completions", body, headers={"Authorization": f"Bearer {ALICE_KEY}"}
    )


def answered(f, body: bytes, ctype: str, forwarded: bool = True) -> None:
    ctx_of(f).forwarded = forwarded
    f.response = http.Response.make(200, body, {"content-type": ctype, "content-length": str(len(body))})


def run(rt, f, answer) -> Accounting:
    accounting = Accounting(rt)
    addons = [Router(rt), Auth(rt), accounting]

    async def main() -> None:
        await run_hooks(addons, f, "requestheaders", "request")
        assert f.response is None
        answer(f)
        await run_hooks(addons, f, "responseheaders")
        c = ctx_of(f)
        if c.feed_pending is not None:
            c.feed_pending()
        await run_hooks(addons, f, "response")

    asyncio.run(main())
    return accounting


def test_a_json_answer_is_read_whole_and_priced_from_its_usage(tctx, runtime):
    rt = runtime()
    f = chat()
    body = json.dumps({"id": "x", "choices": [], "usage": USAGE}).encode()
    run(rt, f, lambda f: answered(f, body, "application/json"))
    c = ctx_of(f)
    assert f.response.stream is False  # buffered: every hook sees it before the client
    assert (c.usage.input_tokens, c.usage.output_tokens) == (1000, 100) and c.processor.reported
    assert c.finished and c.status_code == 200 and c.first_byte_at is not None
    assert c.cost_usd == 0  # nothing reserved (no Budget in this chain): nothing is charged
    assert f.response.headers["X-Candela-Span-Id"] == c.span_id
    assert f.response.content == body  # not translated: passed as it came


def test_a_stream_passes_through_its_processor_without_a_length(tctx, runtime):
    rt = runtime()
    f = chat(stream=True)
    events = [
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"choices": [], "usage": USAGE},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    def answer(f):
        answered(f, body, "text/event-stream")

    accounting = Accounting(rt)
    addons = [Router(rt), Auth(rt), accounting]

    async def main() -> None:
        await run_hooks(addons, f, "requestheaders", "request")
        answer(f)
        await run_hooks(addons, f, "responseheaders")
        c = ctx_of(f)
        assert callable(f.response.stream) and f.response.stream is c.processor
        assert "content-length" not in f.response.headers
        # Candela asked for the usage chunk; the client did not, so it never sees it
        [passed] = f.response.stream(body)
        assert f.response.stream(b"") == []
        assert b'"usage"' not in passed and passed.startswith(b"data: ") and b"[DONE]" in passed
        await run_hooks(addons, f, "response")

    asyncio.run(main())
    c = ctx_of(f)
    assert (c.usage.input_tokens, c.usage.output_tokens) == (1000, 100) and c.processor.reported
    assert c.processor.observed_output == 1  # "Hi", counted as it passed


@pytest.mark.parametrize(
    "status, ctype, extra, taken",
    [
        (200, "application/json", {}, True),  # the type the last answer had: made ahead
        (201, "application/json", {}, True),
        (200, "application/json; charset=utf-8", {}, False),  # another type: made for it
        (500, "application/json", {}, False),  # an error: chosen by its status too
        (200, "application/json", {"x-amzn-bedrock-input-token-count": "7"}, False),  # counts
    ],
)
def test_the_answers_processor_is_made_while_the_upstream_works(
    tctx, runtime, status, ctype, extra, taken
):
    """Issue 21: once a request is on its way, Accounting.meanwhile makes the processor of
    the content type its upstream's last answer had; the answer takes it only when it is
    that type, below 400 and without Bedrock's token headers, and is metered all the same."""
    rt = runtime()
    accounting = Accounting(rt)
    addons = [Router(rt), Auth(rt), accounting]
    body = json.dumps({"id": "x", "choices": [], "usage": USAGE}).encode()

    async def one(f, answer, ahead_type) -> None:
        await run_hooks(addons, f, "requestheaders", "request")
        ctx_of(f).forwarded = True
        accounting.meanwhile(f)  # as Upstream runs it, once the request is written
        ahead = ctx_of(f).processor_ahead
        assert (ahead and ahead[0]) == ahead_type
        answer(f)
        await run_hooks(addons, f, "responseheaders")
        c = ctx_of(f)
        assert c.processor_ahead is None
        if ahead is not None:
            assert (c.processor is ahead[1]) is taken
        c.feed_pending()
        await run_hooks(addons, f, "response")

    def answer(f):
        answered(f, body, ctype)
        f.response.status_code = status
        f.response.headers.update(extra)

    f = chat()
    asyncio.run(one(chat(), lambda f: answered(f, body, "application/json"), None))  # learned
    asyncio.run(one(f, answer, "application/json"))
    c = ctx_of(f)
    if status < 400:
        assert (c.usage.input_tokens, c.usage.output_tokens) == (1000, 100) and c.processor.reported


def test_what_was_never_forwarded_is_not_processed(tctx, runtime):
    rt = runtime()
    f = chat()
    run(rt, f, lambda f: answered(f, b"{}", "application/json", forwarded=False))
    c = ctx_of(f)
    assert c.processor is None and c.feed_pending is None
    assert c.usage is None or c.usage.total_tokens == 0
    assert c.cost_usd == 0


def test_flows_without_a_context_are_left_alone(tctx, runtime):
    rt = runtime()
    f = tflow.tflow(resp=True)
    accounting = Accounting(rt)
    accounting.responseheaders(f)
    accounting.response(f)
    accounting.error(f)
    assert "X-Candela-Span-Id" not in f.response.headers


_FIELD_TABLE = [
    [],
    [(b"Content-Type", b"application/json")],
    [(b"x-candela-span-id", b"old"), (b"Content-Type", b"application/json"),
     (b"X-CANDELA-SPAN-ID", b"older")],
    [(b"x-amzn-bedrock-input-token-count", b"12"), (b"X-Amzn-Bedrock-Output-Token-Count", b"3")],
    [(b"x-amzn-bedrock-input-token-count", b"12"), (b"x-amzn-bedrock-input-token-count", b"4")],
    [(b"x-amzn-bedrock-output-token-count", b" 7 ")],
]


@pytest.mark.parametrize("fields", _FIELD_TABLE)
def test_set_headers_is_header_assignments(fields) -> None:

    from candela_mitm.addons.flowstate import set_headers

    values = {"X-Candela-Span-Id": "s", "X-Candela-Trace-Id": "t\u00e9"}
    a, b = tflow.tflow(resp=True), tflow.tflow(resp=True)
    a.response.headers.fields = b.response.headers.fields = tuple(fields)
    for k, v in values.items():
        a.response.headers[k] = v
    set_headers(b.response.headers, values)
    assert b.response.headers.fields == a.response.headers.fields


@pytest.mark.parametrize("fields", _FIELD_TABLE)
def test_metered_headers_give_the_usage_the_headers_give(fields) -> None:

    from candela_mitm.addons.accounting import metered_headers
    from candela_mitm.providers.usage import usage_from_bedrock_headers

    f = tflow.tflow(resp=True)
    f.response.headers.fields = tuple(fields)
    h = f.response.headers
    assert usage_from_bedrock_headers(metered_headers(h)) == usage_from_bedrock_headers(h)
