"""providers/readers.py: how one wire's decoded documents add up to one usage, whether they
carried output, and the error they reported."""

from __future__ import annotations

import json

import pytest

from candela_mitm.providers.readers import _truthy_except, reader_for
from candela_mitm.providers.usage import Usage, _count


def take_all(wire: str, docs: list[tuple[str, object]]):
    r = reader_for(wire)
    for event, doc in docs:
        r.take(json.dumps(doc), event)
    return r


def test_openai_the_last_usage_wins_and_is_the_whole_usage() -> None:
    r = reader_for("openai")
    assert r.usage() is None and not r.reported and not r.saw_output
    r.take('{"choices":[{"delta":{"role":"assistant"}}]}')
    assert not r.saw_output  # a role alone is no output
    r.take('{"choices":[{"delta":{"content":"Hi"}}]}')
    assert r.saw_output
    r.take('{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}')
    r.take('{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}')
    assert r.usage() == Usage(5, 2, 0) and r.reported
    assert r.observed.tokens == 1  # "Hi": the text that passed, counted


def test_anthropic_counts_keep_their_latest_value_and_report_at_message_delta() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}
    r = take_all("anthropic", [("message_start", start)])
    assert r.usage() == Usage(10, 1, 0) and not r.reported  # a first count, not the whole usage
    r.take(json.dumps({"type": "content_block_delta", "delta": {"text": "Hello"}}), "content_block_delta")
    assert r.saw_output
    r.take(json.dumps({"type": "message_delta", "usage": {"output_tokens": 7}}), "message_delta")
    assert r.usage() == Usage(10, 7, 0) and r.reported  # never a sum: 7, not 8


def test_bedrock_invocation_metrics_override_the_counts() -> None:
    r = take_all(
        "bedrock",
        [
            ("", {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}),
            ("", {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 12, "outputTokenCount": 45}}),
        ],
    )
    assert r.usage() == Usage(12, 45, 0) and r.reported


@pytest.mark.parametrize(
    ("wire", "doc", "error"),
    [
        ("openai", {"error": {"type": "server_error", "message": "overloaded"}}, "server_error: overloaded"),
        ("openai", {"type": "response.failed", "response": {"error": {"code": "rate_limited", "message": "slow"}}}, "rate_limited: slow"),
        ("anthropic", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, "overloaded_error: busy"),
        ("gemini", {"error": {"status": "UNAVAILABLE"}}, "UNAVAILABLE"),
        ("ollama", {"error": "model not found"}, "model not found"),
    ],
)
def test_the_first_error_reported_is_kept(wire: str, doc: object, error: str) -> None:
    r = take_all(wire, [("", doc), ("", {"error": "a later one"})])
    assert r.error == error
    assert r.usage() is None and not r.reported


def test_gemini_and_ollama_readers() -> None:
    g = take_all("gemini", [("", {"candidates": [{"content": {"parts": [{"text": "x"}]}}], "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6}})])
    assert g.saw_output and g.usage() == Usage(4, 2, 0)
    o = take_all("ollama", [("", {"response": "hi", "done": False}), ("", {"done": True, "prompt_eval_count": 3, "eval_count": 9})])
    assert o.saw_output and o.usage() == Usage(3, 9, 0)
    # Ollama's /v1 serves the OpenAI shape
    v1 = take_all("ollama", [("", {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})])
    assert v1.usage() == Usage(2, 1, 0)


def test_after_the_first_output_only_documents_that_may_carry_usage_are_parsed(monkeypatch) -> None:
    from candela_mitm.providers import readers

    parsed: list[str | bytes] = []
    real = readers.load_json
    monkeypatch.setattr(readers, "load_json", lambda t: parsed.append(t) or real(t))
    r = reader_for("openai")
    r.take('{"choices":[{"delta":{"content":"a"}}]}')
    for _ in range(50):
        r.take('{"choices":[{"delta":{"content":"b"}}],"usage":null}')
    assert len(parsed) == 1
    r.take('{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":51}}')
    assert r.usage() == Usage(1, 51, 0) and len(parsed) == 2


def test_an_unknown_wire_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown wire format"):
        reader_for("smtp")


class _Int(int):
    pass


@pytest.mark.parametrize(
    "value",
    [0, 1, 42, -3, 10**20, True, False, None, 1.9, -0.5, 3.0, "7", [1], {}, _Int(5), _Int(-5)],
)
def test_count_is_its_general_form(value: object) -> None:
    # _count's fast path for a plain int gives what its general form gives
    general = (
        None
        if isinstance(value, bool) or not isinstance(value, (int, float))
        else max(0, int(value))
    )
    got = _count(value)
    assert got == general and type(got) is type(general)


@pytest.mark.parametrize(
    "d",
    [
        None,
        [],
        "text",
        {},
        {"role": "assistant"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "hi"},
        {"role": "", "refusal": "no", "annotations": [1]},
        {"content": None, "tool_calls": [{"id": "x"}]},
        {"content": 0, "x": False, "role": "user"},
    ],
)
def test_truthy_except_is_any_of_the_other_values(d: object) -> None:
    ignore = ("role", "refusal", "annotations")
    expected = isinstance(d, dict) and any(v for k, v in d.items() if k not in ignore)
    assert _truthy_except(d, ignore) is expected
