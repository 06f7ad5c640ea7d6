"""Spans addon: one span per proxied request, denied or not; observability fails open."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from candela_mitm.addons.flowstate import KEY
from candela_mitm.addons.spans import Spans, span_of
from candela_mitm.context import RequestContext
from candela_mitm.observability.spans import TraceContext

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def proxied(kind="proxy", **fields):
    f = tflow.tflow()
    f.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
    c = RequestContext(kind=kind, provider="openai", rest="/v1/chat/completions",
                       trace=TraceContext.from_headers(PARENT), **fields)
    f.metadata[KEY] = c
    return f, c


@pytest.mark.parametrize(
    "fields, status, error",
    [
        ({}, "ok", None),
        ({"status_code": 200}, "ok", None),
        ({"denial_code": "rate_limited", "status_code": 429}, "denied", "rate_limited"),
        ({"error": "upstream_timeout", "status_code": 504}, "error", "upstream_timeout"),
        ({"status_code": 404}, "error", None),  # the provider's own 4xx
        ({"status_code": 500}, "error", None),
        # a denial wins over the error it may also carry
        ({"denial_code": "budget_exceeded", "error": "x"}, "denied", "budget_exceeded"),
    ],
)
def test_span_status(fields, status, error):
    _, c = proxied(**fields)
    s = span_of(c)
    assert (s.status, s.error) == (status, error)
    assert s.span_id == c.span_id and s.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert s.parent_span_id == "b7ad6b7169203331"  # the caller's traceparent
    assert s.provider == "openai" and s.model is None  # not planned: the route's name


@pytest.mark.parametrize("hook", ["response", "error"])
def test_a_proxied_request_gets_one_span(tctx, runtime, hook):
    rt = runtime()
    f, c = proxied()
    getattr(Spans(rt), hook)(f)
    [s] = rt.spans.recent()
    assert s is c.span and s.span_id == c.span_id
    assert s.http_status == 200 and c.status_code == 200  # read from the response
    assert c.finished  # the usage was accounted before the span read it


@pytest.mark.parametrize("kind", ["health", "models", "traces", "local", "admin", "metrics", "not_found"])
def test_candelas_own_routes_get_no_span(tctx, runtime, kind):
    rt = runtime()
    f, c = proxied(kind=kind)
    Spans(rt).response(f)
    assert rt.spans.recent() == [] and c.span is None


def test_a_span_that_cannot_be_stored_fails_open(tctx, runtime, monkeypatch):
    rt = runtime()

    def broken(span):
        raise RuntimeError("full")

    monkeypatch.setattr(rt.spans, "add", broken)
    f, c = proxied()
    Spans(rt).response(f)  # no exception: a span is observability
    assert f.response.status_code == 200 and c.error is None


def test_span_carries_usage_source() -> None:
    c = RequestContext("proxy", "openai", "/v1/chat/completions", TraceContext.from_headers(None))
    assert span_of(c).usage_source is None
    c.usage_source, c.cost_usd = "reserved", 0.25
    span = span_of(c)
    assert span.usage_source == "reserved" and span.to_json()["usage_source"] == "reserved"


def test_under_the_event_loop_the_span_is_recorded_once_the_hook_round_is_over(tctx, runtime):
    """The span (like the metrics and the OTLP export) is observability: recorded after the
    response hooks have returned (mitmproxy then writes the answer), before the loop handles
    anything else."""
    import asyncio

    rt = runtime()
    f, c = proxied()
    seen: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        Spans(rt).response(f)
        seen.append(len(rt.spans.recent()))  # the hook returned: not yet
        ready = loop.create_future()
        loop.call_soon(ready.set_result, None)  # queued after it: it runs first
        await ready
        seen.append(len(rt.spans.recent()))

    asyncio.run(main())
    assert seen == [0, 1] and rt.spans.recent()[0] is c.span
