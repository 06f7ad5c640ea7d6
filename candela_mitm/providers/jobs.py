"""Asynchronous jobs (providers/catalogue: the `job` of an async or job_result row): the id a
creation answer names, and the usage of a result once the job is over."""

from __future__ import annotations

from candela_mitm.providers.usage import (
    Usage,
    load_json,
    usage_from_anthropic,
    usage_from_gemini,
    usage_from_openai,
)

# the statuses after which a job's usage no longer changes, by kind
_JOB_FINAL = {
    # a Response: https://platform.openai.com/docs/api-reference/responses/object (status)
    "openai.response": frozenset({"completed", "incomplete", "failed", "cancelled"}),
    # an Assistants run: https://platform.openai.com/docs/api-reference/runs/object (status)
    "openai.run": frozenset({"completed", "incomplete", "failed", "cancelled", "expired"}),
    # an OpenAI batch: https://platform.openai.com/docs/api-reference/batch/object (status)
    "openai.batch": frozenset({"completed", "failed", "expired", "cancelled"}),
    # a Gemini batch: the long-running operation's metadata.state (GenerateContentBatch)
    "gemini.batch": frozenset(
        {"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED",
         "BATCH_STATE_EXPIRED"}
    ),
}
# batches are billed at the provider's batch price (where genai-prices knows one)
BATCH_JOBS = frozenset({"openai.batch", "gemini.batch", "anthropic.batch"})
MAX_JOB_ID = 256


def job_id_from(kind: str, obj: object) -> str | None:
    """The job's id in its creation answer (a Response's, a run's or a Message Batch's `id`;
    the `batches/<id>` name of a Gemini batch operation, as its GET names it: after `batches/`)."""
    if (kind not in _JOB_FINAL and kind != "anthropic.batch") or not isinstance(obj, dict):
        return None
    if kind == "gemini.batch":
        name = obj.get("name")
        if not isinstance(name, str) or not name.startswith("batches/"):
            return None
        job_id: object = name[len("batches/") :]
    else:
        job_id = obj.get("id")
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID or "/" in job_id:
        return None
    return job_id


def job_final_usage(kind: str, obj: object) -> Usage | None:
    """The usage of a job's result once the job is over (a final status, its usage reported);
    None while it is queued or running, or when it ended without a usage."""
    final = _JOB_FINAL.get(kind)
    if final is None or not isinstance(obj, dict):
        return None
    if kind == "gemini.batch":
        return _gemini_batch_usage(obj, final)
    if obj.get("status") not in final:
        return None
    return usage_from_openai(obj)


def _gemini_batch_usage(op: dict[str, object], final: frozenset[str]) -> Usage | None:
    """A Gemini batch operation: the sum of its inlined responses' usageMetadata once its state
    is final. A batch whose results went to a file carries none here: None."""
    meta = op.get("metadata")
    if not isinstance(meta, dict) or meta.get("state") not in final:
        return None
    output = meta.get("output")
    if not isinstance(output, dict):
        response = op.get("response")
        output = response if isinstance(response, dict) else {}
    inlined = output.get("inlinedResponses")
    items = inlined.get("inlinedResponses") if isinstance(inlined, dict) else None
    if not isinstance(items, list):
        return None
    total = Usage()
    seen = False
    for item in items:
        resp = item.get("response") if isinstance(item, dict) else None
        u = usage_from_gemini(resp) if resp is not None else None
        if u is not None:
            seen = True
            total = Usage(
                total.input_tokens + u.input_tokens,
                total.output_tokens + u.output_tokens,
                total.cached_tokens + u.cached_tokens,
            )
    return total if seen else None


MAX_BATCH_RESULT_LINES = 200_000  # twice Anthropic's most requests per batch


def batch_results_usage(raw: bytes) -> list[tuple[str | None, Usage]] | None:
    """An Anthropic Message Batch's results (`.jsonl`, one line per request): the model and
    usage of every `succeeded` result (errored, canceled and expired requests are not billed).
    None when the body is not such a file (no line parses as a result)."""
    out: list[tuple[str | None, Usage]] = []
    results = 0
    for n, line in enumerate(raw.splitlines()):
        if n >= MAX_BATCH_RESULT_LINES:
            return None  # more lines than any batch holds: not read, the job stays as charged
        if not line.strip():
            continue
        obj = load_json(line)
        result = obj.get("result") if isinstance(obj, dict) else None
        if not isinstance(result, dict):
            continue
        results += 1
        message = result.get("message")
        if result.get("type") != "succeeded" or not isinstance(message, dict):
            continue
        u = usage_from_anthropic(message)
        if u is not None:
            model = message.get("model")
            out.append((model if isinstance(model, str) and model else None, u))
    return out if results else None


def batch_output_usage(raw: bytes) -> list[tuple[str | None, Usage]] | None:
    """An OpenAI batch's output file (`.jsonl`, one line per request that ran): the model and
    usage of every answer with status 200 (failed requests are in the error file, unbilled).
    None when the body is not such a file."""
    out: list[tuple[str | None, Usage]] = []
    lines = 0
    for n, line in enumerate(raw.splitlines()):
        if n >= MAX_BATCH_RESULT_LINES:
            return None
        if not line.strip():
            continue
        obj = load_json(line)
        response = obj.get("response") if isinstance(obj, dict) else None
        if not isinstance(response, dict):
            continue
        lines += 1
        body = response.get("body")
        if response.get("status_code") != 200 or not isinstance(body, dict):
            continue
        u = usage_from_openai(body)
        if u is not None:
            model = body.get("model")
            out.append((model if isinstance(model, str) and model else None, u))
    return out if lines else None
