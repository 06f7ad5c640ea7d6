from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from candela_mitm.providers.meters import meter_for
from candela_mitm.providers.usage import (
    Usage,
    usage_from,
    usage_from_anthropic,
    usage_from_bedrock,
    usage_from_bedrock_headers,
    usage_from_gemini,
    usage_from_ollama,
    usage_from_openai,
)
from tests.core.providers.wire_samples import (
    ANTHROPIC_BODY,
    BEDROCK_STOP,
    CONVERSE_BODY,
    EMBEDDINGS,
    GEMINI_BODY,
    OLLAMA_DONE,
    OPENAI_CHAT,
    RESPONSES_BODY,
)

PURE = [
    ("openai chat", usage_from_openai, OPENAI_CHAT, Usage(2006, 300, 1920)),
    ("openai responses", usage_from_openai, RESPONSES_BODY, Usage(37, 11, 32)),
    (
        "openai response.completed event",
        usage_from_openai,
        {"type": "response.completed", "sequence_number": 9, "response": RESPONSES_BODY},
        Usage(37, 11, 32),
    ),
    (
        "openai response.created event (usage null)",
        usage_from_openai,
        {"type": "response.created", "response": {**RESPONSES_BODY, "usage": None}},
        None,
    ),
    ("openai embeddings", usage_from_openai, EMBEDDINGS, Usage(8, 0, 0)),
    (
        "openai chunk without usage",
        usage_from_openai,
        {
            "object": "chat.completion.chunk",
            "choices": [{"delta": {"content": "x"}}],
            "usage": None,
        },
        None,
    ),
    (
        "openai final chunk",
        usage_from_openai,
        {
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
        },
        Usage(12, 5, 0),
    ),
    (
        "openai-compatible Gemini leaving reasoning out of completion_tokens",
        usage_from_openai,
        {
            "usage": {
                "prompt_tokens": 21,
                "completion_tokens": 0,
                "total_tokens": 81,
                "completion_tokens_details": {"reasoning_tokens": 60},
            }
        },
        Usage(21, 60, 0),
    ),
    (
        "ollama /v1 (openai shape)",
        usage_from_openai,
        {"object": "chat.completion", "usage": {"prompt_tokens": 26, "completion_tokens": 9}},
        Usage(26, 9, 0),
    ),
    ("openai usage not an object", usage_from_openai, {"usage": "lots"}, None),
    ("openai empty usage", usage_from_openai, {"usage": {}}, None),
    ("openai not a dict", usage_from_openai, [OPENAI_CHAT], None),
    ("anthropic body with cache", usage_from_anthropic, ANTHROPIC_BODY, Usage(2010, 503, 1800)),
    (
        "anthropic message_start",
        usage_from_anthropic,
        {
            "type": "message_start",
            "message": {
                **ANTHROPIC_BODY,
                "content": [],
                "usage": {"input_tokens": 25, "output_tokens": 1},
            },
        },
        Usage(25, 1, 0),
    ),
    (
        "anthropic message_delta",
        usage_from_anthropic,
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 15},
        },
        Usage(0, 15, 0),
    ),
    (
        "anthropic null counts are absent counts",
        usage_from_anthropic,
        {"type": "message_delta", "usage": {"input_tokens": None, "output_tokens": 15}},
        Usage(0, 15, 0),
    ),
    ("anthropic ping", usage_from_anthropic, {"type": "ping"}, None),
    ("gemini with thoughts and cache", usage_from_gemini, GEMINI_BODY, Usage(2100, 98, 2048)),
    (
        "gemini snake_case",
        usage_from_gemini,
        {
            "usage_metadata": {
                "prompt_token_count": 40,
                "candidates_token_count": 7,
                "thoughts_token_count": 3,
                "cached_content_token_count": 32,
                "total_token_count": 50,
            }
        },
        Usage(40, 10, 32),
    ),
    (
        "gemini tool-use prompt is input",
        usage_from_gemini,
        {
            "usageMetadata": {
                "promptTokenCount": 100,
                "toolUsePromptTokenCount": 50,
                "candidatesTokenCount": 20,
                "totalTokenCount": 170,
            }
        },
        Usage(150, 20, 0),
    ),
    (
        "gemini first stream chunk",
        usage_from_gemini,
        {"usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}},
        Usage(8, 0, 0),
    ),
    ("gemini chunk without usage", usage_from_gemini, {"candidates": []}, None),
    ("ollama done", usage_from_ollama, OLLAMA_DONE, Usage(26, 282, 0)),
    (
        "ollama chunk",
        usage_from_ollama,
        {"model": "llama3.2", "message": {"role": "assistant", "content": "The"}, "done": False},
        None,
    ),
    (
        "ollama /api/embed",
        usage_from_ollama,
        {"model": "all-minilm", "embeddings": [[0.01, -0.002]], "prompt_eval_count": 8},
        Usage(8, 0, 0),
    ),
    ("bedrock converse", usage_from_bedrock, CONVERSE_BODY, Usage(135, 628, 100)),
    ("bedrock invocation metrics", usage_from_bedrock, BEDROCK_STOP, Usage(12, 45, 0)),
    ("bedrock anthropic body", usage_from_bedrock, ANTHROPIC_BODY, Usage(2010, 503, 1800)),
    (
        "bedrock metrics win over the model's counts, cache kept",
        usage_from_bedrock,
        {
            **ANTHROPIC_BODY,
            "amazon-bedrock-invocationMetrics": {"inputTokenCount": 11, "outputTokenCount": 600},
        },
        Usage(2011, 600, 1800),
    ),
    ("bedrock nothing", usage_from_bedrock, {"type": "content_block_stop", "index": 0}, None),
]


