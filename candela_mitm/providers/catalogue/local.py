"""Local runtimes (ollama, lmstudio): inference and listing only; cost nothing, still governed."""

from __future__ import annotations

from .operation import Operation, free, metered

# Ollama's model management (/api/pull, /api/create, /api/delete, /api/copy, /api/push) is not
# forwarded: candela's local page pulls through its own /_local/api/pull.
OLLAMA: tuple[Operation, ...] = (
    metered("POST", "/api/chat", "chat", model="body", reader="ollama", stream="body_flag_default_on"),
    metered("POST", "/api/generate", "generate",
            model="body", reader="ollama", stream="body_flag_default_on"),
    metered("POST", "/api/embed", "embed", model="body", reader="ollama", estimate="prompt"),
    # the legacy embeddings answer has no counts
    metered("POST", "/api/embeddings", "embeddings", model="body", reader=None, estimate="prompt"),
    free("POST", "/api/show", "show", model="body"),
    free("GET", "/api/tags", "tags"),
    free("GET", "/api/ps", "ps"),
    free("GET", "/api/version", "version"),
    # the OpenAI-compatible surface
    metered("POST", "/v1/chat/completions", "chat.completions",
            model="body", reader="openai", stream="body_flag"),
    metered("POST", "/v1/completions", "completions", model="body", reader="openai", stream="body_flag"),
    metered("POST", "/v1/embeddings", "embeddings.openai", model="body", reader="openai", estimate="prompt"),
    free("GET", "/v1/models", "models.list"),
    free("GET", "/v1/models/{model}", "models.get", model="path"),
)

LMSTUDIO: tuple[Operation, ...] = (
    metered("POST", "/v1/chat/completions", "chat.completions",
            model="body", reader="openai", stream="body_flag"),
    metered("POST", "/v1/completions", "completions", model="body", reader="openai", stream="body_flag"),
    metered("POST", "/v1/responses", "responses", model="body", reader="openai", stream="body_flag"),
    metered("POST", "/v1/embeddings", "embeddings", model="body", reader="openai", estimate="prompt"),
    free("GET", "/v1/models", "models.list"),
    free("GET", "/v1/models/{model}", "models.get", model="path"),
    free("GET", "/api/v0/models", "models.list.native"),
    free("GET", "/api/v0/models/{model}", "models.get.native", model="path"),
)
