from __future__ import annotations

import json

import pytest

from candela_mitm.providers.jobs import (
    batch_output_usage,
    batch_results_usage,
    job_final_usage,
    job_id_from,
)
from candela_mitm.providers.usage import Usage

# -- asynchronous jobs: the id in a creation answer, the usage of a finished result ------------

_RESPONSE_USAGE = {
    "input_tokens": 120, "input_tokens_details": {"cached_tokens": 20},
    "output_tokens": 900, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 1020,
}
_RUN_USAGE = {"prompt_tokens": 50, "completion_tokens": 8, "total_tokens": 58}


def _gemini_batch(state: str, usages: list[tuple[int, int]] | None = None, where: str = "metadata") -> dict:
    """A google.longrunning.Operation over a GenerateContentBatch (the google-genai SDK reads
    metadata.state and metadata.output.inlinedResponses.inlinedResponses)."""
    meta: dict = {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "model": "models/gemini-2.5-flash", "name": "batches/b1", "state": state,
    }
    op: dict = {"name": "batches/b1", "metadata": meta}
    if usages is not None:
        output = {"inlinedResponses": {"inlinedResponses": [
            {"response": {"candidates": [], "usageMetadata": {
                "promptTokenCount": i, "candidatesTokenCount": o, "totalTokenCount": i + o}}}
            for i, o in usages
        ]}}
        if where == "metadata":
            meta["output"] = output
        else:
            op["done"] = True
            op["response"] = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput", **output}
    return op


@pytest.mark.parametrize(
    "kind, obj, expected",
    [
        # a background Response as queued, in progress, then over (completed, incomplete, failed)
        ("openai.response", {"id": "resp_1", "object": "response", "status": "queued", "usage": None}, None),
        ("openai.response", {"id": "resp_1", "status": "in_progress", "usage": None}, None),
        ("openai.response", {"id": "resp_1", "status": "completed", "usage": _RESPONSE_USAGE}, Usage(120, 900, 20)),
        ("openai.response", {"id": "resp_1", "status": "incomplete", "usage": _RESPONSE_USAGE}, Usage(120, 900, 20)),
        ("openai.response", {"id": "resp_1", "status": "failed", "usage": None}, None),
        ("openai.response", {"id": "resp_1", "status": "cancelled", "usage": _RESPONSE_USAGE}, Usage(120, 900, 20)),
        # an Assistants run: usage is null until the run is over
        ("openai.run", {"id": "run_1", "object": "thread.run", "status": "queued", "usage": None}, None),
        ("openai.run", {"id": "run_1", "status": "requires_action", "usage": _RUN_USAGE}, None),
        ("openai.run", {"id": "run_1", "status": "completed", "usage": _RUN_USAGE}, Usage(50, 8, 0)),
        ("openai.run", {"id": "run_1", "status": "expired", "usage": _RUN_USAGE}, Usage(50, 8, 0)),
        ("openai.run", ["not", "an", "object"], None),
        # a Gemini batch operation: pending, then succeeded with its inlined responses' usage
        ("gemini.batch", _gemini_batch("BATCH_STATE_PENDING"), None),
        ("gemini.batch", _gemini_batch("BATCH_STATE_RUNNING", [(10, 2)]), None),
        ("gemini.batch", _gemini_batch("BATCH_STATE_SUCCEEDED", [(10, 2), (30, 5)]), Usage(40, 7, 0)),
        ("gemini.batch", _gemini_batch("BATCH_STATE_SUCCEEDED", [(10, 2)], where="response"), Usage(10, 2, 0)),
        ("gemini.batch", _gemini_batch("BATCH_STATE_SUCCEEDED", []), None),  # results in a file
        ("unknown.kind", {"status": "completed", "usage": _RUN_USAGE}, None),
    ],
)
def test_job_final_usage(kind, obj, expected):
    assert job_final_usage(kind, obj) == expected


@pytest.mark.parametrize(
    "kind, obj, expected",
    [
        ("openai.response", {"id": "resp_68", "status": "queued"}, "resp_68"),
        ("openai.run", {"id": "run_abc", "object": "thread.run"}, "run_abc"),
        ("openai.response", {"id": ""}, None),
        ("openai.response", {"id": 5}, None),
        ("openai.response", {"id": "x" * 300}, None),
        ("openai.response", None, None),
        ("gemini.batch", {"name": "batches/abc123", "metadata": {}}, "abc123"),
        ("gemini.batch", {"name": "operations/abc123"}, None),
        ("gemini.batch", {"name": "batches/a/b"}, None),
        ("other", {"id": "x"}, None),
    ],
)
def test_job_id_from(kind, obj, expected):
    assert job_id_from(kind, obj) == expected


def _result_line(kind: str, model: str = "claude-sonnet-4-5", inp: int = 10, out: int = 3) -> bytes:
    """One line of a Message Batch's results (.jsonl), as the anthropic SDK's
    MessageBatchIndividualResponse reads it."""
    result: dict = {"type": kind}
    if kind == "succeeded":
        result["message"] = {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": inp, "output_tokens": out,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }
    elif kind == "errored":
        result["error"] = {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}}
    return json.dumps({"custom_id": "r", "result": result}).encode()


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"\n".join([_result_line("succeeded", inp=10, out=3),
                     _result_line("succeeded", "claude-haiku-4-5", 20, 5)]),
         [("claude-sonnet-4-5", Usage(10, 3, 0)), ("claude-haiku-4-5", Usage(20, 5, 0))]),
        # errored, canceled and expired requests are not billed
        (b"\n".join([_result_line("errored"), _result_line("canceled"), _result_line("expired"),
                     _result_line("succeeded", inp=7, out=1), b""]),
         [("claude-sonnet-4-5", Usage(7, 1, 0))]),
        (b"\n".join([_result_line("errored")]), []),  # a batch of failures costs nothing
        (b'{"type": "message_batch", "id": "msgbatch_1"}', None),  # not a results file
        (b"not json at all", None),
        (b"", None),
    ],
)
def test_batch_results_usage(raw, expected):
    assert batch_results_usage(raw) == expected


def _output_line(status: int, model: str = "gpt-4o-mini", inp: int = 10, out: int = 2) -> bytes:
    """One line of an OpenAI batch's output file (https://platform.openai.com/docs/guides/batch)."""
    body: dict = ({"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                   "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}}
                  if status == 200 else {"error": {"message": "bad", "type": "invalid_request_error"}})
    return json.dumps({"id": "batch_req_1", "custom_id": "a",
                       "response": {"status_code": status, "request_id": "req_1", "body": body},
                       "error": None}).encode()


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"\n".join([_output_line(200), _output_line(200, "gpt-4o", 5, 1), b""]),
         [("gpt-4o-mini", Usage(10, 2, 0)), ("gpt-4o", Usage(5, 1, 0))]),
        (b"\n".join([_output_line(400), _output_line(200, inp=3, out=3)]), [("gpt-4o-mini", Usage(3, 3, 0))]),
        (_output_line(500), []),
        (b'{"object": "batch"}', None),
        (b"", None),
    ],
)
def test_batch_output_usage(raw, expected):
    assert batch_output_usage(raw) == expected
