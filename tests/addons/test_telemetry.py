"""Telemetry addon: each proxied request's span exported once, a streamed body's model read as it
passes, and every failure counted and never raised into the flow (observability fails open)."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from candela_mitm.addons.flowstate import KEY
from candela_mitm.addons.spans import Spans
from candela_mitm.addons.telemetry import Telemetry, request_facts
from candela_mitm.context import RequestContext
from candela_mitm.observability.otel import ResponseFacts, StreamModel
from candela_mitm.observability.spans import TraceContext


class Export:
    """What Telemetry hands the OTLP exporter; `broken` raises instead."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.spans: list[tuple] = []
        self.closed = False

    def export(self, span, request, *, facts, trace_flags) -> None:
        if self.broken:
            raise RuntimeError("collector gone")
        self.spans.append((span, request, facts(), trace_flags))

    def shutdown(self) -> None:
        self.closed = True


def proxied(body: bytes = b'{"model": "gpt-4o-2024-08-06"}', **fields):
    f = tflow.tflow()
    f.response = http.Response.make(200, body, {"content-type": "application/json"})
    c = RequestContext(kind="proxy", provider="openai", rest="/v1/chat/completions",
                       trace=TraceContext.from_headers(None), **fields)
    f.metadata[KEY] = c
    return f, c


def errors(rt) -> float:
    return rt.metrics.observability_errors.labels("otlp")._value.get()


def test_request_facts_without_a_plan_name_the_route() -> None:
    _, c = proxied(denial_code="rate_limited")
    facts = request_facts(c)
    assert (facts.kind, facts.path, facts.route, facts.decision) == (
        "proxy", "/v1/chat/completions", "openai", "denied"
    )
    assert facts.server_address is None and facts.via is None


@pytest.mark.parametrize("hooks", [["response"], ["error"], ["response", "error"]])
def test_a_span_is_exported_once_with_the_model_its_body_names(tctx, runtime, hooks):
    rt = runtime()
    t = Telemetry(rt)
    t.export = export = Export()
    f, c = proxied()
    Spans(rt).response(f)  # Spans runs first in every hook: the span is on the context
    for hook in hooks:
        getattr(t, hook)(f)
    [(span, request, facts, _)] = export.spans
    assert span is c.span and request.route == "openai"
    assert facts == ResponseFacts(model="gpt-4o-2024-08-06")
    t.done()
    assert export.closed


def test_no_span_no_export(tctx, runtime):
    rt = runtime()
    t = Telemetry(rt)
    t.export = export = Export()
    f, _ = proxied()
    t.response(f)  # Spans made none (e.g. Candela's own routes)
    assert export.spans == []


def test_an_export_that_fails_is_counted_not_raised(tctx, runtime):
    rt = runtime()
    t = Telemetry(rt)
    t.export = Export(broken=True)
    f, _ = proxied()
    Spans(rt).response(f)
    before = errors(rt)
    t.response(f)
    assert errors(rt) == before + 1
    assert f.response.status_code == 200


def test_a_stream_is_sniffed_for_its_model_and_passes_unchanged(tctx, runtime):
    rt = runtime()
    t = Telemetry(rt)
    t.export = export = Export()
    f, c = proxied()
    seen: list[bytes] = []
    f.response.stream = lambda data: seen.append(data) or [data]
    t.responseheaders(f)
    chunk = b'data: {"model": "gpt-4o-mini", "choices": []}\n\n'
    assert f.response.stream(chunk) == [chunk] and seen == [chunk]
    assert isinstance(c.stream_model, StreamModel)
    Spans(rt).response(f)
    t.response(f)
    [(_, _, facts, _)] = export.spans
    assert facts.model == "gpt-4o-mini"


def test_without_an_exporter_nothing_is_wrapped(tctx, runtime):
    rt = runtime()
    t = Telemetry(rt)
    t.export = None
    f, c = proxied()
    inner = f.response.stream = lambda data: [data]
    t.responseheaders(f)
    assert f.response.stream is inner and c.stream_model is None
