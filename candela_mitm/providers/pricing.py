"""Pricing: what a model costs per token kind on a route, from genai-prices and the config.

The default price of every model comes from genai-prices (prices_source.py), matched by the
route's provider and the model reference as the client sent it (snapshots, aliases, Bedrock and
Vertex ids resolve there). `pricing.<model>` in the config overrides the fields it names, or adds
a model the library does not know. data/pricing.json keeps only what the library lacks (each
model's output limit, for the reservation). What a price in force charges for a usage is
worked out by its compiled form (compiled_price.py).
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
from candela_mitm.providers.compiled_price import (
    PER_TOKEN,
    CompiledPrice,
    priced_units,
    unit_registry,
)
from candela_mitm.providers.models import base_model, canonical_model
from candela_mitm.providers.usage import Usage

log = logging.getLogger("candela.pricing")


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

_SERVICE_TIERS = frozenset({"priority", "flex", "fast", "ultrafast"})


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
    _compiled: dict[tuple[Any, ...], CompiledPrice] = field(
        default_factory=dict, init=False, compare=False, repr=False, hash=False
    )
    _recent: dict[tuple[Any, ...], tuple[float, CompiledPrice]] = field(
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
        order = {key: i for i, key in enumerate(unit_registry().units)}
        units = sorted(priced_units(prices), key=lambda up: order[up[0].usage_key])
        return [(unit.usage_key, price, unit.per) for unit, price in units]

    def compiled(
        self,
        service_tier: str | None = None,
        processing: str | None = None,
        cached_multiplier: float | None = None,
    ) -> CompiledPrice:
        """The prices in force now for this tier and processing, compiled (see `CompiledPrice`).

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
        compiled = CompiledPrice.of(prices, selected)
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
