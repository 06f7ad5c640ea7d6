"""Metrics: Prometheus counters for every proxied request, and GET /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.governance.accounting import USAGE_SOURCES
from candela_mitm.runtime import Runtime

from .accounting import account_flow
from .flowstate import (
    after_answer,
    answered,
    ctx_of,
    deny,
    fail_closed,
    for_routes,
    only_when,
)


def model_label(rt: Runtime, model: str, provider: str | None) -> str:
    """A model as a metric label: one Candela knows (priced, or a local runtime's), else
    "other"; a request names any string it likes, and each label value is a series kept
    until restart."""
    if not model:
        return ""
    known = model in rt.local_models or rt.pricing.get(model, provider or "") is not None
    return rt.metrics.model_label(model) if known else "other"


SHAPES_KEPT = 4096  # label shapes of requests remembered by Metrics._shape


class _Shape:
    """A request's labels (provider, model, tenant: as exported) and the children it counts
    into, each made on its first use (a child made is a series exported: none before it
    counts), kept in a list by slot (a list index: the cheapest lookup there is)."""

    __slots__ = ("_kids", "_labels", "model", "provider", "status", "tenant")

    def __init__(
        self, labels: Callable[..., Any], provider: str, model: str, tenant: str, status: str
    ) -> None:
        self._labels, self._kids = labels, [None] * _SLOTS
        self.provider, self.model, self.tenant, self.status = provider, model, tenant, status

    def child(self, slot: int, metric: Any, *extra: str) -> Any:
        """The child of `metric` for this shape's leading labels and `extra`; `slot` names
        the (metric, extra) pair: one slot never serves two."""
        kid = self._kids[slot]
        if kid is None:
            have = {"provider": self.provider, "model": self.model, "tenant": self.tenant}
            lead = tuple(have[n] for n in metric._labelnames if n in have)
            kid = self._kids[slot] = self._labels(metric, *lead, *extra)
        return kid


# _Shape's slots: requests, cost, duration, ttft, then charged by source and tokens by direction
_REQUESTS, _COST, _DURATION, _TTFT, _CHARGED, _TOKENS = 0, 1, 2, 3, 4, 4 + len(USAGE_SOURCES)
_CHARGED_SLOT: dict[str, int] = {source: _CHARGED + i for i, source in enumerate(USAGE_SOURCES)}
_SLOTS = _TOKENS + 3


# How long a scrape waits for the refresh (the audit ledger's new bypass entries) before it
# answers with the values it has.
REFRESH_TIMEOUT_S = 2.0


class Metrics:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        m = rt.metrics
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._shapes: dict[tuple[str | None, str, str, str], _Shape] = {}
        self._pricing: Any = None  # what the shapes were made under
        self._local_models: Any = None
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

    @for_routes("metrics")
    @only_when(lambda self, flow: getattr(ctx_of(flow), "kind", None) == "metrics")
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

    def _shape(self, provider: str | None, model: str, tenant: str, status: str) -> _Shape:
        """The labels and children of a request's (provider, model, tenant, status), remembered:
        one lookup instead of three label functions and nine child lookups per request (warm,
        `_count` of a forwarded request 7.3 -> 5.8 µs). Forgotten when the prices or the
        local models change (they decide which models are known); at most SHAPES_KEPT kept
        (raw values are the client's: past it a shape is made for each request, as before)."""
        rt = self.rt
        if self._pricing is not rt.pricing or self._local_models is not rt.local_models:
            self._pricing, self._local_models = rt.pricing, rt.local_models
            self._shapes = {}
        key = (provider, model, tenant, status)
        shape = self._shapes.get(key)
        if shape is None:
            m = rt.metrics
            p = m.provider_label(provider)
            shape = _Shape(self._labels, p, model_label(rt, model, p), m.tenant_label(tenant), status)
            if len(self._shapes) < SHAPES_KEPT:
                self._shapes[key] = shape
        return shape

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
            plan = c.plan
            s = self._shape(
                plan.upstream.name if plan else c.provider,
                (plan.model if plan else None) or "",
                c.tenant or "",
                str(c.status_code or (flow.response.status_code if flow.response else 0)),
            )
            s.child(_REQUESTS, m.requests, s.status).inc()
            if c.denial_code:
                self._labels(m.denials, c.denial_code).inc()
            if c.forwarded:
                provider, model = s.provider, s.model
                s.child(_COST, m.cost).inc(c.cost_usd)
                source = c.usage_source or ""
                charged = _CHARGED_SLOT.get(source)
                if charged is not None:  # the label takes only USAGE_SOURCES' values
                    s.child(charged, m.charged, source).inc()
                m.note_cost(provider, model, c.estimate_usd, c.cost_usd)
                u = c.usage
                s.child(_TOKENS, m.tokens, "input").inc(u.input_tokens)
                s.child(_TOKENS + 1, m.tokens, "output").inc(u.output_tokens)
                s.child(_TOKENS + 2, m.tokens, "cached").inc(u.cached_tokens)
                s.child(_DURATION, m.duration).observe(c.elapsed_ms() / 1000)
                ttft = c.ttft_ms()
                if ttft is not None:
                    s.child(_TTFT, m.ttft).observe(ttft / 1000)
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
