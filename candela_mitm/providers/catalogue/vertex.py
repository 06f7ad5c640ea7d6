"""Vertex AI (anthropic-vertex): Claude and Gemini by publisher, each read by its own wire format."""

from __future__ import annotations

from .operation import Operation, async_job, free, metered, session


def _vertex(v: str) -> tuple[Operation, ...]:
    p = f"/{v}/projects/{{project}}/locations/{{location}}/publishers"
    return (
        # Claude (publisher anthropic): the Messages API's body, the model in the path
        free("POST", f"{p}/anthropic/models/count-tokens:rawPredict", "claude.countTokens",
             model="body"),
        metered("POST", f"{p}/anthropic/models/{{model}}:rawPredict", "claude.rawPredict",
                model="path", reader="anthropic", stream="body_flag"),
        metered("POST", f"{p}/anthropic/models/{{model}}:streamRawPredict", "claude.streamRawPredict",
                model="path", reader="anthropic", stream="always"),
        # Gemini (publisher google): Gemini's own format and reader, priced like the Gemini API
        metered("POST", f"{p}/google/models/{{model}}:generateContent", "gemini.generateContent",
                model="path", reader="gemini"),
        metered("POST", f"{p}/google/models/{{model}}:streamGenerateContent",
                "gemini.streamGenerateContent", model="path", reader="gemini", stream="always"),
        free("POST", f"{p}/google/models/{{model}}:countTokens", "gemini.countTokens", model="path"),
        async_job("POST", f"{p}/google/models/{{model}}:batchGenerateContent",
                  "gemini.batchGenerateContent", model="path", reader="gemini",
                  why="a batch is queued and read later"),
    )

# Every Vertex GET (models, endpoints, batch jobs, datasets) reads what the service account can
# read in the project: none is forwarded unless an operator allows it. {project} and {location}
# must be the route's configured ones.
# Vertex Live: Gemini Live's protocol; the setup frame names the model by its full resource name
_LIVE = "/ws/google.cloud.aiplatform.{v}.LlmBidiService/BidiGenerateContent"
LIVE: tuple[Operation, ...] = tuple(
    session(_LIVE.format(v=v), "gemini.live.bidiGenerateContent", model="frame",
            protocol="gemini-live")
    for v in ("v1", "v1beta1")
)

VERTEX: tuple[Operation, ...] = _vertex("v1") + _vertex("v1beta1") + LIVE
