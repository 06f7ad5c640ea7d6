"""Operation: one row of a provider's catalogue, and the template matcher it is found by."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

# Where the model is read: the JSON body's "model" (required or optional), the path's {model}
# (percent-decoded), the query's ?model= (a WebSocket upgrade: OpenAI Realtime), the session's
# frames (a WebSocket whose setup or response.create frame names it: checked frame by frame by
# addons/websocket.py), every request of a batch body (`requests[].params.model`: Anthropic's
# Message Batches; each checked by the model policy), the uploaded input file a batch names
# (`input_file_id`: OpenAI's Batch API; the models Candela read at the upload), or nowhere.
ModelSource = Literal["body", "body_optional", "path", "query", "frame", "batch", "file", "none"]
# The pre-flight estimate reserved before forwarding: prompt (the body's text, images counted
# apart) plus the most output the request may produce; prompt only (embeddings: no output
# tokens); or none (nothing is reserved: a free read).
Estimate = Literal["prompt_and_output", "prompt", "none"]
# The usage reader of the ANSWER's wire format (not the route's), None when the answer carries
# no usage (audio speech: charged at its reservation).
Reader = Literal["openai", "anthropic", "gemini", "bedrock", "ollama"]
# Whether the answer streams: always (the operation is a stream), by the body's "stream": true,
# by the body's "stream" unless false (Ollama), or never.
Streams = Literal["always", "body_flag", "body_flag_default_on", "never"]
# metered: reserved, forwarded, settled on the usage read; free: forwarded, nothing reserved or
# charged (listing, token counting); async: a queued job, refused unless
# governance.async_jobs is reserve, then charged its reservation; local: answered by Candela
# itself, never forwarded; refused: named here so that a reader sees why it is not forwarded;
# allowed: an operator's `providers.<route>.allow` read, forwarded unmetered; session: a WebSocket
# upgrade, metered frame by frame (a reservation slice topped up per usage frame); job_result:
# the result of an async job created through Candela, forwarded only to its creator (or an
# admin), free, and its final usage trues up the job's charge (addons/jobs.py).
# batch_input: the upload of a batch's input file (OpenAI's `POST /v1/files`, purpose batch):
# forwarded free once every line's model passed the policy, its most cost recorded for the batch.
Billing = Literal[
    "metered", "free", "async", "local", "refused", "allowed", "session", "job_result",
    "batch_input",
]
# The kind of async job an operation creates (async rows) or reads (job_result rows): where its
# id is in the creation answer and where its final usage is in the result
# (providers/jobs.py: job_id_from, job_final_usage).
JobKind = Literal[
    "openai.response", "openai.run", "openai.batch", "gemini.batch", "anthropic.batch"
]
# The JSON events a WebSocket session speaks (providers/realtime.py reads each).
Protocol = Literal["openai-realtime", "openai-responses", "gemini-live"]


@dataclass(frozen=True)
class Operation:
    method: str
    template: str  # route-relative path; {name} is one path segment
    name: str
    model: ModelSource = "none"
    estimate: Estimate = "none"
    reader: Reader | None = None
    stream: Streams = "never"
    billing: Billing = "free"
    async_flag: str | None = None  # a body key that, when true, makes a metered call async
    translate: Literal["openai-anthropic"] | None = None
    why: str = ""  # for refused rows and anything a reader would ask about
    # a WebSocket operation: matched only by an upgrade request (and an upgrade matches nothing else)
    protocol: Protocol | None = None
    job: JobKind | None = None  # the async job it creates or whose result it reads
    # a job_result row's answer: one JSON document, a JSONL file of per-request results (its
    # {job_id} the job's), or a batch's output file (its {job_id} the file's: OpenAI's)
    results: Literal["json", "jsonl", "output_file"] = "json"

    @property
    def key(self) -> str:
        return f"{self.method} {self.template}"

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if method != self.method:
            return None
        m = _compiled(self.template).match(path)
        return m.groupdict() if m else None


def metered(
    method: str,
    template: str,
    name: str,
    *,
    model: ModelSource,
    reader: Reader | None,
    stream: Streams = "never",
    estimate: Estimate = "prompt_and_output",
    async_flag: str | None = None,
    translate: Literal["openai-anthropic"] | None = None,
    why: str = "",
    job: JobKind | None = None,
) -> Operation:
    return Operation(
        method,
        template,
        name,
        model=model,
        estimate=estimate,
        reader=reader,
        stream=stream,
        billing="metered",
        async_flag=async_flag,
        translate=translate,
        why=why,
        job=job,
    )


def session(
    template: str, name: str, *, model: Literal["query", "frame"], protocol: Protocol
) -> Operation:
    """A WebSocket session (GET with Upgrade: websocket), governed frame by frame."""
    return Operation(
        "GET", template, name, model=model, billing="session", protocol=protocol,
        why="a WebSocket session: model checked per frame, usage settled per usage frame",
    )


def free(
    method: str, template: str, name: str, *, model: ModelSource = "none", why: str = ""
) -> Operation:
    return Operation(method, template, name, model=model, billing="free", why=why)


def async_job(
    method: str,
    template: str,
    name: str,
    *,
    model: ModelSource,
    reader: Reader | None,
    why: str,
    job: JobKind | None = None,
) -> Operation:
    return Operation(
        method,
        template,
        name,
        model=model,
        estimate="prompt_and_output",
        reader=reader,
        billing="async",
        why=why,
        job=job,
    )


def job_result(
    template: str,
    name: str,
    *,
    job: JobKind,
    why: str,
    results: Literal["json", "jsonl", "output_file"] = "json",
) -> Operation:
    """GET of an async job's result: `{job_id}` names it; only its creator (or an admin) reads it."""
    return Operation(
        "GET", template, name, billing="job_result", why=why, job=job, results=results
    )


