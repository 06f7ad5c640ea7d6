"""Flow state: the one RequestContext per flow, deny/answer, body decoding, and fail_closed."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.test import tflow

from candela_mitm import errors
from candela_mitm.addons import pipeline
from candela_mitm.addons.flowstate import (
    KEY,
    answer_json,
    answered,
    ctx_of,
    decoded_body,
    deny,
    fail_closed,
    note_failure,
    nothing_sent,
)
from candela_mitm.context import RequestContext
from candela_mitm.errors import StoreUnavailable
from candela_mitm.observability.spans import TraceContext

from .conftest import ALICE_KEY, make_flow, run_hooks


def with_context(flow):
    c = RequestContext(kind="proxy", provider="openai", rest="/v1/chat/completions",
                       trace=TraceContext.from_headers(None))
    flow.metadata[KEY] = c
    return c


def test_deny_answers_json_with_its_code_and_the_trace_headers():
    flow = make_flow("/proxy/openai/v1/chat/completions")
    c = with_context(flow)
    assert ctx_of(flow) is c and not answered(flow)
    deny(flow, errors.rate_limited(3, "2026-01-01T00:01:00Z", 42))
    assert answered(flow)
    r = flow.response
    assert r.status_code == 429 and r.headers["Content-Type"] == "application/json"
    assert r.headers["Retry-After"] == "42"
    assert r.headers["X-Candela-Span-Id"] == c.span_id
    assert r.headers["X-Candela-Trace-Id"] == c.trace.trace_id
    assert r.json()["error"] == "rate_limited" and r.json()["retry_after_s"] == 42
    assert (c.denial_code, c.status_code) == ("rate_limited", 429)


def test_answer_json_without_a_context():
    flow = make_flow("/anything")
    answer_json(flow, 200, {"ok": True}, {"X-Extra": "1"})
    assert ctx_of(flow) is None
    assert flow.response.json() == {"ok": True} and flow.response.headers["X-Extra"] == "1"
    assert "X-Candela-Span-Id" not in flow.response.headers


@pytest.mark.parametrize(
    "raw, encoding, limit, body, error",
    [
        (b'{"a": 1}', "", 100, b'{"a": 1}', None),
        (gzip.compress(b'{"a": 1}'), "gzip", 100, b'{"a": 1}', None),
        (gzip.compress(b"x" * 10_000), "gzip", 1_000, None, "payload_too_large"),  # a bomb
        (b"not gzip at all", "gzip", 100, None, "bad_request"),
    ],
)
def test_decoded_body(raw, encoding, limit, body, error):
    flow = make_flow("/proxy/openai/v1/chat/completions", raw=raw,
                     headers={"Content-Encoding": encoding} if encoding else {})
    with_context(flow)
    assert asyncio.run(decoded_body(flow, limit)) == body
    assert (flow.response.json()["error"] if flow.response else None) == error


class Gate:
    def __init__(self, exc):
        self.exc = exc

    @fail_closed
    def request(self, flow):
        raise self.exc

    @fail_closed
    async def requestheaders(self, flow):
        raise self.exc


@pytest.mark.parametrize("hook", ["request", "requestheaders"])
@pytest.mark.parametrize(
    "exc, reason",
    [(StoreUnavailable("down"), "the state store is unavailable"), (KeyError("x"), "an internal error")],
)
def test_a_hook_that_raises_denies_503_instead(tctx, hook, exc, reason):
    flow = make_flow("/proxy/openai/v1/chat/completions")
    with_context(flow)
    result = getattr(Gate(exc), hook)(flow)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    assert flow.response.status_code == 503
    assert flow.response.json()["error"] == "governance_unavailable"
    assert reason in flow.response.json()["message"]


def test_a_hook_that_raises_after_an_answer_keeps_the_answer_and_notes_the_error(tctx):
    flow = make_flow("/proxy/openai/v1/chat/completions")
    c = with_context(flow)
    flow.response = http.Response.make(200, b"{}")
    Gate(KeyError("x")).request(flow)
    assert flow.response.status_code == 200
    assert c.error == "Gate.request: KeyError"


def test_the_context_is_the_only_per_flow_state(tctx, runtime):
    """A request through the whole pipeline, forwarded and answered: one metadata key, and
    every attribute any addon set on the context is a declared field."""
    import dataclasses

    rt = runtime()
    addons = pipeline(rt)
    flow = make_flow("/proxy/openai/v1/chat/completions",
                     {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                     headers={"Authorization": f"Bearer {ALICE_KEY}"})

    async def main():
        await run_hooks(addons, flow, "requestheaders", "request")
        assert flow.response is None and flow.request.host == "upstream.test"
        flow.response = http.Response.make(
            200,
            b'{"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}',
            {"content-type": "application/json"},
        )
        await run_hooks(addons, flow, "responseheaders", "response")
        for a in addons:  # Upstream's timers
            if hasattr(a, "done"):
                a.done()

    asyncio.run(main())
    c = ctx_of(flow)
    assert set(flow.metadata) == {KEY}
    # slotted: an attribute that is not a declared field cannot be set at all
    assert not hasattr(c, "__dict__")
    assert set(RequestContext.__slots__) == {f.name for f in dataclasses.fields(RequestContext)}
    with pytest.raises(AttributeError):
        c.undeclared = 1
    # and the fields the addons filled in, end to end
    assert c.forwarded and c.finished and c.counted and c.audited
    assert (c.usage.input_tokens, c.usage.output_tokens) == (7, 3)
    assert c.span is not None and c.span.span_id == c.span_id
    assert c.reservation is None  # settled


def test_addons_write_only_declared_context_fields_and_one_metadata_key():
    """Read from the source: every `c.x = ...` / `ctx.x = ...` in an addon names a field of
    RequestContext, and flow.metadata is written under KEY only."""
    import ast
    import dataclasses
    from pathlib import Path

    import candela_mitm.addons as package

    declared = {f.name for f in dataclasses.fields(RequestContext)}
    written: set[str] = set()
    metadata_keys: set[str] = set()
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if (isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name)
                            and e.value.id in ("c", "ctx")):
                        written.add(e.attr)
                    if (isinstance(e, ast.Subscript) and isinstance(e.value, ast.Attribute)
                            and e.value.attr == "metadata"):
                        metadata_keys.add(ast.unparse(e.slice))
    assert {"principal", "plan", "reservation", "reserve_result", "counted", "span", "job"} <= written
    assert written - declared == set()
    assert metadata_keys == {"KEY"}


@pytest.mark.parametrize(
    ("tcp", "tls", "tls_setup", "unsent"),
    [
        (None, False, None, True),  # connection refused, unresolvable: never connected
        (1.0, False, None, False),  # connected over plain TCP: the request may have gone
        (1.0, True, None, True),  # TLS never completed: nothing was sent
        (1.0, True, 2.0, False),
    ],
)
def test_nothing_sent(tcp: float | None, tls: bool, tls_setup: float | None, unsent: bool) -> None:
    conn = tflow.tserver_conn()
    conn.timestamp_tcp_setup = tcp
    conn.tls = tls
    conn.timestamp_tls_setup = tls_setup
    assert nothing_sent(conn) is unsent


def _failed(forwarded: bool, connected: bool, first_byte: bool) -> RequestContext:
    f = tflow.tflow()
    c = RequestContext("proxy", "openai", "/v1/chat/completions", TraceContext.from_headers(None))
    c.forwarded = forwarded
    c.first_byte_at = 1.0 if first_byte else None
    f.server_conn.timestamp_tcp_setup = 1.0 if connected else None
    f.server_conn.tls = False
    f.error = mflow.Error("Connection refused" if not connected else "Client disconnected.")
    f.metadata[KEY] = c
    note_failure(f)
    return c


def test_note_failure() -> None:
    c = _failed(forwarded=True, connected=False, first_byte=False)
    assert c.upstream_unreached and c.error == "Connection refused"
    c = _failed(forwarded=True, connected=True, first_byte=False)
    assert not c.upstream_unreached and c.error == "Client disconnected."
    # an answer began: whatever the connection says now, the request reached the provider
    assert not _failed(forwarded=True, connected=False, first_byte=True).upstream_unreached
    assert not _failed(forwarded=False, connected=False, first_byte=False).upstream_unreached


def test_after_answer_runs_at_once_without_a_loop_and_after_the_hook_round_with_one():
    from candela_mitm.addons.flowstate import after_answer

    f = tflow.tflow()
    done: list[str] = []
    after_answer(lambda flow: done.append(flow.id), f)
    assert done == [f.id]

    async def main():
        after_answer(lambda flow: done.append("later"), f)
        done.append("hook returned")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert done == [f.id, "hook returned", "later"]


def test_a_flows_records_of_one_round_run_in_one_callback_in_order_each_apart():
    # Spans, Metrics and Telemetry record one answer: one loop callback for the three, after
    # the round; one that fails does not stop the next; a later round gets its own callback
    from candela_mitm.addons.flowstate import _run_after_answer, after_answer

    f, g = tflow.tflow(), tflow.tflow()
    with_context(f)
    with_context(g)
    done: list[str] = []

    def failing(flow):
        done.append("failing")
        raise RuntimeError("observability fails open")

    async def main():
        loop = asyncio.get_running_loop()
        scheduled: list[object] = []
        real = loop.call_soon
        loop.call_soon = lambda cb, *a, **k: scheduled.append(cb) or real(cb, *a, **k)  # type: ignore[method-assign]
        after_answer(lambda flow: done.append("spans"), f)
        after_answer(failing, f)
        after_answer(lambda flow: done.append("metrics " + flow.id[:4]), f)
        after_answer(lambda flow: done.append("other flow"), g)
        done.append("hook returned")
        assert scheduled.count(_run_after_answer) == 2  # one per flow
        await asyncio.sleep(0)
        after_answer(lambda flow: done.append("error round"), f)
        assert scheduled.count(_run_after_answer) == 3
        await asyncio.sleep(0)

    asyncio.run(main())
    assert done == ["hook returned", "spans", "failing", "metrics " + f.id[:4], "other flow",
                    "error round"]  # fmt: skip
    assert f.metadata[KEY].records_after_answer is None


@pytest.mark.parametrize(
    "fields, name",
    [
        ([], "RateLimit-Policy"),
        ([(b"ratelimit-policy", b"x")], "RateLimit-Policy"),
        ([(b"RATELIMIT-POLICY", b"")], "ratelimit-policy"),
        ([(b"content-type", b"a"), (b"RateLimit", b"b")], "RateLimit-Policy"),
        ([(b"x-\xc3\xa9", b"v")], "x-\u00e9"),
        ([(b"x-\xff", b"v")], "x-\udcff"),  # a raw byte, as mitmproxy decodes it
    ],
)
def test_has_field_is_in_headers(fields, name):
    from mitmproxy import http

    from candela_mitm.addons.flowstate import has_field

    headers = http.Headers(fields)
    assert has_field(headers, name) == (name in headers)


def test_only_when_makes_no_coroutine_for_a_flow_it_does_not_pick_and_denies_if_it_raises(tctx):
    from candela_mitm.addons.flowstate import only_when

    ran: list[str] = []

    class Hooked:
        def __init__(self, picks):
            self.picks = picks

        @only_when(lambda self, flow: self.picks(flow))
        @fail_closed
        async def request(self, flow):
            ran.append(flow.request.path)

    skipped = make_flow("/proxy/openai/v1/chat/completions")
    assert Hooked(lambda f: False).request(skipped) is None  # nothing to await
    picked = make_flow("/metrics")
    result = Hooked(lambda f: True).request(picked)
    assert asyncio.iscoroutine(result) and ran == []
    asyncio.run(result)
    assert ran == ["/metrics"]

    def broken(flow):
        raise KeyError("x")

    failing = make_flow("/proxy/openai/v1/chat/completions")
    with_context(failing)
    assert Hooked(broken).request(failing) is None
    assert failing.response.status_code == 503
    assert failing.response.json()["error"] == "governance_unavailable"
    assert ran == ["/metrics"]
