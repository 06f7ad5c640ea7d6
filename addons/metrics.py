"""Metrics: Prometheus counters for every proxied request, and GET /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.governance.accounting import USAGE_SOURCES
from candela_mitm.runtime import Runtime

from .accounting import account_flow
from .flowstate import after_answer, answered, ctx_of, deny, fail_closed


def model_label(rt: Runtime, model: str, provider: str | None) -> str:
    """A model as a metric label: one Candela knows (priced, or a local runtime's), else
    "other"; a request names any string it likes, and each label value is a series kept
    until restart."""
    if not model:
        return ""
    known = model in rt.local_models or rt.pricing.get(model, provider or "") is not None
    return rt.metrics.model_label(model) if known else "other"


# How long a scrape waits for the refresh (the audit ledger's new bypass entries) before it
# answers with the values it has.
REFRESH_TIMEOUT_S = 2.0


class Metrics:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        m = rt.metrics
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._refreshing: asyncio.Future[None] | None = None

        def refresh() -> None:
            st = rt.audit.stats()
            m.audit_backlog.set(st.backlog)
            m.audit_sync_errors.set(st.sync_errors)
            m.audit_unsynced.set(round(st.unsynced_s, 3))
            for name, ms in st.mirrors.items():
                m.audit_sink_errors.labels(name).set(getattr(ms, "errors", 0))
                m.audit_mirror_lag.labels(name).set(getattr(ms, "lag", 0))

        m.on_scrape(refresh)
        # candela_bypass_attempts_total: this proxy's refusals and sandboxes', from the ledger
        m.follow_audit(rt.audit.db_path)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """GET /metrics, for admins (Auth has authenticated the caller: Prometheus sends an
        admin's key as its bearer token); in `candela`, the laptop's own user."""
        c = ctx_of(flow)
        if c is None or c.kind != "metrics" or answered(flow):
            return
        if c.principal is None:
            deny(flow, errors.unauthenticated())
            return
        if c.principal.role != "admin" and self.rt.command != "local":
            deny(flow, errors.forbidden("/metrics is served to admins"))
            return
        await self._refresh()
        body, ctype = self.rt.metrics.exposition()
        flow.response = http.Response.make(200, body, {"Content-Type": ctype})

    async def _refresh(self) -> None:
        """The scrape-time refresh, off the event loop: it reads the audit SQLite file.

        One refresh at a time runs on the runtime's thread pool, shared by the scrapes that
        arrive meanwhile (a slow disk holds one pool thread, not one per scrape). A scrape waits
        for it at most REFRESH_TIMEOUT_S, then answers with the values it has: observability
        fails open, and the refresh that failed or was not waited for is counted.
        """
        loop = asyncio.get_running_loop()
        running = self._refreshing
        if running is None or running.done() or running.get_loop() is not loop:
            running = self._refreshing = asyncio.ensure_future(
                self.rt.blocking(self.rt.metrics.refresh)
            )
        try:
            await asyncio.wait_for(asyncio.shield(running), REFRESH_TIMEOUT_S)
        except Exception:
            self.rt.metrics.observability_errors.labels("metrics").inc()

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
        if c is None or c.counted:
            return
        m = self.rt.metrics
        if c.principal is None and c.denial_code is not None:
            c.counted = True  # every kind of route: /admin and /metrics too
            self._labels(m.unauthenticated, c.kind).inc()
        if c.kind not in ("proxy", "chat"):
            return
        c.counted = True
        try:
            account_flow(self.rt, flow, c)
            # label values a request chose are known ones only (provider="unknown", model
            # "other"), and bounded in number: a scrape never fails, series never run away
            provider = m.provider_label(c.plan.upstream.name if c.plan else c.provider)
            model = model_label(self.rt, (c.plan.model if c.plan else None) or "", provider)
            tenant = m.tenant_label(c.tenant or "")
            status = str(c.status_code or (flow.response.status_code if flow.response else 0))
            child = self._labels
            child(m.requests, provider, model, tenant, status).inc()
            if c.denial_code:
                child(m.denials, c.denial_code).inc()
            if c.forwarded:
                child(m.cost, provider, model, tenant).inc(c.cost_usd)
                if c.usage_source in USAGE_SOURCES:  # the label takes only these values
                    child(m.charged, provider, c.usage_source).inc()
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
        after_answer(self._count, flow)

    def error(self, flow: http.HTTPFlow) -> None:
        after_answer(self._count, flow)
