"""Spans: one per proxied request, denied or not, kept for /_local/api/traces."""

from __future__ import annotations

import logging

from mitmproxy import http

from candela_mitm.context import RequestContext
from candela_mitm.observability.spans import Span, utc_now_iso
from candela_mitm.runtime import Runtime

from .accounting import account_flow
from .flowstate import after_answer, ctx_of

log = logging.getLogger("candela.spans")


def span_of(c: RequestContext) -> Span:
    plan = c.plan
    status = "ok"
    if c.denial_code:
        status = "denied"
    elif c.error or (c.status_code or 0) >= 400:
        status = "error"
    return Span(
        span_id=c.span_id,
        trace_id=c.trace.trace_id,
        parent_span_id=c.trace.parent_id,
        timestamp=utc_now_iso(),
        user=c.user,
        tenant=c.tenant,
        provider=(plan.upstream.spec.name if plan else c.provider),
        model=(plan.model if plan else None),
        input_tokens=c.usage.input_tokens,
        output_tokens=c.usage.output_tokens,
        cached_tokens=c.usage.cached_tokens,
        total_tokens=c.usage.total_tokens,
        cost_usd=c.cost_usd,
        usage_source=c.usage_source,
        duration_ms=c.elapsed_ms(),
        ttft_ms=c.ttft_ms(),
        status=status,
        http_status=c.status_code,
        error=c.denial_code or c.error,
        stream=bool(plan and plan.stream),
        attributes={
            **(c.workload or {}),
            **(
                {"provider_key_fingerprint": c.provider_key_fingerprint}
                if c.provider_key_fingerprint
                else {}
            ),
        },
    )


class Spans:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def _record(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or c.kind not in ("proxy", "chat"):
            return
        try:
            account_flow(self.rt, flow, c)
            if flow.response is not None and c.status_code is None:
                c.status_code = flow.response.status_code
            span = span_of(c)
            c.span = span
            self.rt.spans.add(span)
        except Exception:  # observability fails open
            log.exception("span not recorded")

    def response(self, flow: http.HTTPFlow) -> None:
        after_answer(self._record, flow)

    def error(self, flow: http.HTTPFlow) -> None:
        after_answer(self._record, flow)
