"""Audit: one entry per proxied request, committed before the client sees the response end."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.audit.actions import LLM_REQUEST
from candela_mitm.audit.sampling import Sampler
from candela_mitm.audit.writer import Committed
from candela_mitm.context import RequestContext
from candela_mitm.errors import StoreUnavailable
from candela_mitm.runtime import Runtime

from .accounting import account_flow
from .flowstate import ctx_of, deny, run_later

log = logging.getLogger("candela.audit")

DURABLE_WAIT_S = 5.0


MAX_AUDIT_PATH_BYTES = 512


def audit_path(c: RequestContext, flow: http.HTTPFlow) -> str:
    """The route-relative path, without its query (it can carry a key), at most 512 bytes."""
    raw = c.rest if c.kind == "proxy" else flow.request.path
    path = raw.split("?", 1)[0]
    data = path.encode("utf-8", "surrogateescape")
    if len(data) <= MAX_AUDIT_PATH_BYTES:
        return path
    return data[:MAX_AUDIT_PATH_BYTES].decode("utf-8", "ignore")


def request_head(c: RequestContext, flow: http.HTTPFlow) -> dict[str, Any]:
    """The fields of a request's entry that are fixed once it is forwarded: who, what, where."""
    plan = c.plan
    p = c.principal
    return {
        "user_id": getattr(p, "user", None),
        "tenant_id": c.tenant,
        "via": getattr(p, "via", None),
        "key_id": getattr(p, "key_id", None),  # a short hash prefix, never the credential
        "provider": plan.upstream.name if plan else c.provider,
        "model": plan.model if plan else None,
        "method": flow.request.method,
        "route": c.kind,
        "path": audit_path(c, flow),
        "operation": plan.operation.name if plan else None,
        "stream": bool(plan and plan.stream),
        "span_id": c.span_id,
        "trace_id": c.trace.trace_id,
        "client_address": c.client_address,
        **(c.workload or {}),  # intercepted: the process that sent it
        **({"slice_id": c.slice_id} if c.slice_id else {}),  # its hold's budget slice
        **(
            {
                "provider_key_fingerprint": c.provider_key_fingerprint,
                "provider_key_ours": c.provider_key_ours,
            }
            if c.provider_key_fingerprint
            else {}
        ),
    }


def request_entry(c: RequestContext, flow: http.HTTPFlow) -> dict[str, Any]:
    """A request's entry: its head (made while its upstream worked, when it was forwarded:
    `Audit.meanwhile`) and what its end decided."""
    entry, c.entry_head = c.entry_head, None
    if entry is None:
        entry = request_head(c, flow)
    entry["decision"] = "denied" if c.denial_code else ("error" if c.error else "allowed")
    entry["reason"] = c.denial_code or c.error
    entry["status"] = c.status_code
    usage = c.usage
    entry["input_tokens"] = usage.input_tokens
    entry["output_tokens"] = usage.output_tokens
    entry["cached_tokens"] = usage.cached_tokens
    entry["cost_usd"] = round(c.cost_usd, 10)
    entry["usage_source"] = c.usage_source  # reported | observed | reserved; None: not charged
    entry["estimate_usd"] = round(c.estimate_usd, 10)
    entry["duration_ms"] = round(c.elapsed_ms(), 3)
    if c.shadow is not None:  # governance.shadow
        entry["shadow"] = c.shadow.to_json()
    return entry


