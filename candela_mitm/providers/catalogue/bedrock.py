"""Amazon Bedrock: the runtime (anthropic-bedrock: InvokeModel, Converse and their streams) and Mantle, its OpenAI-compatible endpoint (bedrock-mantle)."""

from __future__ import annotations

from .operation import Operation, free, metered, refused

# {model} is a model id or inference profile, percent-encoded by the SDKs (`...-v1%3A0`)
BEDROCK: tuple[Operation, ...] = (
    metered("POST", "/model/{model}/invoke", "InvokeModel", model="path", reader="bedrock"),
    metered("POST", "/model/{model}/invoke-with-response-stream", "InvokeModelWithResponseStream",
            model="path", reader="bedrock", stream="always"),
    metered("POST", "/model/{model}/converse", "Converse", model="path", reader="bedrock"),
    metered("POST", "/model/{model}/converse-stream", "ConverseStream",
            model="path", reader="bedrock", stream="always"),
    free("POST", "/model/{model}/count-tokens", "CountTokens", model="path"),
)

_MANTLE_OTHERS = "reads responses other users created with the organisation's credential"

# Bedrock's OpenAI-compatible endpoint (bedrock-mantle): the OpenAI wire format, model ids as
# Bedrock names them without a version suffix (openai.gpt-oss-120b). Most models are served
# under /v1, some under /openai/v1 (AWS's model table says which): both are governed alike.
BEDROCK_MANTLE: tuple[Operation, ...] = tuple(
    op
    for prefix in ("/v1", "/openai/v1")
    for op in (
        metered("POST", f"{prefix}/chat/completions", "chat.completions",
                model="body", reader="openai", stream="body_flag"),
        metered("POST", f"{prefix}/responses", "responses",
                model="body", reader="openai", stream="body_flag", async_flag="background",
                why="background: true queues the response: an async job"),
        free("GET", f"{prefix}/models", "models.list"),
        free("GET", f"{prefix}/models/{{model}}", "models.get", model="path"),
        refused("GET", f"{prefix}/responses/{{rest*}}", "responses.read", why=_MANTLE_OTHERS),
    )
)
