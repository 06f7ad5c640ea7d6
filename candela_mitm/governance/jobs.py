"""Async jobs: what a finished job really cost, from the usage its result reports."""

from __future__ import annotations

from collections.abc import Sequence

from candela_mitm.providers.jobs import BATCH_JOBS
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage


def job_cost(
    kind: str,
    usages: Sequence[tuple[str | None, Usage]],
    job_model: str,
    route: str,
    pricing: PricingTable,
) -> tuple[float, Usage] | None:
    """(USD, the tokens summed) of a job's result: each usage priced by its own model (None: the
    job's), a batch at the provider's batch price where genai-prices knows one (else the list
    price). None when a model has no price (the job then stays charged as it was)."""
    processing = "batch" if kind in BATCH_JOBS else None
    usd = 0.0
    total = Usage()
    for model, usage in usages:
        price = pricing.get(model or job_model, route)
        if price is None:
            return None
        usd += price.cost(usage, processing=processing)
        total = Usage(
            total.input_tokens + usage.input_tokens,
            total.output_tokens + usage.output_tokens,
            total.cached_tokens + usage.cached_tokens,
        )
    return usd, total
