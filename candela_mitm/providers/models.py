"""Model names: where each wire format puts the model, and the canonical name policy matches on."""

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
# Bedrock: /model/{modelId}/invoke, invoke-with-response-stream, converse, converse-stream
_PATH_BEDROCK = re.compile(
    r"^/model/(?P<model>[^/]+)/(?P<method>invoke|invoke-with-response-stream|converse|converse-stream)$"
)


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


def model_from_path(path: str) -> tuple[str, str] | None:
    """(model, method) named by a URL path, for the formats that put the model there."""
    path = path.split("?", 1)[0]
    b = _PATH_BEDROCK.search(path)
    if b:
        return unquote(b.group("model")), b.group("method")
    # the model id may be percent-encoded (Bedrock) or carry its method after a colon (Gemini)
    decoded = unquote(path)
    g = re.search(r"/models/(?P<model>[^/]+?)(?::(?P<method>[A-Za-z]+))?$", decoded)
    if g:
        return g.group("model"), g.group("method") or ""
    b = _PATH_BEDROCK.search(decoded)
    if b:
        return b.group("model"), b.group("method")
    return None


def is_streaming_method(method: str) -> bool:
    return method in (
        "streamGenerateContent",
        "streamRawPredict",
        "invoke-with-response-stream",
        "converse-stream",
    )
