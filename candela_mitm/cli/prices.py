"""`candela prices [MODEL]`: what a model costs per token kind, and where the price came from."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from candela_mitm.config import PROVIDER_ROUTES, Config, load_config, parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.providers import prices_source
from candela_mitm.providers.pricing import ModelPrice, PricingTable

EXIT_OK, EXIT_UNKNOWN, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="candela prices",
        description="Model prices: genai-prices' data under the config's `pricing:` entries.",
    )
    p.add_argument("model", nargs="?", help="a model as a client names it (omit: list every model)")
    p.add_argument("--route", choices=sorted(PROVIDER_ROUTES), help="the provider route it goes by")
    p.add_argument("--config", metavar="PATH", help="YAML config whose `pricing:` applies")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _number(value: Any) -> float:
    return float(getattr(value, "base", value))


def _per(per: int) -> str:
    return {1_000_000: "per 1M", 1_000: "per 1K", 3_600: "per hour"}.get(per, f"per {per}")


def describe(price: ModelPrice) -> dict[str, Any]:
    """A model's price as plain data: each billed kind with its rate, tiers and tier variants."""
    kinds = []
    for usage_key, value, per in price.kinds():
        tiers = [
            {"above_input_tokens": t.start, "usd": float(t.price)}
            for t in getattr(value, "tiers", None) or ()
        ]
        kinds.append({"kind": usage_key, "usd": _number(value), "unit": _per(per), "tiers": tiers})
    service_tiers: dict[str, dict[str, float | None]] = {}
    for tier in ("priority", "flex"):
        variant = price.rates(tier)
        base = price.rates()
        if (variant.input_mtok, variant.output_mtok) != (base.input_mtok, base.output_mtok):
            service_tiers[tier] = {
                "input": _number(variant.input_mtok) if variant.input_mtok is not None else None,
                "output": _number(variant.output_mtok) if variant.output_mtok is not None else None,
            }
    return {
        "model": price.model,
        "source": price.source,
        "library_provider": price.library_provider,
        "route": price.provider,
        "context_window": price.context_window,
        "max_output_tokens": price.max_output_tokens,
        "kinds": kinds,
        "service_tiers": service_tiers,
    }


def _render(d: dict[str, Any], asked: str) -> str:
    lines = [
        f"{asked}" + (f" -> {d['model']}" if d["model"] != asked else ""),
        f"  source:            {d['source']}"
        + (f" ({d['library_provider']})" if d["library_provider"] else ""),
        f"  chat route:        {d['route'] or '-'}",
        f"  context window:    {d['context_window'] or '-'}",
        f"  max output tokens: {d['max_output_tokens'] or '- (budgets.default_max_output_tokens)'}",
        "  USD:",
    ]
    for k in d["kinds"]:
        tiers = "".join(
            f", {t['usd']:g} above {t['above_input_tokens']:,} input tokens" for t in k["tiers"]
        )
        lines.append(f"    {k['kind']:<26} {k['usd']:>10g} {k['unit']}{tiers}")
    for tier, rates in d["service_tiers"].items():
        lines.append(f"  service_tier {tier}: input {rates['input']:g}, output {rates['output']:g}")
    return "\n".join(lines)


def _config(path: str | None) -> Config:
    return load_config(path) if path else parse_config({})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv or ()))
    try:
        table = PricingTable.from_config(_config(args.config))
    except (ConfigError, OSError, ValueError) as e:
        print(f"candela prices: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.model is None:
        rows = [
            {"model": p.model, "route": p.provider, "input": p.input, "output": p.output,
             "cached_input": p.cached_input, "source": p.source}
            for p in table.models()
        ]
        if args.json:
            print(json.dumps({"genai_prices": prices_source.version(), "models": rows}, indent=2))
        else:
            print(f"{'model':<44} {'route':<17} {'input':>9} {'output':>9} {'cached':>9}  source")
            for r in rows:
                cached = "-" if r["cached_input"] is None else f"{r['cached_input']:g}"
                print(
                    f"{r['model']:<44} {r['route'] or '-':<17} {r['input']:>9g} "
                    f"{r['output']:>9g} {cached:>9}  {r['source']}"
                )
            print("USD per 1M tokens.")
        return EXIT_OK
    price = table.get(args.model, args.route)
    if price is None:
        where = f" on route {args.route}" if args.route else ""
        print(
            f"candela prices: no price for {args.model!r}{where} (genai-prices "
            f"{prices_source.version()} does not know it; add it under `pricing:` in the config)",
            file=sys.stderr,
        )
        return EXIT_UNKNOWN
    d = describe(price)
    print(json.dumps(d, indent=2) if args.json else _render(d, args.model))
    return EXIT_OK
