"""Telemetry: each proxied request's span exported over OTLP (observability/otel.py), fail-open."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from mitmproxy import http

from candela_mitm.context import RequestContext
from candela_mitm.errors import ConfigError
from candela_mitm.observability.otel import (
    RequestFacts,
    ResponseFacts,
    StreamModel,
    TraceExport,
    facts_from_bytes,
)
from candela_mitm.observability.spans import Span
from candela_mitm.runtime import Runtime

from .flowstate import after_answer, ctx_of

log = logging.getLogger("candela.telemetry")


def request_facts(c: RequestContext) -> RequestFacts:
    plan = c.plan
    upstream = plan.upstream if plan else None
    return RequestFacts(
        kind=c.kind,
        path=plan.path if plan else c.rest,
        route=upstream.name if upstream else c.provider,
        server_address=upstream.host if upstream else None,
        server_port=upstream.port if upstream else None,
        client_address=c.client_address,
        intercepted=c.intercepted,
        via=getattr(c.principal, "via", None),
        decision="denied" if c.denial_code else "allowed",
    )


class Telemetry:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        errors = self._errors = rt.metrics.observability_errors.labels("otlp")
        self.export: TraceExport | None = None
        try:
            self.export = TraceExport.from_config(
                rt.config.telemetry,
                service_name="candela-server" if rt.command == "server" else "candela",
                on_failure=errors.inc,
            )
        except (ConfigError, ValueError) as e:  # an OTEL_* variable we cannot honour: fail open
            errors.inc()
            log.warning("OpenTelemetry export is off: %s", e)  # an error would stop mitmproxy
        # export off (the default): its flow hooks do nothing, and are not called
        self.idle_hooks = (
            frozenset({"responseheaders", "response", "error"})
            if self.export is None
            else frozenset()
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed body is gone by the end: read the model it names as it passes."""
        resp = flow.response
        c = ctx_of(flow)
        if self.export is None or resp is None or c is None or not callable(resp.stream):
            return
        inner: Callable[[bytes], Any] = resp.stream
        sniff = c.stream_model = StreamModel()

        def stream(data: bytes) -> Iterable[bytes] | bytes:
            try:
                sniff.look(data)
            except Exception:  # never into the stream: it would cut the client's response
                self._errors.inc()
            return inner(data)

        resp.stream = stream

    def _export(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if self.export is None or c is None:
            return
        span = c.span  # set by Spans, which runs first in every hook
        if not isinstance(span, Span) or c.exported:
            return
        c.exported = True  # response then error: exported once
        resp = flow.response
        # a streamed body is gone by now, a compressed one is not worth decoding again
        body = None
        if resp is not None and not (c.plan and c.plan.stream) and not c.denial_code:
            if "content-encoding" not in resp.headers:
                body = resp.raw_content
        content_type = resp.headers.get("content-type", "") if resp is not None else ""
        sniff = c.stream_model

        def facts() -> ResponseFacts:
            if isinstance(sniff, StreamModel):
                return ResponseFacts(model=sniff.model)
            return facts_from_bytes(body, content_type)

        try:
            self.export.export(span, request_facts(c), facts=facts, trace_flags=c.trace.flags)
        except Exception:  # observability fails open: counted, never raised into the flow
            self._errors.inc()
            log.debug("span not exported", exc_info=True)

    def response(self, flow: http.HTTPFlow) -> None:
        if self.export is not None:  # off (the default): nothing to schedule
            after_answer(self._export, flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.export is not None:
            after_answer(self._export, flow)

    def done(self) -> None:
        if self.export is not None:
            self.export.shutdown()
