"""Laptop-mode settings: validation, merge, the settings file, the cached-input multiplier."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from candela_mitm.config import parse_config
from candela_mitm.context import RequestContext
from candela_mitm.errors import ConfigError
from candela_mitm.governance.accounting import account
from candela_mitm.governance.ledger import Reservation
from candela_mitm.local.settings import SETTINGS_FILE, LocalSettings, merge_settings
from candela_mitm.observability.spans import TraceContext
from candela_mitm.providers.forwarding import ForwardPlan, plan_chat_completion
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.specs import resolve_all
from candela_mitm.providers.streaming import ResponseProcessor
from candela_mitm.providers.usage import Usage
from tests.core.local.support import local_runtime, nowhere

BASE = LocalSettings(cache_ttl_s=3600, gemini_cache_price_multiplier=0.25)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, BASE),
        ({"cache_ttl_s": 60}, LocalSettings(cache_ttl_s=60, gemini_cache_price_multiplier=0.25)),
        (
            {"gemini_cache_price_multiplier": 0.5},
            LocalSettings(cache_ttl_s=3600, gemini_cache_price_multiplier=0.5),
        ),
        (
            {"gemini_cache_price_multiplier": 1},
            LocalSettings(cache_ttl_s=3600, gemini_cache_price_multiplier=1.0),
        ),
        (
            {"cache_ttl_s": 0, "gemini_cache_price_multiplier": 0},
            LocalSettings(cache_ttl_s=0, gemini_cache_price_multiplier=0.0),
        ),
    ],
)
def test_valid_changes_merge(changes, expected):
    assert merge_settings(BASE, changes) == expected


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"cache_ttl_s": -1}, "cache_ttl_s"),
        ({"cache_ttl_s": "60"}, "cache_ttl_s"),  # strict: a string is not a number
        ({"cache_ttl_s": True}, "cache_ttl_s"),
        ({"cache_ttl_s": 1.5}, "cache_ttl_s"),
        ({"cache_ttl_s": 10**9}, "cache_ttl_s"),
        ({"gemini_cache_price_multiplier": 1.5}, "less than or equal to 1"),
        ({"gemini_cache_price_multiplier": -0.1}, "greater than or equal to 0"),
        ({"gemini_cache_price_multiplier": float("nan")}, "gemini_cache_price_multiplier"),
        ({"gemini_cache_price_multiplier": None}, "gemini_cache_price_multiplier"),
        ({"runtime_command": ["sh", "-c", "id"]}, "runtime_command: unknown key"),
        ([1, 2], "JSON object"),
        ("x", "JSON object"),
    ],
)
def test_invalid_changes_name_the_key(changes, words):
    with pytest.raises(ValueError) as e:
        merge_settings(BASE, changes)
    assert words in str(e.value)


def test_settings_persist_and_override_the_yaml(tmp_path):
    rt = local_runtime(tmp_path, nowhere(), nowhere(), cache_ttl_s=10)
    assert rt.settings == LocalSettings(cache_ttl_s=10, gemini_cache_price_multiplier=0.25)
    committed = []
    before, after = rt.update_settings(
        {"gemini_cache_price_multiplier": 0.4}, lambda b, a: committed.append((b, a))
    )
    assert committed == [(before, after)] and after.gemini_cache_price_multiplier == 0.4
    saved = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert saved == {"cache_ttl_s": 10, "gemini_cache_price_multiplier": 0.4}
    again = local_runtime(tmp_path, nowhere(), nowhere(), cache_ttl_s=10)
    assert again.settings == after


def test_a_change_whose_record_fails_is_not_made(tmp_path):
    rt = local_runtime(tmp_path, nowhere(), nowhere())

    def refuse(before, after):
        raise TimeoutError("audit down")

    with pytest.raises(TimeoutError):
        rt.update_settings({"cache_ttl_s": 5}, refuse)
    assert rt.settings.cache_ttl_s == 3600
    assert not (tmp_path / SETTINGS_FILE).exists()


def test_no_change_is_not_recorded(tmp_path):
    rt = local_runtime(tmp_path, nowhere(), nowhere())
    calls = []
    rt.update_settings({"cache_ttl_s": 3600}, lambda b, a: calls.append(1))
    assert calls == [] and not (tmp_path / SETTINGS_FILE).exists()


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "invalid JSON"),
        ('{"cache_ttl_s": -5}', "cache_ttl_s"),
        ('{"surprise": 1}', "surprise: unknown key"),
    ],
)
def test_a_bad_settings_file_fails_the_start_naming_it(tmp_path, content, words):
    (tmp_path / SETTINGS_FILE).write_text(content)
    with pytest.raises(ConfigError) as e:
        local_runtime(tmp_path, nowhere(), nowhere())
    assert SETTINGS_FILE in str(e.value) and words in str(e.value)


@pytest.mark.parametrize(
    "route, expected",
    [("google", 0.25), ("gemini-oai", 0.25), ("openai", None), ("anthropic", None)],
)
def test_the_multiplier_applies_to_gemini_routes_only(tmp_path, route, expected):
    assert local_runtime(tmp_path, nowhere(), nowhere()).cached_multiplier(route) == expected


class _Reported(ResponseProcessor):
    """An answer that reported `usage` whole."""

    def __init__(self, usage: Usage) -> None:
        self._usage = usage

    def feed(self, data: bytes) -> bytes:
        return data

    @property
    def usage(self) -> Usage:
        return self._usage

    @property
    def reported(self) -> bool:
        return True


T = datetime(2026, 5, 17, tzinfo=UTC)


def test_accounting_prices_cached_gemini_input_with_the_planned_multiplier(tmp_path):
    cfg = parse_config({})
    pricing = PricingTable.from_config(cfg)
    price = pricing.get("gemini-2.5-flash")
    assert price is not None
    usage = Usage(input_tokens=10_000, output_tokens=1_000, cached_tokens=8_000)
    costs = {}
    for multiplier in (None, 0.25, 0.5):
        plan = plan_chat_completion(resolve_all(cfg), "gemini-oai", {"model": "gemini-2.5-flash"})
        assert isinstance(plan, ForwardPlan)
        ctx = RequestContext(
            kind="chat", provider=None, rest="", trace=TraceContext("0" * 32, None)
        )
        ctx.cached_multiplier = multiplier
        ctx.plan, ctx.forwarded, ctx.processor = plan, True, _Reported(usage)
        ctx.reservation = Reservation("r", "u", None, 0.0, "2026-05-17", "s", "o", T, 0.0)
        account(ctx, pricing)
        assert ctx.usage_source == "reported"
        costs[multiplier] = ctx.cost_usd
    full = 2_000 * price.input + 1_000 * price.output
    assert costs[0.5] == pytest.approx((full + 8_000 * price.input * 0.5) / 1e6)
    assert costs[0.25] == pytest.approx((full + 8_000 * price.input * 0.25) / 1e6)
    assert costs[None] == pytest.approx((full + 8_000 * (price.cached_input or 0)) / 1e6)
