"""Cost estimates: the most a request can cost, reserved before it is forwarded."""

from __future__ import annotations

import json
import math
from typing import Any

from candela_mitm.providers.pricing import ModelPrice

CHARS_PER_TOKEN = 3  # conservative: real tokenisers average ~4 chars per token for English
IMAGE_TOKENS = 1600  # an image part, whatever its encoding (a generous upper bound per image)
_IMAGE_KEYS = ("image_url", "inline_data", "inlineData", "source")


def _walk(node: Any) -> tuple[int, int]:
    """(characters of text, images) in a JSON body; base64 payloads count as images, not text."""
    chars = images = 0
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, str):
            if n.startswith("data:") or len(n) > 20_000 and " " not in n[:2000]:
                images += 1
            else:
                chars += len(n)
        elif isinstance(n, dict):
            for k, v in n.items():
                if k in _IMAGE_KEYS and isinstance(v, dict | str):
                    images += 1
                    continue
                chars += len(k)
                stack.append(v)
        elif isinstance(n, list):
            stack.extend(n)
        elif n is not None:
            chars += len(json.dumps(n))
    return chars, images


def estimate_input_tokens(body: dict[str, Any] | None) -> int:
    if not body:
        return 0
    chars, images = _walk(body)
    return math.ceil(chars / CHARS_PER_TOKEN) + images * IMAGE_TOKENS


def output_tokens_limit(requested: int | None, default: int, price: ModelPrice) -> int:
    """max_tokens if the request names it, else the configured default; clamped to the model's limit."""
    n = requested if requested is not None else default
    if price.max_output_tokens is not None:
        n = min(n, price.max_output_tokens)
    return max(n, 0)


def estimate_cost(
    body: dict[str, Any] | None, requested_max: int | None, default_max: int, price: ModelPrice
) -> float:
    return price.max_cost(
        estimate_input_tokens(body), output_tokens_limit(requested_max, default_max, price)
    )
