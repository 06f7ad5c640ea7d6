"""Pricing: what a model costs per token kind on a route, from genai-prices and the config.

The default price of every model comes from genai-prices (prices_source.py), matched by the
route's provider and the model reference as the client sent it (snapshots, aliases, Bedrock and
Vertex ids resolve there). `pricing.<model>` in the config overrides the fields it names, or adds
a model the library does not know. data/pricing.json keeps only what the library lacks (each
model's output limit, for the reservation).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from copy import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache, lru_cache
from importlib import resources
from typing import Any
from urllib.parse import unquote

from candela_mitm.config import Config, Price
from candela_mitm.providers import prices_source
from candela_mitm.providers.models import base_model, canonical_model
from candela_mitm.providers.usage import Usage

log = logging.getLogger("candela.pricing")

PER_TOKEN = 1_000_000

# Candela's provider route -> the genai-prices provider whose price list bills it.
ROUTE_PROVIDERS: dict[str, str] = {
    "openai": "openai",
    "anthropic-direct": "anthropic",
    "google": "google",
    "gemini-oai": "google",
    # Claude on Vertex AI: Google's list (it falls back to Anthropic's for a model it lacks)
    "anthropic": "google",
    "anthropic-vertex": "google",
    "anthropic-bedrock": "aws",
    "bedrock-mantle": "aws",
}
# A library provider -> the route /v1/chat/completions sends its models to (the routing hint).
CHAT_ROUTES: dict[str, str] = {"openai": "openai", "anthropic": "anthropic", "google": "gemini-oai"}
# Whose price a model has when no route is known: the model's maker, in this order.
FIRST_PARTY = ("openai", "anthropic", "google")

# config field -> genai-prices price key (USD per million tokens)
CONFIG_KEYS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cached_input": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
}

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
_SERVICE_TIERS = frozenset({"priority", "flex", "fast", "ultrafast"})


@cache
def _registry() -> Any:
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


def _base(price: Any) -> float | None:
    if price is None:
        return None
    return float(getattr(price, "base", price))


@dataclass(frozen=True)
class ModelPrice:
    """One model's price on one route. input/output/cached_input are the standard base rates."""

    model: str
    input: float
    output: float
    cached_input: float | None = None
    max_output_tokens: int | None = None
    provider: str | None = None  # the route /v1/chat/completions sends the model to
    cache_write: float | None = None  # 5-minute (or the only) cache write rate
    cache_write_1h: float | None = None
    context_window: int | None = None
    source: str = "config"  # "genai-prices <version>", "config", or both joined by " + "
    library_provider: str | None = None  # the genai-prices provider id the price comes from
    info: Any = field(default=None, compare=False, repr=False)  # genai-prices ModelInfo
    overrides: tuple[tuple[str, Decimal], ...] = ()  # config price keys over the library's
    # the prices in force, compiled once per (tier, processing, multiplier, library price)
    _compiled: dict[tuple[Any, ...], _Compiled] = field(
        default_factory=dict, init=False, compare=False, repr=False, hash=False
    )
    _recent: dict[tuple[Any, ...], tuple[float, _Compiled]] = field(
        default_factory=dict, init=False, compare=False, repr=False, hash=False
    )

    def rates(
        self,
        service_tier: str | None = None,
        when: datetime | None = None,
        processing: str | None = None,
    ) -> Any:
        """The genai-prices ModelPrice in force now (or `when`), for a service tier if it has one;
        `processing="batch"`: the provider's batch price where genai-prices knows it (a price
        variant), else the standard one."""
        gp = prices_source.gp_types()
        if self.info is not None:
            # OpenAI and Google name the tier `service_tier`; Anthropic's fast mode is `speed`
            context: dict[str, str] | None = (
                {"service_tier": service_tier, "speed": service_tier}
                if service_tier in _SERVICE_TIERS
                else None
            )
            if processing is not None:
                context = {**(context or {}), "processing": processing}
            prices = copy(self.info.get_prices(when or datetime.now(tz=UTC), context))
        else:
            prices = gp.ModelPrice()
        for key, value in self.overrides:
            setattr(prices, key, value)
        return prices

    def batch_priced(self, when: datetime | None = None) -> bool:
        """Whether genai-prices knows this model's batch price (a `processing: batch` variant in
        force): batches are then reserved and charged at it, else at the standard price."""
        if self.info is None:
            return False
        moment = when or datetime.now(tz=UTC)
        for variant in getattr(self.info, "price_variants", None) or ():
            if getattr(variant, "when", {}).get("processing") != "batch":
                continue
            constraint = getattr(variant, "constraint", None)
            if constraint is None or constraint.active(moment):
                return True
        return False

    def kinds(self, service_tier: str | None = None) -> list[tuple[str, Any, int]]:
        """(genai-prices usage key, price, per) for every unit this model is billed by."""
        prices = self.rates(service_tier)
        order = {key: i for i, key in enumerate(_registry().units)}
        units = sorted(_priced_units(prices), key=lambda up: order[up[0].usage_key])
        return [(unit.usage_key, price, unit.per) for unit, price in units]

    def compiled(
        self,
        service_tier: str | None = None,
        processing: str | None = None,
        cached_multiplier: float | None = None,
    ) -> _Compiled:
        """The prices in force now for this tier and processing, compiled (see `_Compiled`).

        Which library price is in force is asked of genai-prices on every call (its start-date
        and time-of-day constraints); the compilation is reused while that answer is the same
        object and the same variants are active; that answer is asked again after at most a
        second (a price that starts at midnight applies from one second past it at the latest)."""
        recent = self._recent.get((service_tier, processing, cached_multiplier))
        tick = time.monotonic()
        if recent is not None and tick < recent[0]:
            return recent[1]
        now = datetime.now(tz=UTC)
        selected: Any = None
        active: tuple[int, ...] = ()
        if self.info is not None:
            selected = self.info.get_prices(now)
            active = tuple(
                i
                for i, v in enumerate(getattr(self.info, "price_variants", None) or ())
                if v.constraint is None or v.constraint.active(now)
            )
        key = (service_tier, processing, cached_multiplier, id(selected), active)
        hit = self._compiled.get(key)
        if hit is not None and hit.selected is selected:
            self._recent[key[:3]] = (tick + _RECHECK_S, hit)
            return hit
        prices = self.rates(service_tier, when=now, processing=processing)
        if cached_multiplier is not None:
            prices.cache_read_mtok = Decimal(str(self.input)) * Decimal(str(cached_multiplier))
        compiled = _Compiled.of(prices, selected)
        if len(self._compiled) >= _MAX_COMPILED:
            self._compiled.clear()
        self._compiled[key] = compiled
        if len(self._recent) >= _MAX_COMPILED:
            self._recent.clear()
        self._recent[key[:3]] = (tick + _RECHECK_S, compiled)
        return compiled

    def cost(
        self, usage: Usage, cached_multiplier: float | None = None, processing: str | None = None
    ) -> float:
        """What the provider bills for a usage: every token kind at its rate, tiers and tools
        included (`processing="batch"`: at the batch price, where one is known)."""
        try:
            compiled = self.compiled(usage.service_tier, processing, cached_multiplier)
            return float(compiled.price(usage))
        except (ValueError, ArithmeticError) as e:
            # counts that contradict each other (a part above its total): price what is certain
            log.warning("pricing %s by input/output only: %s", self.model, e)
            cached = min(usage.cached_tokens, usage.input_tokens)
            cached_rate = (
                self.input * cached_multiplier
                if cached_multiplier is not None
                else (self.cached_input if self.cached_input is not None else self.input)
            )
            return (
                (usage.input_tokens - cached) * self.input
                + cached * cached_rate
                + usage.output_tokens * self.output
            ) / PER_TOKEN

    def max_cost(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        service_tier: str | None = None,
        web_searches: int = 0,
        cache_writes: bool = True,
        processing: str | None = None,
    ) -> float:
        """The most a request can cost: every input token at the dearest input rate (a cache
        write, audio) and every output token at the dearest output rate, at the tier that many
        input tokens reach, plus per-request and per-search fees. cache_writes=False: the request
        cannot write the cache (Anthropic writes only what a request marks)."""
        compiled = self.compiled(service_tier, processing)
        return compiled.max_cost(input_tokens, output_tokens, web_searches, cache_writes)


