"""Anthropic: its own API (anthropic-direct) and the OpenAI-shaped route answered by Claude (anthropic)."""

from __future__ import annotations

from .operation import Operation, async_job, free, job_result, local, metered, refused

_JOB = "only the user who created the batch through Candela (or an admin) reads it"

ANTHROPIC_DIRECT: tuple[Operation, ...] = (
    # method and path                         operation              model / reader / streams
    metered("POST", "/v1/messages", "messages",
            model="body", reader="anthropic", stream="body_flag"),
    free("POST", "/v1/messages/count_tokens", "messages.count_tokens", model="body"),
    # Anthropic's OpenAI SDK compatibility: the answer is OpenAI's shape, read by OpenAI's reader
    metered("POST", "/v1/chat/completions", "openai_compat.chat.completions",
            model="body", reader="openai", stream="body_flag"),
    free("GET", "/v1/models", "models.list"),
    free("GET", "/v1/models/{model}", "models.get", model="path"),
    # every request's model is checked; the sum of their most (at the batch price) is reserved
    async_job("POST", "/v1/messages/batches", "messages.batches.create", model="batch",
              reader="anthropic", why="a batch of Messages requests, run later",
              job="anthropic.batch"),
    job_result("/v1/messages/batches/{job_id}", "messages.batches.retrieve", job="anthropic.batch",
               why=_JOB),
    # the JSONL of results, each with its usage: trues the batch's charge up
    job_result("/v1/messages/batches/{job_id}/results", "messages.batches.results",
               job="anthropic.batch", why=_JOB, results="jsonl"),
    # Claude Code's auxiliary calls to api.anthropic.com: never with the organisation's key
    local("HEAD", "/", "reachability",
          why="Claude Code's connectivity probe: Candela answers 200 itself"),
    refused("GET", "/api/claude_code/{rest*}", "claude_code.settings",
            why="Claude Code's organisation settings and metrics switches: the organisation's key "
                "would read the organisation's account"),
    refused("GET", "/v1/messages/batches{rest*}", "messages.batches.read",
            why="reads batches other users created with the organisation's key"),
    refused("GET", "/v1/files{rest*}", "files",
            why="reads files other users uploaded with the organisation's key"),
)

# Clients speak OpenAI's chat API; Candela translates to the Messages API (Vertex or direct) and
# reads the Anthropic answer before translating it back.
ANTHROPIC_OPENAI: tuple[Operation, ...] = (
    metered("POST", "/v1/chat/completions", "chat.completions",
            model="body", reader="anthropic", stream="body_flag", translate="openai-anthropic"),
    metered("POST", "/chat/completions", "chat.completions",
            model="body", reader="anthropic", stream="body_flag", translate="openai-anthropic"),
)
