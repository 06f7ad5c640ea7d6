"""RateLimit: per-user requests per minute over a sliding window shared by every proxy process."""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from candela_mitm.governance.ledger import BudgetRefusal, Reservation
from candela_mitm.governance.ratelimit import RateDecision
from candela_mitm.runtime import Runtime

from .budget import reservation_call
from .flowstate import answered, ctx_of, deny, fail_closed


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


class RateLimit:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or c.settings is None:
            return
        settings = c.settings
        # Budget's reservation (if this request needs one) rides the same store call and
        # transaction: each costs about as much CPU as the work done in it.
        # Budget still decides and answers 402 in its own hook, after this one.
        decision, reserved = await self.rt.store_call(
            _check_then_reserve,
            lambda: self.rt.limiter.check(settings.user_id, settings.requests_per_minute),
            reservation_call(self.rt, c),
        )
        if not decision.allowed:
            self.rt.metrics.rate_limited.labels(c.tenant or "").inc()
            deny(flow, decision.denial())
            return
        if reserved is not None:
            if isinstance(reserved, Reservation):
                c.reservation = reserved  # held from now on: Budget settles or releases it
            c.reserve_result = reserved  # Budget judges it in its own hook
