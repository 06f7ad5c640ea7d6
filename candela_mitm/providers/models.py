"""Model names: the canonical name that policy and prices match on."""

from __future__ import annotations

import re
from urllib.parse import unquote

# Bedrock: [region-prefix.]anthropic.claude-sonnet-4-20250514-v1:0
_BEDROCK = re.compile(
    r"^(?:(?:us|eu|apac|us-gov|global|jp|au|ca)\.)?(?:anthropic|meta|amazon|cohere|mistral|ai21)\."
    r"(?P<name>.+?)(?:-v\d+(?::\d+)?)?$"
)
# Bedrock ARNs: arn:aws:bedrock:<region>:<account>:(foundation-model|inference-profile|...)/<id>
_BEDROCK_ARN = re.compile(r"^arn:aws[a-z-]*:bedrock:[^:]*:[^:]*:[a-z-]+/(?P<id>.+)$")
# OpenAI fine-tunes: ft:<base>:<org>:<suffix>:<id>
_FINE_TUNE = re.compile(r"^ft:(?P<base>[^:]+)(?::.*)?$")
# Vertex: claude-sonnet-4@20250514
_VERTEX_AT = re.compile(r"^(?P<name>[^@]+)@(?P<version>[^@]+)$")


def canonical_model(name: str) -> str:
    """The name a policy or a price is looked up by: lower case, no provider decorations."""
    m = name.strip()
    m = unquote(m)
    low = m.lower()
    if low.startswith("models/"):
        low = low[len("models/") :]
    if low.startswith("publishers/"):
        # publishers/anthropic/models/claude-...
        low = low.rsplit("/", 1)[-1]
    arn = _BEDROCK_ARN.match(low)
    if arn:
        low = arn.group("id")
    b = _BEDROCK.match(low)
    if b:
        low = b.group("name")
    v = _VERTEX_AT.match(low)
    if v:
        low = f"{v.group('name')}-{v.group('version')}"
    return low


def base_model(name: str) -> str:
    """The model a fine-tune was trained from (`ft:gpt-4o-mini:org::id` -> gpt-4o-mini), else
    the canonical name."""
    low = canonical_model(name)
    ft = _FINE_TUNE.match(low)
    return ft.group("base") if ft else low

