"""RateLimit: requests and tokens per minute and requests in flight per user (tokens and requests
in flight per tenant too), shared by every proxy process; IETF RateLimit headers on every answer
it decided."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http

from candela_mitm.context import RequestContext
from candela_mitm.governance.estimate import (
    LARGE_BODY_BYTES,
    estimate_input_tokens,
    output_tokens_limit,
)
from candela_mitm.governance.ledger import BudgetRefusal, Reservation
from candela_mitm.governance.ratelimit import (
    Admission,
    RateDecision,
    policy_headers,
)
from candela_mitm.runtime import Runtime
from candela_mitm.state.ports import to_us

from .accounting import account_flow
from .budget import reservation_call
from .flowstate import answered, ctx_of, deny, fail_closed

log = logging.getLogger("candela.ratelimit")

# A large body is rate limited from its head, before it is read, decoded, parsed or estimated:
# a caller past its rate cannot make Candela do work that grows with the body (parsing holds
# the event loop about 20 ms a MB). Smaller ones are decided with their reservation, in one
# store trip.


def large_body(headers: http.Headers) -> bool:
    """A body over LARGE_BODY_BYTES, or of a size the head does not state (chunked)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return True
    try:
        return int(headers.get("content-length", "0")) > LARGE_BODY_BYTES
    except ValueError:
        return False  # Router answers 400


@dataclass
class Checked:
    decisions: list[RateDecision]  # every limit judged, the refusing one last
    admission: Admission | None  # what an admitted request holds
    reserved: Reservation | BudgetRefusal | None
    now_us: int

    @property
    def refusal(self) -> RateDecision | None:
        last = self.decisions[-1]
        return None if last.allowed else last


def token_estimate(rt: Runtime, c: RequestContext) -> tuple[int, int] | None:
    """(input, output) tokens a request may use, for token limits; None: not an inference call."""
    plan = c.plan
    if plan is not None and plan.session:
        # a WebSocket upgrade asks for no work: it holds a token of each kind until its 101
        # (refused when a window is already full); its frames count (governance/sessions.py)
        return 1, 1
    if plan is None or not plan.model:
        return None
    default_max = rt.config.governance.budgets.default_max_output_tokens
    price = rt.pricing.get(plan.model)
    if price is not None:
        out = output_tokens_limit(plan.max_output_tokens, default_max, price)
    else:
        out = plan.max_output_tokens if plan.max_output_tokens is not None else default_max
    found = c.scan.input_tokens() if c.scan is not None else estimate_input_tokens(c.body)
    return found, max(0, out)


def _admit(
    rt: Runtime,
    c: RequestContext,
    tokens: tuple[int, int] | None,
    reserve: Callable[[], Reservation | BudgetRefusal] | None,
) -> Checked:
    """Every rate step and Budget's reservation as one store call (Runtime.store_call makes it
    one transaction where the store can). A refused step undoes what the earlier ones hold."""
    s = c.settings
    assert s is not None
    limiter = rt.limiter
    now = limiter.clock()
    now_us = to_us(now)
    if c.rate_decided:  # admitted already, from the head (RateLimit.requestheaders)
        decision = RateDecision(True, s.requests_per_minute, 0, 0, 0)
    else:
        decision = limiter.check(s.user_id, s.requests_per_minute, now=now)
    decisions = [decision]
    if not decision.allowed:
        return Checked(decisions, None, None, now_us)
    admission = Admission(s.user_id)
    try:
        if s.max_concurrent_requests is not None:
            decisions.append(
                limiter.acquire(admission, s.max_concurrent_requests, rt.ledger.owner, now)
            )
            if not decisions[-1].allowed:
                return Checked(decisions, None, None, now_us)
        tenant = rt.users.tenant_settings_cached(c.tenant) if c.tenant else None
        if tenant is not None and tenant.max_concurrent_requests is not None:
            decisions.append(
                limiter.acquire_tenant(
                    admission, tenant.tenant_id, tenant.max_concurrent_requests,
                    rt.ledger.owner, now,
                )
            )
            if not decisions[-1].allowed:
                limiter.release(admission)  # the user's place, taken a step before
                return Checked(decisions, None, None, now_us)
        if tokens is not None:
            decisions += limiter.admit_tokens(
                admission,
                s.token_limits,
                *tokens,
                now=now,
                tenant=c.tenant,
                tenant_limits=tenant.token_limits if tenant else None,
            )
            if not decisions[-1].allowed:
                limiter.release(admission)
                return Checked(decisions, None, None, now_us)
        reserved = reserve() if reserve else None
    except BaseException:
        # the request is refused (503). SQLite rolls the whole call back; a store without one
        # transaction for it (Redis) would otherwise keep the lease until it expires
        leased = admission.lease_id is not None or admission.tenant_lease is not None
        if leased and not rt.store.joins_calls:
            try:
                limiter.release(admission)
            except Exception:
                log.warning("could not give back the lease of a refused request")
        raise
    held = (
        admission.lease_id is not None
        or admission.tenant_lease is not None
        or admission.token_entry is not None
    )
    return Checked(decisions, admission if held else None, reserved, now_us)


class RateLimit:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.settings is None or c.kind not in ("proxy", "chat"):
            return
        if not large_body(flow.request.headers):
            return
        settings = c.settings
        decision = await self.rt.store_call(
            self.rt.limiter.check, settings.user_id, settings.requests_per_minute
        )
        c.rate_decided = True
        if not decision.allowed:
            self.rt.metrics.rate_limited.labels(self.rt.metrics.tenant_label(c.tenant or "")).inc()
            deny(flow, decision.denial())

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or c.settings is None:
            return
        # Budget's reservation (if this request needs one) rides the same store call and
        # transaction: each costs about as much CPU as the work done in it.
        # Budget still decides and answers 402 in its own hook, after this one.
        checked = await self.rt.store_call(
            _admit, self.rt, c, token_estimate(self.rt, c), reservation_call(self.rt, c)
        )
        c.rate_headers = policy_headers(checked.decisions, checked.now_us)
        refusal = checked.refusal
        if refusal is not None:
            self.rt.metrics.rate_limited.labels(self.rt.metrics.tenant_label(c.tenant or "")).inc()
            deny(flow, refusal.denial(c.rate_headers))
            return
        c.admission = checked.admission  # held from now on: finished on response or error
        reserved = checked.reserved
        if reserved is not None:
            if isinstance(reserved, Reservation):
                c.reservation = reserved  # held from now on: Budget settles or releases it
            c.reserve_result = reserved  # Budget judges it in its own hook

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None and flow.response is not None:
            for k, v in c.rate_headers.items():
                flow.response.headers.setdefault(k, v)

    async def _finish(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        """Give the lease back and correct the token windows to the usage read."""
        admission, c.admission = c.admission, None
        if admission is None:
            return
        account_flow(self.rt, flow, c)
        # what was read from the answer (nothing for a request never forwarded or refused by
        # the provider); a charge at the reservation means its usage is not known: the estimate
        # stays counted
        usage = None if c.usage_source == "reserved" else (
            c.usage.input_tokens, c.usage.output_tokens
        )
        try:
            await self.rt.store_call(self.rt.limiter.finish, admission, usage)
        except Exception:
            # the lease expires (or the next start frees it); the estimate stays counted
            log.exception("could not finish the rate admission of %s", c.span_id)

    async def response(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None:
            return
        if flow.response is not None and not flow.response.stream:
            for k, v in c.rate_headers.items():  # answers made here (denials) had no headers hook
                flow.response.headers.setdefault(k, v)
        await self._finish(flow, c)

    async def error(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            await self._finish(flow, c)
