"""WebSocket: governs a session after its upgrade: models named in frames, a budget slice, bounds.

The upgrade itself went through every gate as a request (Router planned a `session` operation,
Auth, ModelPolicy for Realtime's ?model=, RateLimit and Budget reserving the first slice). From
`websocket_start` this addon holds that slice (governance/sessions.py) and reads every frame:
- a client frame naming a model is checked (decide_model: audited) before it is forwarded; a
  denied one is dropped, the client gets an error event in its provider's shape and both sides
  are closed with 1008; a frame before any model is known (Live's `setup`) is refused the same;
- a server frame carrying usage settles its cost and tops the slice up; when the budget cannot
  fund another slice the session is cut the same way, after that frame reaches the client;
- each request for work a client frame makes (`response.create`, a Live turn) counts against
  the user's requests per minute before it is forwarded, and each usage frame's tokens against
  the user's and tenant's token windows (governance/sessions.py SessionLimits): a limit reached
  cuts the session the same way, with `rate_limited` and its `limit_kind`;
- bounds: message size (closed 1009), messages per second, idle time, and sessions per user: a
  lease per session on the state store, taken at the upgrade (every process counted), renewed
  while the session lives, given back at its end.
`websocket_end` charges the held slice when work is unaccounted, writes one `llm_session`
audit entry and one span. Frame contents are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.audit.actions import LLM_SESSION
from candela_mitm.context import RequestContext
from candela_mitm.errors import Denial
from candela_mitm.governance.sessions import (
    EndReason,
    FrameRate,
    Session,
    SessionBudget,
    SessionLeases,
    SessionLimits,
    SessionTally,
)
from candela_mitm.observability.spans import Span, new_span_id, utc_now_iso
from candela_mitm.providers import realtime
from candela_mitm.runtime import Runtime

from . import mitm_patches
from .flowstate import answered, ctx_of, deny, fail_closed, only_when
from .modelpolicy import decide_model

log = logging.getLogger("candela.websocket")

POLICY_CLOSE = 1008  # RFC 6455: a message that violates the endpoint's policy
TOO_BIG_CLOSE = 1009


def _protocol(c: RequestContext) -> str:
    assert c.plan is not None and c.plan.operation.protocol is not None
    return c.plan.operation.protocol


def _upgrade(c: RequestContext | None) -> bool:
    return c is not None and c.plan is not None and bool(c.plan.session)


def _leased(c: RequestContext | None) -> bool:
    return c is not None and c.session_lease is not None  # what _give_back gives back


def _user(c: RequestContext) -> str:
    return c.settings.user_id if c.settings is not None else (c.user or "")


class WebSocket:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cfg = rt.config.governance.websocket
        self.leases = SessionLeases(rt.store, rt.ledger.owner)
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        mitm_patches.install_websocket_close()

    # -- the upgrade -------------------------------------------------------------------------

    @only_when(lambda self, flow: _upgrade(ctx_of(flow)))
    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """Before RateLimit and Budget: a user at the session limit (counted across every
        process on the store) reserves nothing and nothing is forwarded."""
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or not c.plan.session:
            return
        user = _user(c)
        limit = self.cfg.max_sessions_per_user
        lease = await self.rt.store_call(self.leases.acquire, user, limit)
        if lease is None:
            deny(flow, errors.websocket_sessions_exceeded(user, limit))
            return
        c.session_lease = lease  # the session takes it at its start; else given back below

    @only_when(lambda self, flow: _leased(ctx_of(flow)))
    async def response(self, flow: http.HTTPFlow) -> None:
        """An upgrade answered with anything but 101 (a later gate refused it, or the
        provider did) opens no session: its lease goes back."""
        if flow.response is None or flow.response.status_code != 101:
            await self._give_back(flow)

    @only_when(lambda self, flow: _leased(ctx_of(flow)))
    async def error(self, flow: http.HTTPFlow) -> None:
        await self._give_back(flow)

    async def _give_back(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or c.session_lease is None:
            return
        lease, c.session_lease = c.session_lease, None
        try:
            await self.rt.store_call(self.leases.release, _user(c), lease)
        except Exception:  # it expires (or the next start frees it)
            log.exception("could not give back the session lease of %s", c.span_id)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or c.plan is None or not c.plan.session:
            return
        try:
            self._start(flow, c)
        except Exception:
            log.exception("WebSocket session could not start; closing it")
            mitm_patches.close_websocket(flow, POLICY_CLOSE, "governance_unavailable")

    def _start(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        plan = c.plan
        assert plan is not None
        user = _user(c)
        budget = None
        if c.reservation is not None and c.settings is not None:
            budget = SessionBudget(
                ledger=self.rt.ledger,
                user=user,
                tenant=c.tenant,
                daily_budget_usd=c.settings.daily_budget_usd,
                request_id=c.span_id,
                slice_usd=self.cfg.reserve_usd,
                provider=plan.upstream.name,
                held=c.reservation,
                tenant_settings=self.rt.users.tenant_settings_cached,
            )
            c.reservation = None  # the session holds it from here
        limits = None
        if c.settings is not None:
            tenant = self.rt.users.tenant_settings_cached(c.tenant) if c.tenant else None
            limits = SessionLimits(
                self.rt.limiter,
                user,
                c.settings.requests_per_minute,
                c.settings.token_limits,
                c.tenant,
                tenant.token_limits if tenant is not None else None,
            )
        s = Session(
            tally=SessionTally(plan.operation.name, _protocol(c)),
            budget=budget,
            rate=FrameRate(self.cfg.frames_per_second),
            user=user,
            limits=limits,
            lease=c.session_lease,
        )
        c.session_lease = None  # the session holds it from here
        if plan.model:
            s.tally.use_model(plan.model)
        c.session = s
        self.rt.metrics.sessions_open.labels(plan.upstream.name).inc()
        loop = asyncio.get_running_loop()
        self._tasks[flow.id] = [
            loop.create_task(self._watch_idle(flow, s)),
            loop.create_task(self._keep_lease(flow, s)),
        ]

    # -- frames ------------------------------------------------------------------------------

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        s = c.session if c is not None else None
        if c is None or s is None or flow.websocket is None:
            return
        msg = flow.websocket.messages[-1]
        if msg.injected:  # Candela's own error event, on its way to the client
            return
        if s.cut:
            msg.drop()  # racing the close: nothing more reaches either side
            return
        try:
            await self._message(flow, c, s, msg)
        except Exception:
            log.exception("WebSocket frame could not be governed; closing the session")
            msg.drop()
            self._cut(flow, c, s, "error", errors.governance_unavailable("an internal error"))

    async def _message(self, flow: http.HTTPFlow, c: RequestContext, s: Session, msg: Any) -> None:
        now = time.monotonic()
        s.tally.last_activity = now
        protocol = s.tally.protocol
        if msg.from_client:
            s.tally.frames_from_client += 1
        else:
            s.tally.frames_from_server += 1
        size = len(msg.content)
        if size > self.cfg.max_frame_bytes:
            msg.drop()
            denial = errors.websocket_frame_too_large(self.cfg.max_frame_bytes, size)
            self._cut(flow, c, s, "frame_too_large", denial, TOO_BIG_CLOSE)
            return
        if msg.from_client and not s.rate.allow(now):
            msg.drop()
            self._cut(flow, c, s, "rate_limited", errors.websocket_rate_limited(s.rate.limit))
            return
        frame = realtime.parse_frame(msg.content)
        if msg.from_client:
            refusal = self._client_frame(c, s, protocol, frame)
            if refusal is not None:
                msg.drop()  # checked before it is forwarded: the provider never sees it
                self._cut(flow, c, s, "policy", refusal)
                return
            if s.limits is not None and frame is not None and realtime.asks_for_work(
                protocol, frame
            ):
                limited = await self.rt.store_call(s.limits.admit)
                if limited is not None:
                    msg.drop()
                    self._limited(flow, c, s, limited.denial())
                    return
            if s.budget is not None:  # forwarded: from now on the provider may bill work
                s.budget.pending = True
            return
        usage = realtime.usage_of(protocol, frame) if frame is not None else None
        if usage is None:
            return
        s.tally.usage_frames += 1
        realtime.add_usage(s.tally.usage, usage)
        if s.limits is not None:  # this frame still reaches the client; nothing after it does
            limited = await self.rt.store_call(s.limits.count_usage, usage)
            if limited is not None:
                self._limited(flow, c, s, limited.denial())
        if s.budget is None:
            return
        # priced as the model that served it, when the frame says (a Responses session may run
        # several), else the session's model in force
        assert frame is not None  # it carried the usage
        model = realtime.model_reported(frame) or s.tally.model or ""
        price = self.rt.pricing.get(model, s.budget.provider) if model else None
        if price is None and s.tally.model:
            model = s.tally.model
            price = self.rt.pricing.get(model, s.budget.provider)
        cost = price.cost(usage) if price is not None else 0.0
        funded = await self.rt.store_call(s.budget.settle, cost, usage, model)
        if not funded:  # this frame still reaches the client; nothing after it does
            b, r = s.budget, s.budget.refusal
            if r is None:  # nothing to hold and no refusal: the user's budget was used up
                spent = errors.session_budget_exhausted(b.user, b.daily_budget_usd, b.charged_usd)
            else:
                spent = errors.session_budget_exhausted(
                    b.user, r.budget_usd, b.charged_usd, r.scope, r.period, r.tenant, r.key_id,
                    r.spent_usd, r.remaining_usd, r.resets_at,
                )
            self._cut(flow, c, s, "budget", spent)

    def _client_frame(
        self, c: RequestContext, s: Session, protocol: str, frame: dict[str, Any] | None
    ) -> Denial | None:
        """The refusal a client frame earns, or None: it may be forwarded."""
        operation = s.tally.operation
        if frame is not None and realtime.names_model_badly(protocol, frame):
            return errors.websocket_model_required(operation)
        model = realtime.model_named(protocol, frame) if frame is not None else None
        if model is not None:
            assert c.plan is not None
            provider = c.plan.upstream.name
            denial = decide_model(self.rt, c, model, provider)
            if denial is None and self.rt.pricing.get(model, provider) is None:
                if self.rt.config.governance.unknown_model_price == "deny":
                    denial = errors.model_price_unknown(model)
            if denial is not None:
                return denial
            s.tally.use_model(model)
        elif s.tally.model is None:
            # nothing may reach the provider before the model it will run is known and checked
            return errors.websocket_model_required(operation)
        return None

    def _limited(self, flow: http.HTTPFlow, c: RequestContext, s: Session, denial: Denial) -> None:
        """A rate or token limit reached mid-session: cut it as the HTTP request would be refused."""
        try:
            self.rt.metrics.rate_limited.labels(self.rt.metrics.tenant_label(c.tenant or "")).inc()
        except Exception:
            log.debug("rate limit not counted", exc_info=True)
        self._cut(flow, c, s, "rate_limited", denial)

    def _cut(
        self,
        flow: http.HTTPFlow,
        c: RequestContext,
        s: Session,
        reason: EndReason,
        denial: Denial,
        code: int = POLICY_CLOSE,
    ) -> None:
        """End the session from Candela's side: the client gets the error event, then both
        sides get a close frame; no frame passes in between (s.cut)."""
        if s.cut:
            return
        s.cut = True
        s.tally.end(reason, denial.error)
        c.denial_code = denial.error
        event = realtime.error_event(
            s.tally.protocol, denial.status, denial.error, denial.message, denial.fields
        )
        mitm_patches.send_to_client(flow, event)
        mitm_patches.close_websocket(flow, code, denial.error)
        try:
            assert c.plan is not None
            self.rt.metrics.session_cutoffs.labels(c.plan.upstream.name, reason).inc()
        except Exception:
            log.debug("cut-off not counted", exc_info=True)

    async def _watch_idle(self, flow: http.HTTPFlow, s: Session) -> None:
        limit = self.cfg.idle_timeout_s
        while not s.cut and not s.ended:
            wait = s.tally.last_activity + limit - time.monotonic()
            if wait <= 0:
                c = ctx_of(flow)
                if c is not None:
                    self._cut(flow, c, s, "idle", errors.websocket_idle_timeout(limit))
                return
            await asyncio.sleep(wait)

    async def _keep_lease(self, flow: http.HTTPFlow, s: Session) -> None:
        """Renew the session's lease while it lives. One lost (the store forgot it, or it
        expired while the store could not be reached) is taken again if the user has a place
        left; else the session is cut, as its upgrade would be refused now."""
        period = self.leases.ttl_us / 1_000_000 / 3
        while s.lease is not None and not s.cut and not s.ended:
            await asyncio.sleep(period)
            if s.cut or s.ended:
                return
            try:
                if await self.rt.store_call(self.leases.renew, s.user, s.lease):
                    continue
                s.lease = await self.rt.store_call(
                    self.leases.acquire, s.user, self.cfg.max_sessions_per_user
                )
            except Exception:  # a store hiccup: the next period tries again
                log.warning("could not renew the session lease of flow %s", flow.id)
                continue
            if s.ended and s.lease is not None:  # it ended meanwhile: nothing holds this one
                lease, s.lease = s.lease, None
                await self.rt.store_call(self.leases.release, s.user, lease)
                return
            if s.lease is None:
                c = ctx_of(flow)
                if c is not None and not s.ended:
                    limit = self.cfg.max_sessions_per_user
                    self._cut(flow, c, s, "policy", errors.websocket_sessions_exceeded(s.user, limit))
                return

    # -- the end -----------------------------------------------------------------------------

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        s = c.session if c is not None else None
        if c is not None and s is None:  # it never started (websocket_start failed)
            await self._give_back(flow)
        if c is None or s is None or s.ended:
            return
        s.ended = True
        for task in self._tasks.pop(flow.id, []):
            task.cancel()
        ws = flow.websocket
        if flow.error is not None:
            s.tally.end("error", None)
        elif ws is not None:
            s.tally.end("client" if ws.closed_by_client else "upstream")
        if s.lease is not None:
            lease, s.lease = s.lease, None
            try:
                await self.rt.store_call(self.leases.release, s.user, lease)
            except Exception:  # it expires (or the next start frees it)
                log.exception("could not give back the session lease of %s", c.span_id)
        assert c.plan is not None
        provider = c.plan.upstream.name
        c.usage_source = None
        if s.budget is not None:
            try:
                await self.rt.store_call(s.budget.close, s.tally.model or "")
            except Exception:
                # the slice stays held in the store: the next start settles it at its amount
                log.exception("could not settle the session's reservation")
            c.cost_usd = s.budget.charged_usd
            if s.budget.charged_reservation:
                c.usage_source = "reserved"
            elif s.tally.usage_frames:
                c.usage_source = "reported"
        c.usage = s.tally.usage
        self._observe(c, s, provider)

    def _observe(self, c: RequestContext, s: Session, provider: str) -> None:
        """The session's audit entry (fail closed is moot: it has ended) and span, metrics."""
        t = s.tally
        ws_fields: dict[str, Any] = {
            "span_id": c.span_id,
            "user_id": c.user,
            "tenant_id": c.tenant,
            "provider": provider,
            "operation": t.operation,
            "protocol": t.protocol,
            "model": t.model,
            "models": list(t.models),
            "frames_from_client": t.frames_from_client,
            "frames_from_server": t.frames_from_server,
            "usage_frames": t.usage_frames,
            "tokens": realtime.tokens_by_kind(t.usage),
            "input_tokens": t.usage.input_tokens,
            "output_tokens": t.usage.output_tokens,
            "cost_usd": round(c.cost_usd, 10),
            "usage_source": c.usage_source,
            "duration_ms": round(t.duration_ms(), 3),
            "ended_by": t.ended_by,
            "error": t.end_code,
            "timestamp": utc_now_iso(),
        }
        if not self.rt.audit.record(LLM_SESSION, **ws_fields):
            log.error("the llm_session entry of span %s was not accepted", c.span_id)
        try:
            self.rt.metrics.sessions_open.labels(provider).dec()
            self.rt.metrics.sessions.labels(provider, t.ended_by or "error").inc()
            self.rt.spans.add(
                Span(
                    span_id=new_span_id(),
                    trace_id=c.trace.trace_id,
                    parent_span_id=c.span_id,  # the upgrade request's span
                    timestamp=utc_now_iso(),
                    user=c.user,
                    tenant=c.tenant,
                    provider=provider,
                    model=t.model,
                    input_tokens=t.usage.input_tokens,
                    output_tokens=t.usage.output_tokens,
                    cached_tokens=t.usage.cached_tokens,
                    total_tokens=t.usage.total_tokens,
                    cost_usd=c.cost_usd,
                    usage_source=c.usage_source,
                    duration_ms=t.duration_ms(),
                    status="denied" if t.ended_by in ("budget", "policy") else (
                        "error" if t.end_code else "ok"
                    ),
                    error=t.end_code,
                    stream=True,
                    attributes={
                        "operation": t.operation,
                        "ended_by": t.ended_by,
                        "models": list(t.models),
                        "frames_from_client": t.frames_from_client,
                        "frames_from_server": t.frames_from_server,
                    },
                )
            )
        except Exception:  # observability fails open
            log.exception("session span or metrics not recorded")