def batch_input(template: str, name: str, *, job: JobKind, why: str) -> Operation:
    """The multipart upload of a batch's input file: read (bounded, off the event loop) and
    checked line by line before it is forwarded (addons/jobs.py)."""
    return Operation("POST", template, name, billing="batch_input", why=why, job=job)


def local(method: str, template: str, name: str, *, why: str) -> Operation:
    return Operation(method, template, name, billing="local", why=why)


def refused(method: str, template: str, name: str, *, why: str) -> Operation:
    return Operation(method, template, name, billing="refused", why=why)


_PLACEHOLDER = re.compile(r"\{([a-z_]+)(\*?)\}")
ALLOWED_METHODS = ("GET", "HEAD")  # what an operator may allow: reads


@functools.lru_cache(maxsize=1024)
def _compiled(template: str) -> re.Pattern[str]:
    """`{name}` is one segment; before a ':' it stops at the colon (Gemini's `{model}:method`);
    `{name*}` is the rest of the path."""
    out = ["^"]
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        name, rest = m.group(1), m.group(2)
        follows = template[m.end() : m.end() + 1]
        if rest:
            out.append(f"(?P<{name}>.*)")
        elif follows == ":":
            out.append(f"(?P<{name}>[^/:]+)")
        else:
            out.append(f"(?P<{name}>[^/]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    out.append("/?$")
    return re.compile("".join(out))


def parse_allowed(entry: str) -> Operation:
    """An operator's `providers.<route>.allow` entry, "GET /v1/files/{id}": a model-less read."""
    method, sep, template = entry.strip().partition(" ")
    template = template.strip()
    method = method.upper()
    if not sep or method not in ALLOWED_METHODS:
        raise ValueError(
            f"{entry!r}: expected 'GET /path' or 'HEAD /path' (only reads are allowed)"
        )
    segments = template.split("/")
    if (
        not template.startswith("/")
        or any(c in template for c in "?#%\\ ")
        or "." in segments
        or ".." in segments
    ):
        raise ValueError(
            f"{entry!r}: the path must start with '/' and hold no query, fragment, escape, "
            f"space or dot segment"
        )
    try:
        _compiled(template)
    except re.error as e:  # a placeholder named twice
        raise ValueError(f"{entry!r}: {e}") from None
    return Operation(
        method,
        template,
        f"allowed:{method} {template}",
        billing="allowed",
        why="allowed by the operator (providers.<route>.allow)",
    )
