"""Audit: one entry per proxied request, committed before the client sees the response end."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from contextlib import suppress
from typing import Any

from mitmproxy import http

from candela_mitm.accounting import account
from candela_mitm.context import RequestContext
from candela_mitm.runtime import Runtime

from .flowstate import ctx_of

log = logging.getLogger("candela.audit")

DURABLE_WAIT_S = 5.0


def request_entry(c: RequestContext, flow: http.HTTPFlow) -> dict[str, Any]:
    plan = c.plan
    p = c.principal
    decision = "denied" if c.denial_code else ("error" if c.error else "allowed")
    return {
        "user_id": getattr(p, "user", None),
        "tenant_id": c.tenant,
        "via": getattr(p, "via", None),
        "key_id": getattr(p, "key_id", None),  # a short hash prefix, never the credential
        "provider": plan.upstream.name if plan else c.provider,
        "model": plan.model if plan else None,
        "method": flow.request.method,
        "route": c.kind,
        "path": (flow.request.path.split("?", 1)[0] if not c.forwarded else None),
        "decision": decision,
        "reason": c.denial_code or c.error,
        "status": c.status_code,
        "stream": bool(plan and plan.stream),
        "input_tokens": c.usage.input_tokens,
        "output_tokens": c.usage.output_tokens,
        "cached_tokens": c.usage.cached_tokens,
        "cost_usd": round(c.cost_usd, 10),
        "estimate_usd": round(c.estimate_usd, 10),
        "duration_ms": round(c.elapsed_ms(), 3),
        "span_id": c.span_id,
        "trace_id": c.trace.trace_id,
        "client_address": c.client_address,
    }


async def _committed(fut: Future[int], timeout_s: float) -> bool:
    """Wait for the writer thread to commit an entry: True once it has, False after timeout_s.

    What wait_for(shield(wrap_future(fut))) does, with one loop future and one timer instead of
    three futures, a task and their callbacks: this runs once per request. A failed commit
    raises its error.
    """
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    def done(_: object) -> None:  # on the writer thread
        with suppress(RuntimeError):  # the loop has closed (shutdown): nobody is waiting
            loop.call_soon_threadsafe(wake)

    fut.add_done_callback(done)
    timer = loop.call_later(timeout_s, wake)
    try:
        await waiter
    finally:
        timer.cancel()
    if not fut.done():
        return False
    fut.result()
    return True


class Audit:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def _record(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or c.kind not in ("proxy", "chat") or getattr(c, "audited", False):
            return
        c.audited = True  # type: ignore[attr-defined]
        account(c, self.rt.pricing, self.rt.config.governance.unknown_model_price)
        if flow.response is not None and c.status_code is None:
            c.status_code = flow.response.status_code
        try:
            fut = self.rt.audit.record_durable("llm_request", **request_entry(c, flow))
            # a stuck ledger must not hang responses: the entry stays queued and is retried
            if not await _committed(fut, DURABLE_WAIT_S):
                log.error("audit entry for span %s not committed in %s s", c.span_id, DURABLE_WAIT_S)
        except Exception:
            log.exception("audit entry for span %s not committed", c.span_id)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._record(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._record(flow)
