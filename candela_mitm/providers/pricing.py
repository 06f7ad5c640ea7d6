"""Pricing: USD per million tokens for each model, the shipped table merged with the config's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from candela_mitm.config import Config, Price
from candela_mitm.providers.models import canonical_model
from candela_mitm.providers.usage import Usage

PER_TOKEN = 1_000_000


@dataclass(frozen=True)
class ModelPrice:
    model: str
    input: float
    output: float
    cached_input: float | None = None
    max_output_tokens: int | None = None
    provider: str | None = None

    def cost(self, usage: Usage, cached_multiplier: float | None = None) -> float:
        """Cost of a usage: cached input at the cached price, the rest of the input at full price."""
        cached = min(usage.cached_tokens, usage.input_tokens)
        if cached_multiplier is not None:
            cached_price = self.input * cached_multiplier
        else:
            cached_price = self.cached_input if self.cached_input is not None else self.input
        return (
            (usage.input_tokens - cached) * self.input
            + cached * cached_price
            + usage.output_tokens * self.output
        ) / PER_TOKEN

    def max_cost(self, input_tokens: int, output_tokens: int) -> float:
        """The most a request can cost: no cache discount, every output token it may produce."""
        return (input_tokens * self.input + output_tokens * self.output) / PER_TOKEN


def shipped_prices() -> dict[str, Price]:
    raw = json.loads(resources.files("candela_mitm").joinpath("data/pricing.json").read_text())
    return {k: Price(**v) for k, v in raw.items() if not k.startswith("_")}


class PricingTable:
    def __init__(self, prices: dict[str, Price]):
        self._prices: dict[str, ModelPrice] = {
            canonical_model(name): ModelPrice(
                model=name,
                input=p.input,
                output=p.output,
                cached_input=p.cached_input,
                max_output_tokens=p.max_output_tokens,
                provider=p.provider,
            )
            for name, p in prices.items()
        }

    @classmethod
    def from_config(cls, config: Config) -> PricingTable:
        merged = shipped_prices()
        for name, price in config.pricing.items():
            base = merged.get(name)
            if base is not None:
                # a partial override keeps the shipped routing and limits it does not name
                fields = base.model_dump()
                fields.update(price.model_dump(exclude_unset=True))
                merged[name] = Price(**fields)
            else:
                merged[name] = price
        return cls(merged)

    def get(self, model: str) -> ModelPrice | None:
        return self._prices.get(canonical_model(model))

    def models(self) -> list[ModelPrice]:
        return sorted(self._prices.values(), key=lambda p: p.model)
