"""Usage: tokens read from each provider's wire format, JSON and streams alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Usage:
    """Token counts of one request. input_tokens includes cached_tokens (cached is a subset)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
