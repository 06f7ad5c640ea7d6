"""Async jobs: what a batch's input file may hold and cost, and what a finished job really cost,
from the usage its result reports."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from candela_mitm import errors
from candela_mitm.errors import Denial
from candela_mitm.governance.estimate import estimate_batch_cost
from candela_mitm.providers.batchfile import BatchInput
from candela_mitm.providers.jobs import BATCH_JOBS
from candela_mitm.providers.pricing import ModelPrice, PricingTable
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


# -- a batch's input: checked when it is uploaded, and again when a batch names it ---------------


def upload_refusal(parsed: BatchInput | str, route: str) -> Denial | None:
    """Why an upload is refused before its models are checked: a file that cannot be read (400),
    or one that is not a batch's input (the only files uploaded through Candela); None if neither."""
    if isinstance(parsed, str):
        return errors.bad_request(parsed)
    if parsed.purpose != "batch":
        return errors.endpoint_not_governed(
            "POST", "/v1/files", route,
            "only a batch's input file (purpose=batch) is uploaded through Candela",
        )
    return None


def unpriced_model(
    models: Iterable[str], price_of: Callable[[str], ModelPrice | None]
) -> str | None:
    """The first model without a price (refused 402 model_price_unknown when
    governance.unknown_model_price is deny), or None."""
    return next((m for m in models if price_of(m) is None), None)


def upload_record(
    parsed: BatchInput,
    user: str | None,
    tenant: str,
    default_max: int,
    price_of: Callable[[str], ModelPrice | None],
) -> dict[str, Any]:
    """What is recorded with a batch's input file once the provider names it: its owner, models,
    request count and the most its requests can cost (a line whose model has no price counts
    zero: unknown_model_price allowed it). CPU-bound for a large file: call it off the loop."""
    priced = [(line.model, line.body) for line in parsed.lines if price_of(line.model) is not None]
    return {
        "user_id": user,
        "tenant": tenant,
        "models": list(parsed.models),
        "requests": len(parsed.lines),
        "estimate_usd": estimate_batch_cost(priced, default_max, price_of),
    }


def batch_file_models(record: Mapping[str, Any] | None, user: str | None) -> list[str] | None:
    """The models of the input file a batch names, if `user` uploaded it through Candela (its
    record holds them); None otherwise (refused: batch_file_not_governed)."""
    models = record.get("models") if record else None
    if (
        record is None
        or user is None
        or record.get("user_id") != user
        or not isinstance(models, list)
        or not models
    ):
        return None
    return [str(m) for m in models]


def other_batch_models(batch: Iterable[tuple[str, Any]], planned: str | None) -> list[str]:
    """The models of a batch's requests besides the one it is planned under, each once, in order
    (ModelPolicy checked that one)."""
    return [m for m in dict.fromkeys(m for m, _ in batch) if m != planned]
