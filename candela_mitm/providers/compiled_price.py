"""The compiled price: a genai-prices price made ready to price many usages, its units resolved
and each unit's count read as a row of coefficients over the usage counts, once."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Any

from candela_mitm.providers import prices_source
from candela_mitm.providers.usage import Usage

PER_TOKEN = 1_000_000  # prices are USD per million tokens

# Candela's Usage field -> genai-prices usage key. input_tokens and output_tokens are totals in
# both; every other count is a part of one of them, priced at its own rate when the model has one.
_USAGE_KEYS = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cached_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "cache_write_1h_tokens": "cache_write_1h_tokens",
    "reasoning_tokens": "output_reasoning_tokens",
    "input_audio_tokens": "input_audio_tokens",
    "cached_audio_tokens": "cache_audio_read_tokens",
    "input_image_tokens": "input_image_tokens",
    "input_video_tokens": "input_video_tokens",
    "output_audio_tokens": "output_audio_tokens",
    "output_image_tokens": "output_image_tokens",
    "web_search_requests": "web_searches",
}


@cache
def unit_registry() -> Any:
    """genai-prices' unit registry: every unit a price can set, and how usage counts them."""
    prices_source.modules()
    from genai_prices.units import _get_registry  # loaded by prices_source, __init__ not run

    return _get_registry()


def _rate(price: Any, input_tokens: int) -> Decimal:
    """The rate a price charges at this many input tokens (a tier applies to all tokens past it)."""
    tiers = getattr(price, "tiers", None)
    if tiers is None:
        return Decimal(price)
    for tier in reversed(tiers):
        if input_tokens > tier.start:
            return Decimal(tier.price)
    return Decimal(price.base)


@dataclass(frozen=True)
class PricedUnit:
    """One priced unit: its genai-prices usage key, price (a Decimal or TieredPrices), `per`,
    dimensions, and its *leaf row*: the count it is billed on as a sum of coefficient x usage
    count (genai-prices bills a unit on its count minus its more specific parts' counts)."""

    usage_key: str
    price: Any
    per: int
    dimensions: Any
    row: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class CompiledPrice:
    """A genai-prices ModelPrice made ready to price many usages.

    genai-prices' `calc_price` resolves the price's units, validates their coverage and
    decomposes the usage into leaf counts on every call: 40-60 µs a price, a tenth of the event
    loop's CPU per request at 16 connections. All but the last step depend on the price alone,
    and the decomposition is linear in the counts (a unit's leaf is its count minus its priced
    descendants' leaves). So a price is compiled once: its units resolved and validated by the
    library, and each unit's leaf as a row of coefficients, read from the library's own
    `compute_leaf_values` (`_leaf_rows`). Pricing a usage is then a few sums and the library's
    `calc_unit_price` per unit (tiers stay the library's rule). tests/core/providers/
    test_compiled_price.py compares it with `calc_price` on every model the library prices.
    """

    selected: Any  # the library's price object this was compiled for (identity, for the cache)
    units: tuple[PricedUnit, ...]
    tiered: bool
    # per unit, what `ModelPrice.max_cost` takes it for, read from its dimensions once here
    # rather than four dict reads a unit per request: "input"/"output" (a token rate),
    # "requests"/"web_searches" (a fee), None (not counted: a cache read, never dearer than
    # the input it replaces, or a token unit of no direction)
    roles: tuple[str | None, ...]
    cache_writes: tuple[bool, ...]  # per unit: a cache write (left out when none is made)
    # the usage counts the units' rows read (the rest are never looked at), as (ours, theirs)
    counted: tuple[tuple[str, str], ...]
    # max_rates by cache_writes, for a price without tiers (its rates are the same for all)
    memo: dict[bool, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, prices: Any, selected: Any = None) -> CompiledPrice:
        registry = unit_registry()  # loads genai-prices' modules first
        from genai_prices.validation import validate_priced_units

        priced = priced_units(prices)
        validate_priced_units(tuple(unit for unit, _ in priced), registry)
        rows = _leaf_rows({u.usage_key: u for u, _ in priced if u.usage_key != "requests"})
        gp = prices_source.gp_types()
        units = tuple(
            PricedUnit(
                unit.usage_key,
                price,
                unit.per,
                unit.dimensions,
                rows.get(unit.usage_key, ()),
            )
            for unit, price in priced
        )
        tiered = any(isinstance(u.price, gp.TieredPrices) for u in units)
        read = {key for u in units for key, _ in u.row}
        if tiered:
            read.add("input_tokens")
        counted = tuple((ours, theirs) for ours, theirs in _USAGE_KEYS.items() if theirs in read)
        return cls(
            selected,
            units,
            tiered,
            tuple(_role(u) for u in units),
            tuple(_is_cache_write(u) for u in units),
            counted,
        )

    def max_cost(
        self, input_tokens: int, output_tokens: int, web_searches: int, cache_writes: bool
    ) -> float:
        """ModelPrice.max_cost at these prices."""
        if self.tiered:  # the rates depend on the input tokens
            in_rate, out_rate, fee_terms = self.max_rates(cache_writes, input_tokens)
        else:  # the same for every request: made once per compiled price
            got = self.memo.get(cache_writes)
            if got is None:
                got = self.memo[cache_writes] = self.max_rates(cache_writes, input_tokens)
            in_rate, out_rate, fee_terms = got
        fees = Decimal(0)
        for rate, per, per_search in fee_terms:
            fees += rate * web_searches / per if per_search else rate / per
        total = (in_rate * input_tokens + out_rate * output_tokens) / PER_TOKEN + fees
        return float(total)

    def max_rates(
        self, cache_writes: bool, input_tokens: int
    ) -> tuple[Decimal, Decimal, tuple[tuple[Decimal, int, bool], ...]]:
        """For ModelPrice.max_cost: the dearest input and output rates at this many input
        tokens, and the fees in unit order as (rate, per, per web search)."""
        in_rate = out_rate = Decimal(0)
        fees: list[tuple[Decimal, int, bool]] = []
        for unit, role, cache_write in zip(self.units, self.roles, self.cache_writes, strict=True):
            if role is None:
                continue
            if cache_write and not cache_writes:
                continue
            if role == "input":
                in_rate = max(in_rate, _rate(unit.price, input_tokens))
            elif role == "output":
                out_rate = max(out_rate, _rate(unit.price, input_tokens))
            else:  # requests, web_searches
                fees.append((_rate(unit.price, input_tokens), unit.per, role == "web_searches"))
        return in_rate, out_rate, tuple(fees)

    def price(self, usage: Usage) -> Decimal:
        """What `usage` costs (USD, exact); ValueError when its counts contradict each other (a
        part above its total), as genai-prices raises."""
        counts = {theirs: int(getattr(usage, ours)) for ours, theirs in self.counted}
        calc_unit_price = prices_source.gp_types().calc_unit_price
        total_input = counts["input_tokens"] if self.tiered else 0
        total = Decimal(0)
        for unit in self.units:
            if unit.usage_key == "requests":
                leaf = 1
            else:
                leaf = 0
                for key, coef in unit.row:
                    leaf += coef * counts.get(key, 0)
                if leaf < 0:
                    raise ValueError(f"Invalid usage data: the parts of {unit.usage_key} exceed it")
                if leaf == 0:
                    continue  # costs nothing at any rate or tier (a Decimal zero, not added)
            if type(unit.price) is Decimal:
                # calc_unit_price's rule for a flat price, without its calls: price x count / per
                total += unit.price * Decimal(leaf) / unit.per
            else:
                total += calc_unit_price(unit.price, leaf, total_input, unit.per)
        return total


