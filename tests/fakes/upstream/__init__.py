"""The fake providers' upstream: `FakeUpstream` and what tests use of it, one module per wire format."""

from __future__ import annotations

# importing each wire format registers its routes, in this order (the first match wins)
# isort: off
from . import openai  # noqa: F401
from . import anthropic  # noqa: F401
from . import bedrock  # noqa: F401
from . import gemini  # noqa: F401
from . import ollama  # noqa: F401

# isort: on
from .server import (
    ANTHROPIC_BEDROCK_VERSION,
    ANTHROPIC_KEY,
    ANTHROPIC_VERTEX_VERSION,
    AWS_ACCESS_KEY_ID,
    AWS_REGION,
    AWS_SECRET_ACCESS_KEY,
    DEFAULT_MODELS,
    DEFAULT_REPLY,
    GEMINI_KEY,
    OPENAI_KEY,
    FakeUpstream,
    Recorded,
    _Ctx,
    _match,
    provider_error,
    verify_sigv4,
)

__all__ = [
    "ANTHROPIC_BEDROCK_VERSION",
    "ANTHROPIC_KEY",
    "ANTHROPIC_VERTEX_VERSION",
    "AWS_ACCESS_KEY_ID",
    "AWS_REGION",
    "AWS_SECRET_ACCESS_KEY",
    "DEFAULT_MODELS",
    "DEFAULT_REPLY",
    "FakeUpstream",
    "GEMINI_KEY",
    "OPENAI_KEY",
    "Recorded",
    "provider_error",
    "verify_sigv4",
    "_Ctx",
    "_match",
]
