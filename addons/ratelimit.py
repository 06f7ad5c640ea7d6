"""RateLimit: per-user requests per minute over a sliding window shared by every proxy process."""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from candela_mitm.governance.estimate import LARGE_BODY_BYTES
from candela_mitm.governance.ledger import BudgetRefusal, Reservation
from candela_mitm.governance.ratelimit import RateDecision
from candela_mitm.runtime import Runtime

from .budget import reservation_call
from .flowstate import answered, ctx_of, deny, fail_closed

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


def _check_then_reserve(
    check: Callable[[], RateDecision],
    reserve: Callable[[], Reservation | BudgetRefusal] | None,
) -> tuple[RateDecision, Reservation | BudgetRefusal | None]:
    """Both store steps as one store call (Runtime.store_call makes a call one transaction
    where the store can); a rate-limited request reserves nothing."""
    decision = check()
    if not decision.allowed or reserve is None:
        return decision, None
    return decision, reserve()


def _admitted(limit: int) -> RateDecision:
    """Admitted already, from the head (RateLimit.requestheaders)."""
    return RateDecision(True, limit, 0, 0, 0)


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
        settings = c.settings
        # Budget's reservation (if this request needs one) rides the same store call and
        # transaction: each costs about as much CPU as the work done in it.
        # Budget still decides and answers 402 in its own hook, after this one.
        if c.rate_decided:
            check = lambda: _admitted(settings.requests_per_minute)  # noqa: E731
        else:
            check = lambda: self.rt.limiter.check(settings.user_id, settings.requests_per_minute)  # noqa: E731
        decision, reserved = await self.rt.store_call(
            _check_then_reserve, check, reservation_call(self.rt, c)
        )
        if not decision.allowed:
            self.rt.metrics.rate_limited.labels(self.rt.metrics.tenant_label(c.tenant or "")).inc()
            deny(flow, decision.denial())
            return
        if reserved is not None:
            if isinstance(reserved, Reservation):
                c.reservation = reserved  # held from now on: Budget settles or releases it
            c.reserve_result = reserved  # Budget judges it in its own hook
