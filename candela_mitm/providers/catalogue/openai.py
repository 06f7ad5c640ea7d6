"""OpenAI's API (api.openai.com): the operations Candela forwards, and what it refuses by name."""

from __future__ import annotations

from .operation import (
    Operation,
    async_job,
    batch_input,
    free,
    job_result,
    metered,
    refused,
    session,
)

_OTHERS = "reads objects other users created with the organisation's key"
_JOB = "only the user who created the job through Candela (or an admin) reads it"

OPENAI: tuple[Operation, ...] = (
    # method and path                         operation              model / reader / streams
    metered("POST", "/v1/chat/completions", "chat.completions",
            model="body", reader="openai", stream="body_flag"),
    metered("POST", "/v1/completions", "completions",
            model="body", reader="openai", stream="body_flag"),
    metered("POST", "/v1/responses", "responses",
            model="body", reader="openai", stream="body_flag", async_flag="background",
            why="background: true queues the response: an async job", job="openai.response"),
    metered("POST", "/v1/embeddings", "embeddings",
            model="body", reader="openai", estimate="prompt"),
    metered("POST", "/v1/images/generations", "images.generations",
            model="body", reader="openai",
            why="JSON bodies only; gpt-image-* report usage, DALL-E answers are charged their reservation"),
    metered("POST", "/v1/audio/speech", "audio.speech",
            model="body", reader=None,
            why="the answer is audio with no usage: charged its reservation"),
    free("POST", "/v1/moderations", "moderations", model="body_optional",
         why="OpenAI does not charge for moderations"),
    free("GET", "/v1/models", "models.list"),
    free("GET", "/v1/models/{model}", "models.get", model="path"),
    # a batch: its input file uploaded through Candela (every line's model checked, the most
    # its requests can cost recorded), then the batch naming it reserves that, its result trues up
    batch_input("/v1/files", "files.create", job="openai.batch",
                why="only a batch's input file (purpose batch), each line's model checked"),
    async_job("POST", "/v1/batches", "batches.create", model="file", reader="openai",
              why="a batch runs later from a file uploaded through Candela by the same user",
              job="openai.batch"),
    job_result("/v1/batches/{job_id}", "batches.retrieve", job="openai.batch", why=_JOB),
    job_result("/v1/files/{job_id}/content", "files.content", job="openai.batch", why=_JOB,
               results="output_file"),
    async_job("POST", "/v1/threads/runs", "assistants.runs.create_thread_and_run",
              model="body_optional", reader="openai", why="an Assistants run is queued",
              job="openai.run"),
    async_job("POST", "/v1/threads/{thread_id}/runs", "assistants.runs.create",
              model="body_optional", reader="openai", why="an Assistants run is queued",
              job="openai.run"),
    # an async job's result, read by its creator: its final usage trues up its charge
    job_result("/v1/responses/{job_id}", "responses.retrieve", job="openai.response",
               why=_JOB),
    job_result("/v1/threads/{thread_id}/runs/{job_id}", "assistants.runs.retrieve",
               job="openai.run", why=_JOB),
    # WebSocket sessions: Realtime names its model in the URL (and may switch it by
    # session.update); the Responses API's WebSocket mode names it in each response.create
    session("/v1/realtime", "realtime", model="query", protocol="openai-realtime"),
    session("/v1/responses", "responses.websocket", model="frame", protocol="openai-responses"),
    refused("GET", "/v1/files{rest*}", "files", why=_OTHERS),
    refused("GET", "/v1/batches{rest*}", "batches.read", why=_OTHERS),
    refused("GET", "/v1/responses/{rest*}", "responses.read", why=_OTHERS),
    refused("GET", "/v1/chat/completions{rest*}", "chat.completions.stored", why=_OTHERS),
)