def _role(unit: PricedUnit) -> str | None:
    """What max_cost takes a unit for (see `CompiledPrice.roles`)."""
    dims = unit.dimensions
    if dims.get("family") == "tokens":
        if dims.get("token_type") == "cache_read":
            return None  # never dearer than the input it replaces
        direction = dims.get("direction")
        return direction if direction in ("input", "output") else None
    if unit.usage_key in ("requests", "web_searches"):
        return str(unit.usage_key)
    return None


def _is_cache_write(unit: PricedUnit) -> bool:
    dims = unit.dimensions
    return bool(dims.get("family") == "tokens" and dims.get("token_type") == "cache_write")


def _leaf_rows(units_by_key: dict[str, Any]) -> dict[str, tuple[tuple[str, int], ...]]:
    """Each priced unit's leaf count as coefficients over the usage counts, read from
    genai-prices' `compute_leaf_values` (linear in the counts): its leaves at a base usage in
    which every part is far below its whole, and again with each count one higher.

    The base: a count of (n+2)^(D-d) x 1000 for a unit of d dimensions (D the most, n units), so
    any unit's descendants together stay far below it and every leaf is positive with room to
    spare; the differences are the coefficients, exact integers."""
    from genai_prices.decompose import compute_leaf_values

    if not units_by_key:
        return {}
    keys = sorted(units_by_key)
    deepest = max(len(u.dimensions) for u in units_by_key.values())
    base_of = len(keys) + 2
    base = {k: 1000 * base_of ** (deepest - len(units_by_key[k].dimensions)) for k in keys}
    usage_type = prices_source.gp_types().Usage

    def leaves(counts: dict[str, int]) -> dict[str, int]:
        return {
            k: int(v)
            for k, v in compute_leaf_values(set(keys), usage_type(**counts), units_by_key).items()
        }

    at_base = leaves(base)
    rows: dict[str, list[tuple[str, int]]] = {k: [] for k in keys}
    for k in keys:
        moved = leaves({**base, k: base[k] + 1})
        for unit_key in keys:
            coef = moved[unit_key] - at_base[unit_key]
            if coef:
                rows[unit_key].append((k, coef))
    return {k: tuple(v) for k, v in rows.items()}


def _library_usage(usage: Usage, prices: Any) -> Any:
    """Candela's usage as genai-prices' Usage, with a zero for every priced kind it lacks.

    The explicit zeros matter: genai-prices refuses to infer a joint kind (cached audio) from
    two reported ones (cached, audio) rather than guess.
    """
    values: dict[str, int] = {}
    for ours, theirs in _USAGE_KEYS.items():
        values[theirs] = int(getattr(usage, ours))
    for unit, _ in priced_units(prices):
        if unit.usage_key not in values and unit.usage_key != "requests":
            values[unit.usage_key] = 0
    return prices_source.gp_types().Usage(**values)


def priced_units(prices: Any) -> list[tuple[Any, Any]]:
    """(unit, price) of every registered unit a genai-prices ModelPrice sets.

    Read from the instance's fields: asking the ModelPrice for every registered unit goes
    through its __getattr__ and a registry lookup each, most of the cost of a price.
    """
    registry = unit_registry()
    out = []
    for key, value in vars(prices).items():
        if value is None or key.startswith("_"):
            continue
        try:
            out.append((registry.unit_for_price_key(key), value))
        except KeyError:
            continue  # a key this genai-prices does not price (it warns and skips it too)
    return out
