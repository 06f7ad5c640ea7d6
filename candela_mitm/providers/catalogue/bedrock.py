"""Amazon Bedrock runtime (anthropic-bedrock): InvokeModel, Converse and their streams."""

from __future__ import annotations

from .operation import Operation, free, metered

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
