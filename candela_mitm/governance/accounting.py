"""Accounting: the usage and cost of one request, computed once whichever way it ended.

A forwarded request is never free because its usage could not be read. It is charged:
- `reported`: the usage the answer reported, when it reported all of it and ended normally;
- otherwise the larger of its reservation and the usage observed so far (the input Candela
  sent, the output counted as the stream passed): `observed` when that is larger, `reserved`
  when the reservation is. That covers an answer of unknown shape or without usage (a queued
  job), a client that disconnects mid-stream, an upstream that cuts the stream, an upstream
  timeout, and (at the next start, governance/reconcile.py) a proxy that died mid-request.
Nothing is charged (the reservation is released) only where the provider provably did not run
the request: it was never reached (no connection was made), or it answered with an error status
that says it refused the request (see `provider_refused`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from candela_mitm.context import RequestContext
from candela_mitm.governance.estimate import estimate_input_tokens
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage

UsageSource = Literal["reported", "observed", "reserved"]
USAGE_SOURCES: tuple[UsageSource, ...] = ("reported", "observed", "reserved")

# An error answer is the provider saying it did not do the work (bad request, credentials, not
# found, its own rate limit, 5xx overload or failure): providers bill tokens generated, and these
# generate none. Timeouts are the exception: 408 and 504 say the request timed out somewhere
# past the edge while the model may have run it.
_MAYBE_RAN = frozenset({408, 504})


def provider_refused(status: int | None) -> bool:
    """A complete error answer that proves the provider did not run (bill) the request."""
    return status is not None and status >= 400 and status not in _MAYBE_RAN


def charge(
    *,
    usage: Usage,
    reported: bool,
    failed: bool,
    status: int | None,
    observed_output: int,
    input_estimate: Callable[[], int],
    reserved_usd: float,
    cost_of: Callable[[Usage], float],
) -> tuple[Usage, float, UsageSource | None]:
    """(tokens to record, USD to charge, how it was found) for a request that reached the
    upstream; source None means nothing is charged (the reservation is released)."""
    if reported and not failed:
        return usage, cost_of(usage), "reported"
    if provider_refused(status):
        if reported:  # an error body that carries a usage: the provider billed that
            return usage, cost_of(usage), "reported"
        return usage, 0.0, None
    observed = Usage(
        usage.input_tokens or input_estimate(),
        max(usage.output_tokens, observed_output),
        usage.cached_tokens,
    )
    observed_usd = cost_of(observed)
    if observed_usd > reserved_usd:
        return observed, observed_usd, "observed"
    return observed, reserved_usd, "reserved"


def account(ctx: RequestContext, pricing: PricingTable, unknown_price: str = "deny") -> None:
    """Read the usage the processor saw (all of it, or what passed before a failure) and price it.

    Call it while the request's reservation is still on the context: it is what an unreadable
    answer is charged.
    """
    if ctx.finished:
        return
    ctx.finished = True
    if ctx.feed_pending is not None:
        feed, ctx.feed_pending = ctx.feed_pending, None
        feed()
    proc = ctx.processor
    if proc is not None:
        ctx.usage = proc.usage
    plan = ctx.plan
    if not ctx.forwarded or ctx.upstream_unreached or plan is None:
        ctx.cost_usd = 0.0
        return
    if plan.session:
        # a WebSocket upgrade: the session it opens is charged frame by frame, apart
        # (governance/sessions.py, its llm_session audit entry); the upgrade itself costs nothing
        ctx.cost_usd = 0.0
        return
    local = plan.upstream.spec.local
    price = pricing.get(plan.model, plan.upstream.name) if plan.model and not local else None
    res = ctx.reservation
    if price is None or res is None:
        # a local model, a price unknown under `unknown_model_price: zero`, or nothing reserved
        # (a free read): nothing is charged. Every metered request holds a reservation here.
        ctx.cost_usd = 0.0
        return
    # a queued job (async) or an operation whose answer carries no usage is never "reported":
    # what it was reserved is the least it costs (charge() takes the larger with what passed)
    reported = proc is not None and proc.reported and not plan.charge_reservation
    # a multiplier fixed when the request was planned (local mode's Gemini context-cache price)
    multiplier = ctx.cached_multiplier
    body = plan.body if plan.body is not None else ctx.body
    ctx.usage, ctx.cost_usd, ctx.usage_source = charge(
        usage=ctx.usage,
        reported=reported,
        failed=ctx.error is not None,
        status=ctx.status_code,
        observed_output=proc.observed_output if proc is not None else 0,
        input_estimate=lambda: estimate_input_tokens(body),
        reserved_usd=res.amount_usd,
        cost_of=lambda u: price.cost(u, cached_multiplier=multiplier),
    )
