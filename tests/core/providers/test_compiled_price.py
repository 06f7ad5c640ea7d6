"""The compiled price (providers/compiled_price.py) against genai-prices itself: on every price
the library holds, it bills what `calc_price` bills, and its upper bound reads what a per-call
reading of each unit's dimensions gave."""

from __future__ import annotations

import copy
import random
from decimal import Decimal

import pytest

from candela_mitm.providers import prices_source
from candela_mitm.providers.compiled_price import (
    PER_TOKEN,
    CompiledPrice,
    _library_usage,
    _rate,
)
from candela_mitm.providers.usage import Usage


def _every_library_price() -> list[tuple[str, object]]:
    """(name, genai-prices ModelPrice) of every price the library knows: each provider's models,
    each conditional price (start dates, times of day) and each variant context (service tiers,
    batch processing)."""
    out: list[tuple[str, object]] = []
    for provider in prices_source.snapshot().providers:
        for info in provider.models:
            prices = info.prices if isinstance(info.prices, list) else [info]
            standards = [getattr(p, "prices", p) for p in prices] if prices[0] is not info else [
                info.prices
            ]
            for i, standard in enumerate(standards):
                out.append((f"{provider.id}/{info.id}#{i}", standard))
            for j, variant in enumerate(getattr(info, "price_variants", None) or ()):
                resolved = copy.copy(standards[-1])
                resolved.__dict__.update(
                    {k: v for k, v in variant.prices.__dict__.items() if v is not None}
                )
                out.append((f"{provider.id}/{info.id}~{j}", resolved))
    return out


def _usages(rng: random.Random) -> list[Usage]:
    """Valid usages built from disjoint parts (so every part is within its whole), every kind
    Candela reads, zero and large counts, past the long-context tiers."""
    out = [Usage(0, 0, 0), Usage(1, 1, 0), Usage(250_000, 4_000, 0)]
    for _ in range(12):
        n = lambda hi: rng.choice([0, 0, rng.randint(1, hi)])  # noqa: E731
        cached_audio, cached_text, audio = n(2_000), n(150_000), n(5_000)
        image, video, write, write_1h, text = n(3_000), n(3_000), n(40_000), n(40_000), n(300_000)
        reasoning, out_audio, out_image, out_text = n(5_000), n(2_000), n(2_000), n(8_000)
        out.append(
            Usage(
                cached_audio + cached_text + audio + image + video + write + write_1h + text,
                reasoning + out_audio + out_image + out_text,
                cached_audio + cached_text,
                cache_write_tokens=write + write_1h,
                cache_write_1h_tokens=write_1h,
                reasoning_tokens=reasoning,
                input_audio_tokens=cached_audio + audio,
                cached_audio_tokens=cached_audio,
                input_image_tokens=image,
                input_video_tokens=video,
                output_audio_tokens=out_audio,
                output_image_tokens=out_image,
                web_search_requests=n(5),
            )
        )
    return out


def test_a_compiled_price_bills_exactly_what_genai_prices_bills_for_every_model() -> None:
    """The compiled price (CompiledPrice: units resolved once, leaf rows read from the
    library's decomposition) against genai-prices' own calc_price, to the last Decimal digit, on
    every price the library holds and usages of every kind; a usage or a price the library
    refuses is refused too."""
    rng = random.Random(21)
    usages = _usages(rng)
    contradictory = Usage(100, 10, 90, cache_write_tokens=50)  # 90 + 50 cached/written > 100
    checked = refused = 0
    for name, prices in _every_library_price():
        try:
            compiled = CompiledPrice.of(prices)
        except ValueError:
            with pytest.raises(ValueError):
                prices.calc_price(_library_usage(Usage(10, 10, 0), prices))  # type: ignore[attr-defined]
            refused += 1
            continue
        for usage in [*usages, contradictory]:
            try:
                expected = prices.calc_price(_library_usage(usage, prices))["total_price"]  # type: ignore[attr-defined]
            except ValueError:
                with pytest.raises(ValueError):
                    compiled.price(usage)
                continue
            assert compiled.price(usage) == expected, (name, usage)
            checked += 1
    assert checked > 10_000 and refused < checked / 100


def _reference_max_cost(compiled: CompiledPrice, input_tokens: int, output_tokens: int, web_searches: int,
                        cache_writes: bool) -> float:
    """max_cost as it read each unit's dimensions on every call (before issue 21)."""
    in_rate = out_rate = Decimal(0)
    fees = Decimal(0)
    for unit in compiled.units:
        dims = unit.dimensions
        if dims.get("family") == "tokens":
            if dims.get("token_type") == "cache_read":
                continue
            if dims.get("token_type") == "cache_write" and not cache_writes:
                continue
            rate = _rate(unit.price, input_tokens)
            if dims.get("direction") == "input":
                in_rate = max(in_rate, rate)
            elif dims.get("direction") == "output":
                out_rate = max(out_rate, rate)
        elif unit.usage_key == "requests":
            fees += _rate(unit.price, input_tokens) / unit.per
        elif unit.usage_key == "web_searches":
            fees += _rate(unit.price, input_tokens) * web_searches / unit.per
    return float((in_rate * input_tokens + out_rate * output_tokens) / PER_TOKEN + fees)


def test_max_cost_made_once_per_price_is_the_per_call_reading_for_every_model() -> None:
    """The roles and rates read once per compiled price (and kept) give the very float the
    per-call reading gave, on every library price, across tiers, searches and cache writes,
    asked twice (the second from what was kept)."""
    checked = 0
    for _name, prices in _every_library_price():
        try:
            compiled = CompiledPrice.of(prices)
        except ValueError:
            continue
        for inp, out, searches, writes in [
            (0, 0, 0, True), (1_000, 500, 0, True), (300_000, 4_000, 3, False),
            (150_000, 0, 10, True), (1, 1, 1, False),
        ]:
            expected = _reference_max_cost(compiled, inp, out, searches, writes)
            assert compiled.max_cost(inp, out, searches, writes) == expected, _name
            assert compiled.max_cost(inp, out, searches, writes) == expected, _name
            checked += 1
    assert checked > 1_000