# How long a compilation is used before the library is asked again which price is in force
_RECHECK_S = 1.0
# Compilations kept per ModelPrice (tiers x processing x multipliers x price changes): a bound,
# not a working set; past it they are dropped and made again.
_MAX_COMPILED = 64


@dataclass(frozen=True)
class _Unit:
    """One priced unit: its genai-prices usage key, price (a Decimal or TieredPrices), `per`,
    dimensions, and its *leaf row*: the count it is billed on as a sum of coefficient x usage
    count (genai-prices bills a unit on its count minus its more specific parts' counts)."""

    usage_key: str
    price: Any
    per: int
    dimensions: Any
    row: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _Compiled:
    """A genai-prices ModelPrice made ready to price many usages.

    genai-prices' `calc_price` resolves the price's units, validates their coverage and
    decomposes the usage into leaf counts on every call: 40-60 µs a price, a tenth of the event
    loop's CPU per request at 16 connections. All but the last step depend on the price alone,
    and the decomposition is linear in the counts (a unit's leaf is its count minus its priced
    descendants' leaves). So a price is compiled once: its units resolved and validated by the
    library, and each unit's leaf as a row of coefficients, read from the library's own
    `compute_leaf_values` (`_leaf_rows`). Pricing a usage is then a few sums and the library's
    `calc_unit_price` per unit (tiers stay the library's rule). tests/core/providers/
    test_pricing.py compares it with `calc_price` on every model the library prices.
    """

    selected: Any  # the library's price object this was compiled for (identity, for the cache)
    units: tuple[_Unit, ...]
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
    def of(cls, prices: Any, selected: Any = None) -> _Compiled:
        registry = _registry()  # loads genai-prices' modules first
        from genai_prices.validation import validate_priced_units

        priced = _priced_units(prices)
        validate_priced_units(tuple(unit for unit, _ in priced), registry)
        rows = _leaf_rows({u.usage_key: u for u, _ in priced if u.usage_key != "requests"})
        gp = prices_source.gp_types()
        units = tuple(
            _Unit(
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


def _role(unit: _Unit) -> str | None:
    """What max_cost takes a unit for (see `_Compiled.roles`)."""
    dims = unit.dimensions
    if dims.get("family") == "tokens":
        if dims.get("token_type") == "cache_read":
            return None  # never dearer than the input it replaces
        direction = dims.get("direction")
        return direction if direction in ("input", "output") else None
    if unit.usage_key in ("requests", "web_searches"):
        return str(unit.usage_key)
    return None


def _is_cache_write(unit: _Unit) -> bool:
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
    for unit, _ in _priced_units(prices):
        if unit.usage_key not in values and unit.usage_key != "requests":
            values[unit.usage_key] = 0
    return prices_source.gp_types().Usage(**values)


def _priced_units(prices: Any) -> list[tuple[Any, Any]]:
    """(unit, price) of every registered unit a genai-prices ModelPrice sets.

    Read from the instance's fields: asking the ModelPrice for every registered unit goes
    through its __getattr__ and a registry lookup each, most of the cost of a price.
    """
    registry = _registry()
    out = []
    for key, value in vars(prices).items():
        if value is None or key.startswith("_"):
            continue
        try:
            out.append((registry.unit_for_price_key(key), value))
        except KeyError:
            continue  # a key this genai-prices does not price (it warns and skips it too)
    return out


# ---------------------------------------------------------------------------------------------
# What the library lacks: data/pricing.json


@cache
def shipped_limits() -> dict[str, int]:
    """Output token limits by model (genai-prices has context windows, not output limits)."""
    raw = json.loads(resources.files("candela_mitm").joinpath("data/pricing.json").read_text())
    limits = raw.get("max_output_tokens", {})
    return {canonical_model(k): int(v) for k, v in limits.items() if not k.startswith("_")}


def _references(model: str) -> list[str]:
    """The spellings of a model reference to try against the library, most specific first."""
    raw = unquote(model.strip()).lower()
    refs = [raw]
    for ref in (raw.rsplit("/", 1)[-1], canonical_model(raw), base_model(raw)):
        if ref and ref not in refs:
            refs.append(ref)
    return refs


@lru_cache(maxsize=4096)  # names come from clients: bounded
def maker_model_id(model: str) -> str | None:
    """The id genai-prices gives a model at its maker (OpenAI, Anthropic, Google), or None.

    Snapshots, aliases, Bedrock and Vertex ids and fine-tunes resolve to one id: what model
    policy matches a family on, and what output limits are keyed by.
    """
    for ref in _references(model):
        for provider_id in FIRST_PARTY:
            found = _find(provider_id, ref)
            if found is not None and not _resold(*found):
                return found[1]
    return None


@cache
def _providers() -> dict[str, Any]:
    return {p.id: p for p in prices_source.snapshot().providers}


def _find(provider_id: str, ref: str) -> tuple[str, str] | None:
    """(provider id, model id) of `ref` in a provider's list (or its fallbacks), else None.

    Provider.find_model directly, not DataSnapshot.find_provider_model: the snapshot memoises
    every reference it is asked about, without bound, and references come from clients.
    """
    found = _find_info(provider_id, ref)
    return (found[0].id, found[1].id) if found is not None else None


def _find_info(provider_id: str, ref: str) -> tuple[Any, Any] | None:
    provider = _providers().get(provider_id)
    if provider is None:
        return None
    info = provider.find_model(ref, all_providers=prices_source.snapshot().providers)
    return (provider, info) if info is not None else None


def _resold(provider_id: str, model_id: str) -> bool:
    """Google's price list also holds Claude (on Vertex): Anthropic is its maker."""
    return provider_id == "google" and model_id.startswith("claude")


def _config_price(name: str, p: Price) -> ModelPrice:
    return ModelPrice(
        model=name,
        input=p.input,
        output=p.output,
        cached_input=p.cached_input,
        max_output_tokens=p.max_output_tokens,
        provider=p.provider,
        cache_write=p.cache_write,
        cache_write_1h=p.cache_write_1h,
        source="config",
        overrides=_overrides(p),
    )


def _overrides(p: Price) -> tuple[tuple[str, Decimal], ...]:
    fields = p.model_dump(exclude_unset=True)
    return tuple(
        (key, Decimal(str(fields[name])))
        for name, key in CONFIG_KEYS.items()
        if fields.get(name) is not None
    )


class PricingTable:
    """Prices by (model, route): the library's, under the config's `pricing:` entries."""

    _CACHE_MAX = 4096

    def __init__(self, prices: dict[str, Price] | None = None, *, library: bool = True) -> None:
        self._config = {canonical_model(name): (name, p) for name, p in (prices or {}).items()}
        self._library = library
        self._limits = shipped_limits()
        self._cache: dict[tuple[str, str | None], ModelPrice | None] = {}

    @classmethod
    def from_config(cls, config: Config) -> PricingTable:
        table = cls(dict(config.pricing))
        table.validate()
        return table

    def validate(self) -> None:
        """Price every config entry once at start, so that a bad override fails there."""
        for name, _ in self._config.values():
            price = self.get(name)
            if price is None:  # cannot happen for a valid Price; a guard for the invariant
                raise ValueError(f"pricing.{name}: could not be priced")
            price.cost(Usage(1_000, 1_000, 0))

    # -- lookups --------------------------------------------------------------------------

    def get(self, model: str, route: str | None = None) -> ModelPrice | None:
        """The price of `model` as the client named it, on `route` when known (else its maker's)."""
        key = (model, route)
        if key in self._cache:
            return self._cache[key]
        price = self._lookup(model, route)
        if len(self._cache) >= self._CACHE_MAX:
            self._cache.clear()  # model names come from clients: keep the memo bounded
        self._cache[key] = price
        return price

    def _lookup(self, model: str, route: str | None) -> ModelPrice | None:
        found = self._library_lookup(model, route) if self._library else None
        entry = self._config.get(canonical_model(model)) or self._config.get(base_model(model))
        if entry is None:
            return found
        name, p = entry
        if found is None:
            return _config_price(name, p)
        fields = p.model_dump(exclude_unset=True)
        return ModelPrice(
            model=found.model,
            input=p.input,
            output=p.output,
            cached_input=fields.get("cached_input", found.cached_input),
            max_output_tokens=fields.get("max_output_tokens", found.max_output_tokens),
            provider=fields.get("provider", found.provider),
            cache_write=fields.get("cache_write", found.cache_write),
            cache_write_1h=fields.get("cache_write_1h", found.cache_write_1h),
            context_window=found.context_window,
            source=f"{found.source} + config",
            library_provider=found.library_provider,
            info=found.info,
            overrides=_overrides(p),
        )

    def _library_lookup(self, model: str, route: str | None) -> ModelPrice | None:
        if route is not None:
            provider_id = ROUTE_PROVIDERS.get(route)
            if provider_id is None:
                return None  # a local runtime or a route the library does not price
            candidates: Iterable[str] = (provider_id,)
        else:
            candidates = FIRST_PARTY
        refs = _references(model)
        if route == "bedrock-mantle":
            # Mantle names a model without Bedrock's version suffix (openai.gpt-oss-120b for
            # openai.gpt-oss-120b-1:0); the on-demand price is the model's on Bedrock
            refs += [f"{r}{v}" for r in refs[:1] for v in ("-1:0", "-v1:0")]
        for ref in refs:
            for provider_id in candidates:
                found = _find_info(provider_id, ref)
                if found is not None:
                    return self._from_library(found[0], found[1], model)
        return None

    def _from_library(self, provider: Any, info: Any, model: str) -> ModelPrice | None:
        prices = info.get_prices(datetime.now(tz=UTC))
        if prices.input_mtok is None and prices.output_mtok is None:
            return None  # listed without a price (open-weight models served elsewhere)
        return ModelPrice(
            model=info.id,
            input=_base(prices.input_mtok) or 0.0,
            output=_base(prices.output_mtok) or 0.0,
            cached_input=_base(prices.cache_read_mtok),
            max_output_tokens=self._limit(info.id, model),
            provider="anthropic" if _resold(provider.id, info.id) else CHAT_ROUTES.get(provider.id),
            cache_write=_base(prices.cache_write_mtok),
            cache_write_1h=_base(prices.cache_write_1h_mtok),
            context_window=info.context_window,
            source=prices_source.label(),
            library_provider=provider.id,
            info=info,
        )

    def _limit(self, model_id: str, model: str) -> int | None:
        names = [model_id, canonical_model(model), base_model(model)]
        maker = maker_model_id(model)  # a Bedrock or Vertex id: the limit of its maker's model
        if maker is not None:
            names.append(maker)
        for name in names:
            limit = self._limits.get(canonical_model(name))
            if limit is not None:
                return limit
        return None

    def models(self) -> list[ModelPrice]:
        """Every priced model /v1/chat/completions can route: the makers' lists and the config's."""
        out: dict[str, ModelPrice] = {}
        if self._library:
            for price in self._library_models():
                out.setdefault(price.model, price)
        for name, _ in self._config.values():
            configured = self.get(name)
            if configured is not None:
                out[configured.model] = configured
        return sorted(out.values(), key=lambda p: p.model)

    def _library_models(self) -> Iterator[ModelPrice]:
        snap = prices_source.snapshot()
        for provider in snap.providers:
            if provider.id not in FIRST_PARTY:
                continue
            for info in provider.models:
                if _resold(provider.id, info.id):
                    continue  # Claude on Vertex: listed once, under Anthropic
                price = self._from_library(provider, info, info.id)
                if price is not None:
                    yield price
