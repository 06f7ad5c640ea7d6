"""Budget: reserve the most a request can cost before it leaves (402 if it does not fit), settle after."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.context import RequestContext
from candela_mitm.governance.estimate import estimate_batch_cost, estimate_cost
from candela_mitm.governance.ledger import BudgetRefusal, KeyBudget, Reservation
from candela_mitm.governance.shadow import shadow_budget
from candela_mitm.providers.pricing import ModelPrice
from candela_mitm.runtime import Runtime

from .accounting import account_flow
from .flowstate import answered, ctx_of, deny, fail_closed

log = logging.getLogger("candela.budget")


def reserve(
    rt: Runtime, c: RequestContext, estimate: float, model: str, provider: str
) -> Reservation | BudgetRefusal:
    """Hold `estimate` on the user's budget and on the tenant's (a store call: blocking).

    The tenant's settings are read here, inside the same store call, not in a trip of their own.
    """
    settings = c.settings
    assert settings is not None
    tenant = None
    if c.tenant is not None:
        tenant = rt.users.tenant_settings_cached(c.tenant)
    key = c.principal.key_scope if c.principal else None  # a minted key's own budget
    result = rt.ledger.reserve(
        settings.user_id,
        c.tenant,
        estimate,
        settings.daily_budget_usd,
        c.span_id,
        model=model,
        provider=provider,
        period=settings.budget_period,
        tenant_budget_usd=tenant.budget_usd if tenant else None,
        tenant_period=tenant.period if tenant else settings.budget_period,
        key_budget=(
            KeyBudget(key.key_id, key.budget_id or key.key_id, key.budget_usd)
            if key is not None and key.budget_usd is not None
            else None
        ),
    )
    # governance.shadow: the candidate judged on the counters this reserve saw, never enforced
    shadow_budget(rt.shadow, c, estimate, result, settings.budget_period, tenant.period if tenant else None)
    return result


def request_estimate(rt: Runtime, c: RequestContext, price: ModelPrice) -> float:
    """The most a planned request can cost; a batch: the sum over its requests (each at its
    model's batch price where one is known: governance/estimate.py)."""
    plan = c.plan
    assert plan is not None
    default_max = rt.config.governance.budgets.default_max_output_tokens
    if plan.operation.model == "file" and c.job_input is not None:
        return float(c.job_input["estimate_usd"])  # read from its input file at the upload
    if plan.batch is not None:
        route = plan.upstream.name
        # a request whose model has no price costs nothing under unknown_model_price: zero
        # (under deny, addons/jobs.py refused the batch)
        priced = [(m, p) for m, p in plan.batch if rt.pricing.get(m, route) is not None]
        return estimate_batch_cost(priced, default_max, lambda m: rt.pricing.get(m, route))
    return estimate_cost(c.body, plan.max_output_tokens, default_max, price, c.scan)


def reservation_call(
    rt: Runtime, c: RequestContext
) -> Callable[[], Reservation | BudgetRefusal] | None:
    """The reserve Budget.request would make, as a call RateLimit can run in its own store trip.

    None when Budget has nothing to reserve or its own hook must decide (local model, no model,
    unknown price, an estimate that fails): Budget then does exactly what it always did.
    """
    plan = c.plan
    settings = c.settings
    if plan is None or settings is None or plan.upstream.spec.local:
        return None
    if plan.session:
        estimate = rt.config.governance.websocket.reserve_usd  # the session's first slice
    else:
        if not plan.model or not plan.metered:  # a free or operator-allowed read: nothing held
            return None
        price = rt.pricing.get(plan.model, plan.upstream.name)
        if price is None:
            return None
        try:
            estimate = request_estimate(rt, c, price)
        except Exception:
            return None  # Budget.request computes it again, after the rate limit: fails closed
    model, provider = plan.model or "", plan.upstream.name

    def reserve_now() -> Reservation | BudgetRefusal:
        # on the pool thread while the flow's hook awaits it: nothing else touches the context.
        # Set only here, as Budget.request would: a rate-limited request audits no estimate.
        c.estimate_usd = estimate
        return reserve(rt, c, estimate, model, provider)

    return reserve_now


class Budget:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or c.settings is None:
            return
        if c.reserve_result is not None:  # RateLimit already made this request's reservation
            reserved, c.reserve_result = c.reserve_result, None
            if isinstance(reserved, BudgetRefusal):
                self.rt.metrics.budget_denied.labels(self.rt.metrics.tenant_label(c.tenant or ""), "budget_exceeded").inc()
                deny(flow, reserved.denial())
            return
        plan = c.plan
        if plan.upstream.spec.local:
            return  # local models cost nothing and are never blocked by budget
        if plan.session:
            c.estimate_usd = self.rt.config.governance.websocket.reserve_usd
        else:
            if not plan.model or not plan.metered:
                return  # free reads cost nothing and are never blocked by budget
            price = self.rt.pricing.get(plan.model, plan.upstream.name)
            if price is None:
                if self.rt.config.governance.unknown_model_price == "deny":
                    m = self.rt.metrics
                    m.budget_denied.labels(
                        m.tenant_label(c.tenant or ""), "model_price_unknown"
                    ).inc()
                    deny(flow, errors.model_price_unknown(plan.model))
                    return
                return  # unknown_model_price: zero
            c.estimate_usd = request_estimate(self.rt, c, price)
        result = await self.rt.store_call(
            reserve, self.rt, c, c.estimate_usd, plan.model or "", plan.upstream.name
        )
        if isinstance(result, BudgetRefusal):
            self.rt.metrics.budget_denied.labels(self.rt.metrics.tenant_label(c.tenant or ""), "budget_exceeded").inc()
            deny(flow, result.denial())
            return
        c.reservation = result

    async def _close(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        """Settle what the request is charged (governance/accounting.py), or release the hold of
        one that never reached the provider or that the provider refused."""
        if c.reservation is None:
            return
        if c.plan is not None and c.plan.session:
            if flow.response is not None and flow.response.status_code == 101 and not c.denial_code:
                return  # the session holds it from here: addons/websocket.py settles it
            # the upgrade was refused or failed before a session began: no frame reached a model
            res, c.reservation = c.reservation, None
            try:
                await self.rt.store_call(self.rt.ledger.release, res)
            except Exception:
                log.exception("could not release reservation %s", res.id)
            return
        account_flow(self.rt, flow, c)  # while the reservation is on the context: it is charged
        res, c.reservation = c.reservation, None
        try:
            if c.usage_source is not None:
                plan = c.plan
                assert plan is not None
                settled = await self.rt.store_call(
                    self.rt.ledger.settle,
                    res,
                    c.cost_usd,
                    c.usage.input_tokens,
                    c.usage.output_tokens,
                    plan.model or "",
                    plan.upstream.name,
                )
                if settled.applied and self.rt.alerts is not None:
                    self.rt.alerts.settled(res)  # committed: look for a threshold crossed
            else:
                await self.rt.store_call(self.rt.ledger.release, res)
        except Exception:
            # the reservation stays in the store: the next start settles it at its amount
            log.exception("could not settle reservation %s", res.id)

    async def response(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            await self._close(flow, c)

    async def error(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            await self._close(flow, c)
