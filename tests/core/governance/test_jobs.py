"""Async jobs: a finished job's real cost, priced per model, batches at the batch price."""

from __future__ import annotations

import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance.jobs import job_cost
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage

TABLE = PricingTable.from_config(
    parse_config({"pricing": {"house-model": {"input": 1.0, "output": 2.0}}})
)


def price(model: str):
    p = TABLE.get(model)
    assert p is not None
    return p


@pytest.mark.parametrize(
    "kind, usages, job_model, expected_usd, expected_total",
    [
        # a background response: the list price of the job's model
        ("openai.response", [(None, Usage(100, 10))], "gpt-4o-mini",
         price("gpt-4o-mini").cost(Usage(100, 10)), Usage(100, 10)),
        # a batch: each result by its own model, at the batch price
        ("anthropic.batch", [("claude-sonnet-4-5", Usage(10, 5)), ("claude-haiku-4-5", Usage(20, 1))],
         "claude-sonnet-4-5",
         price("claude-sonnet-4-5").cost(Usage(10, 5), processing="batch")
         + price("claude-haiku-4-5").cost(Usage(20, 1), processing="batch"), Usage(30, 6)),
        # a model whose batch price is unknown: its list price
        ("openai.batch", [(None, Usage(1_000_000, 0))], "house-model", 1.0, Usage(1_000_000, 0)),
        # a batch whose every request failed costs nothing
        ("anthropic.batch", [], "claude-sonnet-4-5", 0.0, Usage()),
    ],
)
def test_job_cost(kind, usages, job_model, expected_usd, expected_total):
    route = {"openai": "openai", "anthropic": "anthropic-direct", "gemini": "google"}[kind.split(".")[0]]
    got = job_cost(kind, usages, job_model, route, TABLE)
    assert got is not None
    usd, total = got
    assert usd == pytest.approx(expected_usd) and total == expected_total


def test_batch_results_cost_half_the_list_price_where_known():
    usd, _ = job_cost("gemini.batch", [(None, Usage(1000, 1000))], "gemini-2.5-flash", "google", TABLE)
    assert usd == pytest.approx(price("gemini-2.5-flash").cost(Usage(1000, 1000)) / 2)


def test_a_model_without_a_price_leaves_the_job_as_charged():
    assert job_cost("anthropic.batch", [("nobody-knows", Usage(1, 1))], "claude-sonnet-4-5", "anthropic-direct", TABLE) is None