class CommitWaits:
    """The proxy's waits for audit commits on one event loop: one per request, so kept cheap.

    A wait is a loop future. The writer thread reports commits through `committed`; the loop is
    woken once per burst of commits (one call_soon_threadsafe while a delivery is pending), not
    once per entry. Timeouts are swept by one timer while waits are open instead of one timer
    per wait: a wait ends with False `timeout_s` to `timeout_s + sweep_s` after it began.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout_s: float, sweep_s: float = 0.5
    ) -> None:
        self.loop = loop
        self.thread = threading.get_ident()  # the loop's (a wait begins on it)
        self.timeout_s = timeout_s
        self.sweep_s = sweep_s
        self._open: deque[tuple[float, asyncio.Future[bool]]] = deque()  # in start order
        self._ready: deque[tuple[asyncio.Future[bool], BaseException | None]] = deque()
        self._delivering = False  # a delivery is scheduled on the loop
        self._sweeper: asyncio.TimerHandle | None = None

    def begin(self) -> tuple[asyncio.Future[bool], Committed]:
        """A new wait: its future (True once committed) and the callback for the writer."""
        fut: asyncio.Future[bool] = self.loop.create_future()
        self._open.append((self.loop.time() + self.timeout_s, fut))
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

        def committed(_seq: int | None, error: BaseException | None) -> None:
            if threading.get_ident() == self.thread:  # committed here (record_here)
                if not fut.done():
                    if error is None:
                        fut.set_result(True)
                    else:
                        fut.set_exception(error)
                return
            self._ready.append((fut, error))  # the writer thread
            if not self._delivering:
                self._delivering = True
                with suppress(RuntimeError):  # the loop has closed (shutdown): nobody waits
                    self.loop.call_soon_threadsafe(self._deliver)

        return fut, committed

    def _deliver(self) -> None:
        self._delivering = False  # before draining: a commit reported from now on schedules anew
        ready = self._ready
        while ready:
            fut, error = ready.popleft()
            if not fut.done():
                if error is None:
                    fut.set_result(True)
                else:
                    fut.set_exception(error)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        waits = self._open
        while waits and (waits[0][1].done() or waits[0][0] <= now):
            _, fut = waits.popleft()
            if not fut.done():
                fut.set_result(False)  # timed out; a later commit finds it done and is ignored
        if waits:
            self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)


class Audit:
    """The entry of a proxied request: recorded when the response is complete, waited for last.

    The response hooks run in pipeline order and the Audit addon is the last of them, but the
    entry is started by `AuditStart`, placed before every addon with a response hook: the
    fields it records are final by then (nothing in between changes them), and its commit
    (an fsync, on the writer thread) runs while the budget settles and the metrics and span are
    recorded. `response` then waits for it. An error is recorded at the end, after the addons
    that name it.
    """

    def __init__(self, rt: Runtime, under_way: Callable[[], int] | None = None) -> None:
        self.rt = rt
        # how many requests this process has under way (ConnLimits'); at most one (this one):
        # its entry is committed on the event loop, nothing else waiting for the loop meanwhile
        self.under_way = under_way
        self._waits: CommitWaits | None = None
        self.unknown_callers = Sampler(rt.config.audit.unauthenticated_per_minute)

    def meanwhile(self, flow: http.HTTPFlow) -> None:
        """Run by Upstream once a request is on its way (after its bytes are written): the
        head of its entry is made then (`request_head`: nothing in it changes once forwarded),
        not on the answer's path; and with nothing else under way in this process, the loop is
        idle until the answer, and the entries queued before it (its model policy check) are
        prepared then, not in the answer's journal write (bench/README.md, twenty-first and
        twenty-second sessions)."""
        c = ctx_of(flow)
        if c is not None and c.kind in ("proxy", "chat") and not c.audited:
            c.entry_head = request_head(c, flow)
        if self.under_way is not None and self.under_way() <= 1:
            self.rt.audit.prepare_queued()

    def _commit_waits(self) -> CommitWaits:
        loop = asyncio.get_running_loop()
        w = self._waits
        if w is None or w.loop is not loop:
            w = self._waits = CommitWaits(loop, DURABLE_WAIT_S)
        return w

    def start(self, flow: http.HTTPFlow) -> None:
        """Queue the flow's entry (once); its wait is kept on the context for `_finish`."""
        c = ctx_of(flow)
        if c is None or c.kind not in ("proxy", "chat") or c.audited:
            return
        c.audited = True
        fields: dict[str, Any] = {}
        if c.principal is None and c.denial_code is not None:
            # refused with nobody authenticated (no valid credential, or refused before it was
            # looked at): anyone can send these without end, and the ledger only grows, so a
            # sample is kept
            skipped = self.unknown_callers.take()
            if skipped is None:
                return
            fields["unsampled_before"] = skipped
        account_flow(self.rt, flow, c)
        if flow.response is not None and c.status_code is None:
            c.status_code = flow.response.status_code
        try:
            fut, committed = self._commit_waits().begin()
            c.audit_commit = fut
            entry = request_entry(c, flow)  # a fresh dict: the sample count added in place
            entry.update(fields)
            if c.shadow is not None:
                self.rt.metrics.shadow_decisions.labels(c.shadow.decision).inc()
            # journaled (one append, then the answer goes on: audit/journal.py); without the
            # journal, a request alone commits its entry here, others wait for a group commit
            w = self.rt.audit
            alone = self.under_way is not None and self.under_way() <= 1
            record = w.record_here if alone or w.journaling else w.record_then
            if not record(LLM_REQUEST, committed, **entry):
                fut.set_exception(StoreUnavailable("the audit queue is full or closed"))
        except Exception:
            log.exception("audit entry for span %s not recorded", c.span_id)

    async def _finish(self, flow: http.HTTPFlow) -> None:
        self.start(flow)
        c = ctx_of(flow)
        if c is None:
            return
        run_later(c)  # the last hook of every flow: deferred work of one that never left
        if c.audit_commit is None:
            # a request the audit log does not record (not a proxied route) has nothing to
            # wait for; one whose entry should have been queued and was not keeps what waits
            entry_known(c, not c.audited and c.kind not in ("proxy", "chat"))
            return
        fut, c.audit_commit = c.audit_commit, None
        if not c.forwarded and not self.rt.audit.healthy:
            # a refusal while the ledger fails: queued and retried, nothing to wait for
            fut.add_done_callback(lambda f: entry_known(c, committed_ok(f)))
            return
        try:
            # a stuck ledger must not hang responses: the entry stays queued and is retried
            durable = await fut
            if not durable:
                log.error(
                    "audit entry for span %s not committed in %s s", c.span_id, DURABLE_WAIT_S
                )
        except Exception:
            durable = False
            log.exception("audit entry for span %s not committed", c.span_id)
        entry_known(c, durable)
        if not durable and c.forwarded:
            unrecorded(flow)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._finish(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._finish(flow)


def committed_ok(fut: asyncio.Future[bool]) -> bool:
    return not fut.cancelled() and fut.exception() is None and fut.result()


def entry_known(c: RequestContext, durable: bool) -> None:
    """Run what waits for the request's entry (Budget's settlement), once."""
    after, c.after_entry = c.after_entry, None
    if after is None:
        return
    try:
        after(durable)
    except Exception:
        log.exception("what follows the audit entry of span %s failed", c.span_id)


def unrecorded(flow: http.HTTPFlow) -> None:
    """A forwarded request whose entry cannot be made durable: its answer does not complete.
    Buffered, it is replaced by 503; streamed, its end is never sent (the connection is
    killed before it: mitmproxy sends a stream's end after the response hook)."""
    if flow.response is not None and flow.response.stream:
        flow.kill()
        return
    deny(flow, errors.governance_unavailable("the audit trail cannot be written"))


class AuditStart:
    """Starts the Audit entry of a complete response ahead of the other response hooks."""

    def __init__(self, audit: Audit) -> None:
        self.audit = audit

    def response(self, flow: http.HTTPFlow) -> None:
        self.audit.start(flow)
