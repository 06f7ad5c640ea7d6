"""Async jobs: a batch's input checked and estimated; a finished job's real cost, priced per
model, batches at the batch price."""

from __future__ import annotations

import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance.estimate import estimate_batch_cost
from candela_mitm.governance.jobs import (
    batch_file_models,
    job_cost,
    other_batch_models,
    unpriced_model,
    upload_record,
    upload_refusal,
)
from candela_mitm.providers.batchfile import BatchInput, BatchLine
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


def line(model: str, max_tokens: int = 100) -> BatchLine:
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    return BatchLine("c", "/v1/chat/completions", model, body)


def price_of(model: str):
    return TABLE.get(model, "openai")


@pytest.mark.parametrize(
    "parsed, status, code",
    [
        ("line 3 is not JSON", 400, "bad_request"),
        (BatchInput("fine-tune", ()), 404, "endpoint_not_governed"),
        (BatchInput("batch", (line("gpt-4o-mini"),)), None, None),
    ],
)
def test_upload_refusal(parsed, status, code):
    denial = upload_refusal(parsed, "openai")
    if status is None:
        assert denial is None
    else:
        assert denial is not None
        assert (denial.status, denial.payload()["error"]) == (status, code)


@pytest.mark.parametrize(
    "models, expected",
    [
        ([], None),
        (["gpt-4o-mini", "house-model"], None),
        (["gpt-4o-mini", "nobody-knows", "nor-this"], "nobody-knows"),
    ],
)
def test_unpriced_model(models, expected):
    assert unpriced_model(models, price_of) == expected


def test_an_upload_record_names_its_owner_models_and_the_most_its_priced_lines_cost():
    parsed = BatchInput(
        "batch", (line("gpt-4o-mini", 50), line("nobody-knows"), line("gpt-4o-mini", 70))
    )
    got = upload_record(parsed, "ana", "eng", 4096, price_of)
    priced = [("gpt-4o-mini", parsed.lines[0].body), ("gpt-4o-mini", parsed.lines[2].body)]
    assert got == {
        "user_id": "ana",
        "tenant": "eng",
        "models": ["gpt-4o-mini", "nobody-knows"],
        "requests": 3,
        "estimate_usd": estimate_batch_cost(priced, 4096, price_of),
    }
    assert got["estimate_usd"] > 0


RECORD = {"user_id": "ana", "models": ["gpt-4o-mini", "gpt-4o"]}


@pytest.mark.parametrize(
    "record, user, expected",
    [
        (RECORD, "ana", ["gpt-4o-mini", "gpt-4o"]),
        (RECORD, "bob", None),  # someone else's upload
        (RECORD, None, None),
        (None, "ana", None),  # never seen uploaded through Candela
        ({"user_id": "ana", "models": []}, "ana", None),
        ({"user_id": "ana", "models": "gpt-4o"}, "ana", None),
    ],
)
def test_batch_file_models(record, user, expected):
    assert batch_file_models(record, user) == expected


@pytest.mark.parametrize(
    "batch, planned, expected",
    [
        ([("a", {}), ("b", {}), ("a", {}), ("c", {})], "a", ["b", "c"]),
        ([("a", {}), ("a", {})], "a", []),
        ([("b", {}), ("a", {})], None, ["b", "a"]),
    ],
)
def test_other_batch_models(batch, planned, expected):
    assert other_batch_models(batch, planned) == expected
