"""Tests for candela_mitm.providers.translate.responses: Anthropic answers (JSON and SSE) as
OpenAI Chat Completions."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from candela_mitm.providers.sse import encode
from candela_mitm.providers.translate import (
    AnthropicToOpenAIJson,
    AnthropicToOpenAIStream,
    anthropic_to_openai_response,
)
from candela_mitm.providers.usage import Usage

MODEL = "claude-sonnet-4-20250514"
# --- responses -----------------------------------------------------------------------------


def anthropic_message(**extra: Any) -> dict[str, Any]:
    msg = {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    msg.update(extra)
    return msg


@pytest.mark.parametrize(
    "stop_reason, finish_reason",
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        (None, "stop"),
    ],
)
def test_response_finish_reason(stop_reason: str | None, finish_reason: str) -> None:
    out = anthropic_to_openai_response(anthropic_message(stop_reason=stop_reason), "m")
    assert out["choices"][0]["finish_reason"] == finish_reason


@pytest.mark.parametrize(
    "usage, expected",
    [
        (
            {"input_tokens": 10, "output_tokens": 5},
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        ),
        (
            {
                "input_tokens": 3,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 20,
                "output_tokens": 7,
            },
            {
                "prompt_tokens": 123,
                "completion_tokens": 7,
                "total_tokens": 130,
                "prompt_tokens_details": {"cached_tokens": 100},
            },
        ),
        (
            {"input_tokens": 4, "cache_read_input_tokens": None, "output_tokens": 1},
            {
                "prompt_tokens": 4,
                "completion_tokens": 1,
                "total_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        ),
        (
            None,
            {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        ),
    ],
)
def test_response_usage(usage: Any, expected: dict[str, Any]) -> None:
    assert anthropic_to_openai_response(anthropic_message(usage=usage), "m")["usage"] == expected


def test_response_text() -> None:
    msg = anthropic_message(
        content=[
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Hel"},
            {"type": "text", "text": "lo"},
        ]
    )
    assert anthropic_to_openai_response(msg, "my-claude", created=1700000000) == {
        "id": "chatcmpl-msg_01ABC",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "my-claude",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


@pytest.mark.parametrize(
    "content, text, calls",
    [
        ([], "", None),
        (
            [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
            None,
            [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        ),
        (
            [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "a", "input": {}},
                {"type": "tool_use", "id": "toolu_2", "name": "b", "input": {"x": [1, 2]}},
            ],
            "Checking.",
            [
                {"id": "toolu_1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "b", "arguments": '{"x": [1, 2]}'},
                },
            ],
        ),
    ],
)
def test_response_tool_calls(content: list[Any], text: str | None, calls: Any) -> None:
    message = anthropic_to_openai_response(
        anthropic_message(content=content, stop_reason="tool_use"), "m"
    )["choices"][0]["message"]
    assert message["content"] == text
    assert message.get("tool_calls") == calls


@pytest.mark.parametrize(
    "body, error",
    [
        (
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            {
                "message": "Overloaded",
                "type": "overloaded_error",
                "param": None,
                "code": "overloaded_error",
            },
        ),
        (
            {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "max_tokens: too large"},
            },
            {
                "message": "max_tokens: too large",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_request_error",
            },
        ),
        # Vertex answers some failures in Google's format, sometimes inside a list
        (
            {"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}},
            {
                "message": "Quota exceeded",
                "type": "resource_exhausted",
                "param": None,
                "code": "RESOURCE_EXHAUSTED",
            },
        ),
        (
            [{"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}}],
            {"message": "Not found", "type": "not_found", "param": None, "code": "NOT_FOUND"},
        ),
    ],
)
def test_response_errors(body: Any, error: dict[str, Any]) -> None:
    assert anthropic_to_openai_response(body, "m") == {"error": error}
    j = AnthropicToOpenAIJson("m", False)
    assert j.feed(json.dumps(body).encode()) == b""
    assert json.loads(j.finish()) == {"error": error}
    assert j.usage == Usage()



@pytest.mark.parametrize(
    "body",
    [b"not json at all", b"", b"<html>502</html>", b'"a json string"', b"[1, 2]"],
)
def test_json_passes_through_what_it_cannot_read(body: bytes) -> None:
    j = AnthropicToOpenAIJson("m", True)
    j.feed(body)
    assert j.finish() == body


def test_json_translates_in_pieces() -> None:
    msg = anthropic_message(
        usage={"input_tokens": 8, "cache_read_input_tokens": 2, "output_tokens": 3}
    )
    raw = json.dumps(msg).encode()
    j = AnthropicToOpenAIJson("alias", True, created=5)
    assert b"".join(j.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)) == b""
    assert j.usage == Usage()
    out = json.loads(j.finish())
    assert out == anthropic_to_openai_response(msg, "alias", created=5)
    assert j.usage == Usage(input_tokens=10, output_tokens=3, cached_tokens=2)
    assert j.finish() == b""


# --- streams -------------------------------------------------------------------------------


def anthropic_sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(encode(json.dumps(e, ensure_ascii=False), e["type"]) for e in events)


TEXT = "Hello, wörld! 你好 🌍"
STREAM_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_S1",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    },
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hello, wö"},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "rld! 你好 🌍"},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": ""},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": 'ris"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_B", "name": "now", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": "{}"},
    },
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 42},
    },
    {"type": "message_stop"},
]
STREAM = anthropic_sse(STREAM_EVENTS)


def run(pieces: list[bytes], include_usage: bool = True) -> bytes:
    s = AnthropicToOpenAIStream(MODEL, include_usage, created=1700000000)
    return b"".join(s.feed(p) for p in pieces) + s.finish()


def chunks_of(out: bytes) -> list[Any]:
    assert out.endswith(b"data: [DONE]\n\n")
    events = out.split(b"\n\n")
    assert events[-1] == b""
    payloads = [e.removeprefix(b"data: ") for e in events[:-1]]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert payloads[-1] == b"[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def random_splits(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, 40)
        pieces.append(data[i : i + n])
        i += n
    return pieces


@pytest.mark.parametrize(
    "pieces",
    [
        [STREAM[i : i + 1] for i in range(len(STREAM))],
        [STREAM[:7], b"", STREAM[7:]],
        *[random_splits(STREAM, seed) for seed in range(5)],
        # the same stream with \r\n line ends
        [STREAM.replace(b"\n", b"\r\n")],
    ],
)
def test_stream_output_does_not_depend_on_splits(pieces: list[bytes]) -> None:
    assert run(pieces) == run([STREAM])


def test_stream_chunks() -> None:
    chunks = chunks_of(run([STREAM]))
    for c in chunks:
        assert c["id"] == "chatcmpl-msg_S1"
        assert c["object"] == "chat.completion.chunk"
        assert c["created"] == 1700000000
        assert c["model"] == MODEL
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == TEXT
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"arguments": ""})
            if "id" in tc:
                assert tc["type"] == "function"
                slot["id"], slot["name"] = tc["id"], tc["function"]["name"]
            slot["arguments"] += tc["function"]["arguments"]
    assert calls == {
        0: {"id": "toolu_A", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "toolu_B", "name": "now", "arguments": "{}"},
    }
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls"
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1] == {
        "id": "chatcmpl-msg_S1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": 125,
            "completion_tokens": 42,
            "total_tokens": 167,
            "prompt_tokens_details": {"cached_tokens": 100},
        },
    }


def test_stream_without_include_usage() -> None:
    with_usage = chunks_of(run([STREAM], include_usage=True))
    without = chunks_of(run([STREAM], include_usage=False))
    assert with_usage[:-1] == without
    assert all(c["choices"] and "usage" not in c for c in without)


def test_stream_usage_as_it_streams() -> None:
    s = AnthropicToOpenAIStream(MODEL, False)
    assert s.usage == Usage()
    cut = STREAM.index(b"event: ping")
    s.feed(STREAM[:cut])
    assert s.usage == Usage(input_tokens=125, output_tokens=1, cached_tokens=100)
    s.feed(STREAM[cut:])
    assert s.usage == Usage(input_tokens=125, output_tokens=42, cached_tokens=100)
    s.finish()
    assert s.usage == Usage(input_tokens=125, output_tokens=42, cached_tokens=100)


def test_stream_message_delta_may_restate_input_usage() -> None:
    events = [
        STREAM_EVENTS[0],
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"input_tokens": 30, "cache_read_input_tokens": 100, "output_tokens": 9},
        },
    ]
    s = AnthropicToOpenAIStream(MODEL, True)
    chunks = chunks_of(s.feed(anthropic_sse(events)) + s.finish())
    assert chunks[1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert s.usage == Usage(input_tokens=130, output_tokens=9, cached_tokens=100)
    assert chunks[-1]["usage"]["prompt_tokens"] == 130


def test_stream_text_equals_non_streamed_text() -> None:
    message = anthropic_message(
        id="msg_S1",
        content=[
            {"type": "text", "text": TEXT},
            {
                "type": "tool_use",
                "id": "toolu_A",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
            {"type": "tool_use", "id": "toolu_B", "name": "now", "input": {}},
        ],
        stop_reason="tool_use",
        usage={
            "input_tokens": 25,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 0,
            "output_tokens": 42,
        },
    )
    whole = anthropic_to_openai_response(message, MODEL, created=1700000000)
    chunks = chunks_of(run([STREAM]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert chunks[0]["id"] == whole["id"]


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_error_event(include_usage: bool) -> None:
    events = [
        STREAM_EVENTS[0],
        STREAM_EVENTS[2],
        STREAM_EVENTS[3],
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    ]
    chunks = chunks_of(run([anthropic_sse(events)], include_usage))
    errors = [c for c in chunks if "error" in c]
    assert errors == [
        {
            "error": {
                "message": "Overloaded",
                "type": "overloaded_error",
                "param": None,
                "code": "overloaded_error",
            }
        }
    ]
    assert chunks.index(errors[0]) == 2
    assert ("usage" in chunks[-1]) is include_usage


def test_stream_answered_with_a_json_error() -> None:
    """Asked to stream, an upstream may still answer a failure as one JSON body."""
    body = json.dumps(
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    ).encode()
    s = AnthropicToOpenAIStream(MODEL, False)
    out = b"".join(s.feed(body[i : i + 5]) for i in range(0, len(body), 5)) + s.finish()
    assert chunks_of(out) == [
        {
            "error": {
                "message": "slow down",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limit_error",
            }
        }
    ]
    assert s.usage == Usage()


@pytest.mark.parametrize(
    "noise",
    [
        b": keep-alive comment\n\n",
        b'event: ping\ndata: {"type": "ping"}\n\n',
        b"data: not json\n\n",
        b"data: [1, 2]\n\n",
        b'event: future_event\ndata: {"type": "future_event", "x": 1}\n\n',
        encode(
            json.dumps(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "hmm"},
                }
            )
        ),
        encode(
            json.dumps(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "thinking", "thinking": ""},
                }
            )
        ),
    ],
)
def test_stream_ignores_what_has_no_chunk(noise: bytes) -> None:
    cut = STREAM.index(b"event: content_block_start")
    assert run([STREAM[:cut] + noise + STREAM[cut:]]) == run([STREAM])


def test_stream_finish_once_and_last_event_without_blank_line() -> None:
    s = AnthropicToOpenAIStream(MODEL, False, created=1)
    # a final event cut off before its blank line still counts
    out = s.feed(STREAM[:-1]) + s.finish()
    assert out == run([STREAM], include_usage=False).replace(
        b'"created":1700000000', b'"created":1'
    )
    assert s.finish() == b""


def test_stream_reports_usage_with_message_delta_and_observes_output_before() -> None:
    s = AnthropicToOpenAIStream(MODEL, False)
    cut = STREAM.index(b"event: message_delta")
    s.feed(STREAM[:cut])
    # cut after message_start: input known, the whole usage not; the deltas' text was counted
    # ("Hello, wö" 3, "rld! 你好 🌍" 3, the tool inputs as escaped JSON 4 + 2 + 1)
    assert not s.reported
    assert s.usage.input_tokens == 125
    assert s.observed_output == 13
    s.feed(STREAM[cut:])
    s.finish()
    assert s.reported and s.usage.output_tokens == 42


def test_json_answer_reports_its_usage() -> None:
    j = AnthropicToOpenAIJson(MODEL)
    j.feed(json.dumps({"type": "message", "content": [], "usage": {"input_tokens": 3}}).encode())
    assert not j.reported  # read whole, at finish
    j.finish()
    assert j.reported and j.observed_output == 0
    k = AnthropicToOpenAIJson(MODEL)
    k.feed(b'{"id": "queued", "status": "pending"}')
    k.finish()
    assert not k.reported


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 10, "output_tokens": 5},
        {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100},
        {
            "input_tokens": 3,
            "output_tokens": 7,
            "cache_creation_input_tokens": 50,
            "cache_creation": {"ephemeral_1h_input_tokens": 20, "ephemeral_5m_input_tokens": 30},
            "cache_read_input_tokens": 40,
        },
        {},
        None,
    ],
)
def test_the_translated_answer_counts_usage_by_the_one_anthropic_rule(usage):
    from candela_mitm.providers.usage import usage_from_anthropic

    msg = {"type": "message", "role": "assistant", "content": [], "stop_reason": "end_turn"}
    if usage is not None:
        msg["usage"] = usage
    out = anthropic_to_openai_response(msg, "claude-sonnet-4-5")["usage"]
    want = usage_from_anthropic({"usage": usage}) or Usage()
    assert (out["prompt_tokens"], out["completion_tokens"]) == (want.input_tokens, want.output_tokens)
    assert out["prompt_tokens_details"]["cached_tokens"] == want.cached_tokens
