"""Metrics: Prometheus counters for every proxied request, and GET /metrics."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from candela_mitm.governance.accounting import account
from candela_mitm.runtime import Runtime

from .flowstate import answered, ctx_of


class Metrics:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        m = rt.metrics
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

        def refresh() -> None:
            st = rt.audit.stats()
            m.audit_backlog.set(st.backlog)
            for name, ms in st.mirrors.items():
                m.audit_sink_errors.labels(name).set(getattr(ms, "errors", 0))
                m.audit_mirror_lag.labels(name).set(getattr(ms, "lag", 0))

        m.on_scrape(refresh)
        # candela_bypass_attempts_total: this proxy's refusals and sandboxes', from the ledger
        m.follow_audit(rt.audit.db_path)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None and c.kind == "metrics" and not answered(flow):
            body, ctype = self.rt.metrics.render()
            flow.response = http.Response.make(200, body, {"Content-Type": ctype})

    def _labels(self, metric: Any, *values: str) -> Any:
        """metric.labels(*values), looked up once per label tuple: prometheus_client validates
        the values and takes a lock on every call, nine times per request here. Children are
        never removed, so a remembered one stays the one the registry exports."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _count(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or c.kind not in ("proxy", "chat") or getattr(c, "counted", False):
            return
        c.counted = True  # type: ignore[attr-defined]
        m = self.rt.metrics
        try:
            account(c, self.rt.pricing, self.rt.config.governance.unknown_model_price)
            provider = c.plan.upstream.name if c.plan else (c.provider or "")
            model = (c.plan.model if c.plan else None) or ""
            tenant = c.tenant or ""
            status = str(c.status_code or (flow.response.status_code if flow.response else 0))
            child = self._labels
            child(m.requests, provider, model, tenant, status).inc()
            if c.denial_code:
                child(m.denials, c.denial_code).inc()
            if c.forwarded:
                child(m.cost, provider, model, tenant).inc(c.cost_usd)
                m.note_cost(provider, model, c.estimate_usd, c.cost_usd)
                u = c.usage
                child(m.tokens, provider, model, tenant, "input").inc(u.input_tokens)
                child(m.tokens, provider, model, tenant, "output").inc(u.output_tokens)
                child(m.tokens, provider, model, tenant, "cached").inc(u.cached_tokens)
                child(m.duration, provider).observe(c.elapsed_ms() / 1000)
                ttft = c.ttft_ms()
                if ttft is not None:
                    child(m.ttft, provider).observe(ttft / 1000)
                if c.error or (c.status_code or 0) >= 500:
                    kind = "timeout" if c.error == "upstream_timeout" else (
                        "connection" if c.error else "http_5xx")
                    m.upstream_errors.labels(provider, kind).inc()
        except Exception:  # observability fails open
            m.observability_errors.labels("metrics").inc()

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)
