"""The span of a request carries how its cost was found."""

from __future__ import annotations

from addons.spans import span_of
from candela_mitm.context import RequestContext
from candela_mitm.observability.spans import TraceContext


def test_span_carries_usage_source() -> None:
    c = RequestContext("proxy", "openai", "/v1/chat/completions", TraceContext.from_headers(None))
    assert span_of(c).usage_source is None
    c.usage_source, c.cost_usd = "reserved", 0.25
    span = span_of(c)
    assert span.usage_source == "reserved" and span.to_json()["usage_source"] == "reserved"
