"""Translation between OpenAI Chat Completions and Anthropic's Messages API, streams included."""

from __future__ import annotations

from candela_mitm.providers.translate.responses import (
    DEFAULT_MAX_TOKENS,
    AnthropicToOpenAIJson,
    AnthropicToOpenAIStream,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "AnthropicToOpenAIJson",
    "AnthropicToOpenAIStream",
    "anthropic_to_openai_response",
    "openai_to_anthropic_request",
]