@pytest.mark.parametrize(("name", "fn", "obj", "expected"), PURE, ids=[p[0] for p in PURE])
def test_usage_from_one_object(
    name: str, fn: Callable[[object], Usage | None], obj: object, expected: Usage | None
) -> None:
    assert fn(obj) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {"X-Amzn-Bedrock-Input-Token-Count": "12", "x-amzn-bedrock-output-token-count": "45"},
            Usage(12, 45, 0),
        ),
        (
            {
                "x-amzn-bedrock-input-token-count": "3",
                "x-amzn-bedrock-output-token-count": "45",
                "x-amzn-bedrock-cache-read-input-token-count": "1000",
                "x-amzn-bedrock-cache-write-input-token-count": "20",
            },
            Usage(1023, 45, 1000),
        ),
        ({"x-amzn-bedrock-input-token-count": "twelve"}, None),
        ({"content-type": "application/json"}, None),
    ],
)
def test_usage_from_bedrock_headers(headers: dict[str, str], expected: Usage | None) -> None:
    assert usage_from_bedrock_headers(headers) == expected


@pytest.mark.parametrize(
    ("wire", "obj", "expected"),
    [
        ("openai", OPENAI_CHAT, Usage(2006, 300, 1920)),
        ("anthropic", ANTHROPIC_BODY, Usage(2010, 503, 1800)),
        ("gemini", GEMINI_BODY, Usage(2100, 98, 2048)),
        ("bedrock", CONVERSE_BODY, Usage(135, 628, 100)),
        ("ollama", OLLAMA_DONE, Usage(26, 282, 0)),
        ("ollama", {"usage": {"prompt_tokens": 5, "completion_tokens": 2}}, Usage(5, 2, 0)),
    ],
)
def test_usage_from_dispatches_by_wire(wire: str, obj: object, expected: Usage) -> None:
    assert usage_from(wire, obj) == expected


def test_unknown_wire_is_refused() -> None:
    with pytest.raises(ValueError):
        usage_from("cohere", {})
    with pytest.raises(ValueError):
        meter_for("cohere", True)


def test_usage_dataclass_is_unchanged() -> None:
    u = Usage(input_tokens=100, output_tokens=20, cached_tokens=30)
    assert (u.input_tokens, u.output_tokens, u.cached_tokens, u.total_tokens) == (100, 20, 30, 120)
    assert Usage() == Usage(0, 0, 0)




def test_usage_copy_is_replace_field_by_field() -> None:
    # Usage.copy stands for dataclasses.replace (a meter's read hands out a copy): every field,
    # the ones left out of == too, and a new object that the caller may change
    values: dict[str, object] = {f.name: i + 1 for i, f in enumerate(dataclasses.fields(Usage))}
    values["service_tier"] = "priority"
    u = Usage(**values)  # type: ignore[arg-type]
    c = u.copy()
    r = dataclasses.replace(u)
    assert c is not u and type(c) is Usage
    for f in dataclasses.fields(Usage):
        assert getattr(c, f.name) == getattr(r, f.name) == values[f.name], f.name
    assert vars(c) == vars(r)
    c.output_tokens = 999
    assert u.output_tokens == values["output_tokens"]
    assert Usage().copy() == Usage() and vars(Usage().copy()) == vars(Usage())
