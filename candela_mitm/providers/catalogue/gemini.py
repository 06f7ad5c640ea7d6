"""Gemini's API (generativelanguage.googleapis.com): native (google) and OpenAI-compatible (gemini-oai)."""

from __future__ import annotations

from .operation import Operation, async_job, free, job_result, metered, refused, session

_OTHERS = "reads objects other users created with the organisation's credential"


def _native(v: str) -> tuple[Operation, ...]:
    # the google-genai SDK calls /v1 with a custom base URL, /v1beta by default
    return (
        metered("POST", f"/{v}/models/{{model}}:generateContent", "generateContent",
                model="path", reader="gemini"),
        # SSE with ?alt=sse, else one JSON array whose elements each may carry usageMetadata
        metered("POST", f"/{v}/models/{{model}}:streamGenerateContent", "streamGenerateContent",
                model="path", reader="gemini", stream="always"),
        free("POST", f"/{v}/models/{{model}}:countTokens", "countTokens", model="path"),
        # the embedding answers carry no token counts: charged their (prompt-only) reservation
        metered("POST", f"/{v}/models/{{model}}:embedContent", "embedContent",
                model="path", reader=None, estimate="prompt"),
        metered("POST", f"/{v}/models/{{model}}:batchEmbedContents", "batchEmbedContents",
                model="path", reader=None, estimate="prompt"),
        async_job("POST", f"/{v}/models/{{model}}:batchGenerateContent", "batchGenerateContent",
                  model="path", reader="gemini", why="a batch is queued and read later",
                  job="gemini.batch"),
        free("GET", f"/{v}/models", "models.list"),
        free("GET", f"/{v}/models/{{model}}", "models.get", model="path"),
        # the batch's operation, read by its creator: its inlined responses' usage trues it up
        job_result(f"/{v}/batches/{{job_id}}", "batches.get", job="gemini.batch",
                   why="only the user who created the batch through Candela (or an admin) "
                       "reads it"),
        refused("GET", f"/{v}/batches{{rest*}}", "batches.read", why=_OTHERS),
        refused("GET", f"/{v}/files{{rest*}}", "files", why=_OTHERS),
        refused("GET", f"/{v}/cachedContents{{rest*}}", "cachedContents", why=_OTHERS),
    )


# Gemini Live: a WebSocket whose first frame, `setup`, names the model
_LIVE = "/ws/google.ai.generativelanguage.{v}.GenerativeService.BidiGenerateContent"
LIVE: tuple[Operation, ...] = tuple(
    session(_LIVE.format(v=v), "live.bidiGenerateContent", model="frame", protocol="gemini-live")
    for v in ("v1beta", "v1alpha")
)

GEMINI: tuple[Operation, ...] = _native("v1beta") + _native("v1") + LIVE

# base path /v1beta/openai: the rest starts after it
GEMINI_OPENAI: tuple[Operation, ...] = (
    metered("POST", "/chat/completions", "chat.completions",
            model="body", reader="openai", stream="body_flag"),
    metered("POST", "/embeddings", "embeddings", model="body", reader="openai", estimate="prompt"),
    free("GET", "/models", "models.list"),
    free("GET", "/models/{model}", "models.get", model="path"),
)
