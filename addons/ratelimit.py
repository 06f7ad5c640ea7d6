"""RateLimit: per-user requests per minute over a sliding window shared by every proxy process."""

from __future__ import annotations

from mitmproxy import http

from candela_mitm.runtime import Runtime

from .flowstate import answered, ctx_of, deny, fail_closed


class RateLimit:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or c.settings is None:
            return
        decision = await self.rt.blocking(
            self.rt.limiter.check, c.settings.user_id, c.settings.requests_per_minute
        )
        if not decision.allowed:
            self.rt.metrics.rate_limited.labels(c.tenant or "").inc()
            deny(flow, decision.denial())
