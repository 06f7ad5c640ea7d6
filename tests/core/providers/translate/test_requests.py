"""Tests for candela_mitm.providers.translate.requests: an OpenAI Chat Completions request as
Anthropic Messages."""

from __future__ import annotations

from typing import Any

import pytest

from candela_mitm.providers.translate import (
    DEFAULT_MAX_TOKENS,
    openai_to_anthropic_request,
)

MODEL = "claude-sonnet-4-20250514"
USER = {"role": "user", "content": "hi"}
PNG_B64 = "iVBORw0KGgo="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def req(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [USER], **extra}


# --- requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, {"max_tokens": DEFAULT_MAX_TOKENS}),
        ({"max_tokens": 100}, {"max_tokens": 100}),
        ({"max_completion_tokens": 200}, {"max_tokens": 200}),
        ({"max_completion_tokens": 200, "max_tokens": 100}, {"max_tokens": 200}),
        ({"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.9}),
        ({"stop": "END"}, {"stop_sequences": ["END"]}),
        ({"stop": ["a", "b"]}, {"stop_sequences": ["a", "b"]}),
        ({"stop": None}, {}),
        ({"stream": True}, {"stream": True}),
        ({"stream": False}, {}),
        ({"stream": True, "stream_options": {"include_usage": True}}, {"stream": True}),
        ({"user": "alice@example.com"}, {"metadata": {"user_id": "alice@example.com"}}),
        ({"n": 1, "seed": 7, "frequency_penalty": 0.5, "logit_bias": {"1": 2}}, {}),
    ],
)
def test_request_parameters(extra: dict[str, Any], expected: dict[str, Any]) -> None:
    out = openai_to_anthropic_request(req(**extra))
    want = {
        "model": MODEL,
        "max_tokens": DEFAULT_MAX_TOKENS,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    want.update(expected)
    assert out == want


@pytest.mark.parametrize(
    "messages, system, turns",
    [
        # system and developer messages, wherever they appear, go to the top-level system
        (
            [{"role": "system", "content": "Be brief."}, USER],
            "Be brief.",
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        ),
        (
            [
                {"role": "developer", "content": [{"type": "text", "text": "A"}]},
                {"role": "system", "content": "B"},
                USER,
            ],
            "A\n\nB",
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        ),
        # cache_control survives, which needs the block form of system
        (
            [
                {
                    "role": "system",
                    "content": [
                        {"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}
                    ],
                },
                USER,
            ],
            [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        ),
        # consecutive user turns merge (Anthropic requires alternation)
        (
            [USER, {"role": "user", "content": [{"type": "text", "text": "again"}]}],
            None,
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}],
                }
            ],
        ),
        # empty text is dropped (Anthropic rejects empty text blocks)
        (
            [USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}],
            None,
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "x"}],
                }
            ],
        ),
        # assistant text and refusal parts
        (
            [
                USER,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "refusal", "refusal": "no"},
                    ],
                },
            ],
            None,
            [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "no"}],
                },
            ],
        ),
    ],
)
def test_request_messages(messages: list[Any], system: Any, turns: list[Any]) -> None:
    out = openai_to_anthropic_request({"model": MODEL, "messages": messages})
    assert out.get("system") == system
    assert out["messages"] == turns


@pytest.mark.parametrize(
    "part, block",
    [
        (
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
            },
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/gif,GIF%38"}},
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/gif", "data": "R0lGOA=="},
            },
        ),
        (
            {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg", "detail": "low"}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
        ),
        (
            {"type": "image_url", "image_url": "http://x.test/b.png"},
            {"type": "image", "source": {"type": "url", "url": "http://x.test/b.png"}},
        ),
        (
            {
                "type": "file",
                "file": {"file_data": "data:application/pdf;base64,JVBERg==", "filename": "a.pdf"},
            },
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERg=="},
            },
        ),
        (
            {"type": "text", "text": "t", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "t", "cache_control": {"type": "ephemeral"}},
        ),
    ],
)
def test_request_content_parts(part: dict[str, Any], block: dict[str, Any]) -> None:
    out = openai_to_anthropic_request(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]}
    )
    assert "model" not in out
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "see"}, block]}
    ]


@pytest.mark.parametrize(
    "extra, tools, tool_choice",
    [
        (
            {"tools": [WEATHER_TOOL]},
            [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ],
            None,
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "now"}}]},
            [{"name": "now", "input_schema": {"type": "object", "properties": {}}}],
            None,
        ),
        ({"tools": [WEATHER_TOOL], "tool_choice": "auto"}, 1, {"type": "auto"}),
        ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, 1, {"type": "none"}),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, 1, {"type": "any"}),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
            1,
            {"type": "tool", "name": "get_weather"},
        ),
        (
            {"tools": [WEATHER_TOOL], "parallel_tool_calls": False},
            1,
            {"type": "auto", "disable_parallel_tool_use": True},
        ),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False},
            1,
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        ({"tools": [WEATHER_TOOL], "parallel_tool_calls": True}, 1, None),
        # without tools Anthropic rejects tool_choice; OpenAI ignores it
        ({"tool_choice": "none"}, None, None),
        ({"tools": [], "tool_choice": "auto"}, None, None),
    ],
)
def test_request_tools(extra: dict[str, Any], tools: Any, tool_choice: Any) -> None:
    out = openai_to_anthropic_request(req(**extra))
    if isinstance(tools, int):
        assert len(out["tools"]) == tools
    else:
        assert out.get("tools") == tools
    assert out.get("tool_choice") == tool_choice


def test_request_tool_calls_and_results() -> None:
    out = openai_to_anthropic_request(
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": "Looking.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "now", "arguments": ""},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": [{"type": "text", "text": "noon"}],
                },
                {"role": "user", "content": "thanks"},
            ]
        }
    )
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looking."},
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
            ],
        },
        # tool results and the following user text share one user turn, results first
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "noon"}],
                },
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"model": MODEL}, "'messages' is required"),
        ({"messages": "hi"}, "must be a list"),
        ({"messages": []}, "must not be empty"),
        ([USER], "JSON object"),
        (req(n=2), "'n'"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "legacy"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "no user or assistant"),
        ({"messages": [{"role": "user"}]}, "needs 'content'"),
        ({"messages": [{"role": "user", "content": 5}]}, "string or a list"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input_audio"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}],
                    }
                ]
            },
            "data:, http",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64"}}
                        ],
                    }
                ]
            },
            "malformed data",
        ),
        (
            {
                "messages": [
                    {
                        "role": "system",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x.test/a"}}
                        ],
                    },
                    USER,
                ]
            },
            "only text",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    },
                ]
            },
            "not valid JSON",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    },
                ]
            },
            "JSON object",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [{"type": "function", "function": {"name": "f"}}],
                    },
                ]
            },
            "needs an 'id'",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        (req(max_tokens=0), "'max_tokens' must be a positive integer"),
        (req(max_completion_tokens="9"), "'max_completion_tokens'"),
        (req(stop=5), "'stop'"),
        (req(stop=["a", 1]), "'stop'"),
        (req(tools={"a": 1}), "'tools' must be a list"),
        (req(tools=[{"type": "web_search"}]), "only function tools"),
        (req(tools=[{"type": "function", "function": {}}]), "needs a 'name'"),
        (req(tools=[WEATHER_TOOL], tool_choice="sometimes"), "'tool_choice'"),
        (req(tools=[WEATHER_TOOL], tool_choice={"type": "function"}), "must name a function"),
    ],
)
def test_request_rejects(body: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        openai_to_anthropic_request(body)
    assert fragment in str(e.value)


