"""Translation between OpenAI Chat Completions and Anthropic's Messages API, streams included:
requests.py one way, responses.py (JSON and SSE) the other."""

from __future__ import annotations

from candela_mitm.providers.translate.requests import (
    DEFAULT_MAX_TOKENS,
    openai_to_anthropic_request,
)
from candela_mitm.providers.translate.responses import (
    AnthropicToOpenAIJson,
    AnthropicToOpenAIStream,
    anthropic_to_openai_response,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "AnthropicToOpenAIJson",
    "AnthropicToOpenAIStream",
    "anthropic_to_openai_response",
    "openai_to_anthropic_request",
]
