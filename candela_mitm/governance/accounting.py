"""Accounting: the usage and cost of one request, computed once whichever way it ended."""

from __future__ import annotations

from candela_mitm.context import RequestContext
from candela_mitm.providers.pricing import PricingTable


def account(ctx: RequestContext, pricing: PricingTable, unknown_price: str = "deny") -> None:
    """Read the usage the processor saw (all of it, or what passed before a failure) and price it."""
    if ctx.finished:
        return
    ctx.finished = True
    if ctx.feed_pending is not None:
        feed, ctx.feed_pending = ctx.feed_pending, None
        feed()
    if ctx.processor is not None:
        ctx.usage = ctx.processor.usage
    plan = ctx.plan
    if plan is None or plan.upstream.spec.local or not plan.model:
        ctx.cost_usd = 0.0
        return
    price = pricing.get(plan.model)
    # a multiplier fixed when the request was planned (local mode's Gemini context-cache price)
    multiplier = plan.notes.get("cached_multiplier")
    ctx.cost_usd = price.cost(ctx.usage, cached_multiplier=multiplier) if price is not None else 0.0
    answered_ok = ctx.status_code is None or ctx.status_code < 400  # an error answer ran nothing
    if plan.charge_reservation and ctx.forwarded and answered_ok and ctx.reservation is not None:
        # a queued job or an answer with no usage on the wire: what was reserved is what it costs
        # (at least), never $0
        ctx.cost_usd = max(ctx.cost_usd, float(ctx.reservation.amount_usd))
