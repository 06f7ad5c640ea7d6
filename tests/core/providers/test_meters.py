from __future__ import annotations

import json
import random
from typing import Any

import pytest

from candela_mitm.providers import meters as meters_mod
from candela_mitm.providers import readers as readers_mod
from candela_mitm.providers.eventstream import bedrock_chunk, bedrock_exception, encode_message
from candela_mitm.providers.meters import UsageMeter, meter_for
from candela_mitm.providers.sse import encode
from candela_mitm.providers.usage import Usage, usage_from_bedrock_headers
from tests.core.providers.wire_samples import (
    ANTHROPIC_BODY,
    BEDROCK_STOP,
    CONVERSE_BODY,
    EMBEDDINGS,
    GEMINI_BODY,
    OLLAMA_BODY,
    OLLAMA_DONE,
    OPENAI_CHAT,
    RESPONSES_BODY,
)

# ---------------------------------------------------------------------------------------------
# Streams


def sse(obj: Any, event: str | None = None, compact: bool = False) -> bytes:
    text = json.dumps(obj, separators=(",", ":") if compact else None)
    return encode(text, event)


def ndjson(*objs: Any) -> bytes:
    return b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objs)


def openai_chunk(
    delta: dict[str, Any] | None, usage: Any = None, finish: str | None = None
) -> dict[str, Any]:
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_1",
        "choices": choices,
        "usage": usage,
    }


OPENAI_STREAM = (
    sse(openai_chunk({"role": "assistant", "content": "", "refusal": None}))
    + sse(openai_chunk({"content": "Hello"}), compact=True)
    + sse(openai_chunk({"content": " there"}))
    + sse(openai_chunk({}, finish="stop"))
    + sse(
        openai_chunk(
            None,
            {
                "prompt_tokens": 12,
                "completion_tokens": 5,
                "total_tokens": 17,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        )
    )
    + b"data: [DONE]\n\n"
)

RESPONSES_STREAM = (
    sse(
        {
            "type": "response.created",
            "sequence_number": 0,
            "response": {**RESPONSES_BODY, "status": "in_progress", "output": [], "usage": None},
        },
        "response.created",
    )
    + sse(
        {
            "type": "response.output_item.added",
            "sequence_number": 2,
            "output_index": 0,
            "item": {"id": "msg_1", "type": "message", "content": []},
        },
        "response.output_item.added",
    )
    + sse(
        {
            "type": "response.output_text.delta",
            "sequence_number": 4,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": "In a",
        },
        "response.output_text.delta",
    )
    + sse(
        {
            "type": "response.output_text.delta",
            "sequence_number": 5,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": " grove",
        },
        "response.output_text.delta",
    )
    + sse(
        {"type": "response.completed", "sequence_number": 9, "response": RESPONSES_BODY},
        "response.completed",
    )
)

TOOL_CALL_STREAM = (
    sse(openai_chunk({"role": "assistant", "content": None}))
    + sse(
        openai_chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        )
    )
    + sse(
        openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Paris"}'}}]})
    )
    + sse(
        openai_chunk(None, {"prompt_tokens": 80, "completion_tokens": 17, "total_tokens": 97}),
        compact=True,
    )
    + b"data: [DONE]\n\n"
)


def anthropic_events(
    usage_start: dict[str, int], deltas: list[dict[str, int]], text: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-sonnet-4-20250514",
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage_start,
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    events += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in text
    ]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events += [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": d,
            },
        )
        for d in deltas
    ]
    events.append(("message_stop", {"type": "message_stop"}))
    return events


ANTHROPIC_EVENTS = anthropic_events(
    {
        "input_tokens": 10,
        "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 1800,
        "output_tokens": 1,
    },
    [{"output_tokens": 7}, {"output_tokens": 42}],
    ["Hello", "!", " How can I help?"],
)
ANTHROPIC_STREAM = b"".join(sse(obj, name) for name, obj in ANTHROPIC_EVENTS)
# the newer API repeats every count, cumulative, in message_delta
ANTHROPIC_CUMULATIVE_STREAM = b"".join(
    sse(obj, name)
    for name, obj in anthropic_events(
        {"input_tokens": 25, "output_tokens": 1},
        [
            {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 15,
            }
        ],
        ["Hi"],
    )
)


def gemini_chunk(text: str, usage: dict[str, int], finish: str | None = None) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    return {
        "candidates": [cand],
        "usageMetadata": usage,
        "modelVersion": "gemini-2.5-flash",
        "responseId": "r1",
    }


GEMINI_CHUNKS = [
    gemini_chunk("The", {"promptTokenCount": 8, "totalTokenCount": 8}),
    gemini_chunk(
        " quick",
        {
            "promptTokenCount": 8,
            "candidatesTokenCount": 20,
            "totalTokenCount": 128,
            "thoughtsTokenCount": 100,
        },
    ),
    gemini_chunk(
        " fox.",
        {
            "promptTokenCount": 8,
            "candidatesTokenCount": 50,
            "totalTokenCount": 158,
            "thoughtsTokenCount": 100,
        },
        "STOP",
    ),
]
GEMINI_SSE = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in GEMINI_CHUNKS)
GEMINI_ARRAY = ("[" + ",\r\n".join(json.dumps(c, indent=2) for c in GEMINI_CHUNKS) + "]").encode()

OLLAMA_CHAT_STREAM = ndjson(
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T08:52:19.385406455-07:00",
        "message": {"role": "assistant", "content": "The"},
        "done": False,
    },
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T08:52:19.5-07:00",
        "message": {"role": "assistant", "content": " sky"},
        "done": False,
    },
    OLLAMA_DONE,
)
OLLAMA_GENERATE_STREAM = ndjson(
    {"model": "llama3.2", "created_at": "2023-08-04T08:52:19Z", "response": "The", "done": False},
    {
        "model": "llama3.2",
        "created_at": "2023-08-04T19:22:45Z",
        "response": "",
        "done": True,
        "context": [1, 2, 3],
        "prompt_eval_count": 26,
        "eval_count": 290,
    },
)

# Bedrock's metrics repeat the model's counts, cache reads and writes apart as Anthropic's are
BEDROCK_STOP_CACHED = {
    "type": "message_stop",
    "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": 10,
        "outputTokenCount": 42,
        "invocationLatency": 1538,
        "firstByteLatency": 517,
        "cacheReadInputTokenCount": 1800,
        "cacheWriteInputTokenCount": 200,
    },
}
BEDROCK_EVENTS = [obj for _, obj in ANTHROPIC_EVENTS[:-1]] + [BEDROCK_STOP_CACHED]
BEDROCK_STREAM = b"".join(bedrock_chunk(e) for e in BEDROCK_EVENTS)
CONVERSE_STREAM = b"".join(
    encode_message(
        {":event-type": t, ":content-type": "application/json", ":message-type": "event"},
        json.dumps(p).encode(),
    )
    for t, p in [
        ("messageStart", {"role": "assistant", "p": "abcdefgh"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hello"}, "p": "abcd"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " world"}, "p": "abcd"}),
        ("contentBlockStop", {"contentBlockIndex": 0, "p": "ab"}),
        ("messageStop", {"stopReason": "end_turn", "p": "abc"}),
        (
            "metadata",
            {
                "usage": {
                    "inputTokens": 30,
                    "outputTokens": 12,
                    "totalTokens": 142,
                    "cacheReadInputTokens": 100,
                    "cacheWriteInputTokens": 0,
                },
                "metrics": {"latencyMs": 500},
            },
        ),
    ]
)

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
EVENTSTREAM = "application/vnd.amazon.eventstream"
JSON = "application/json"

# (name, wire, stream, content type, body, expected usage)
STREAMS = [
    ("openai chat", "openai", True, SSE, OPENAI_STREAM, Usage(12, 5, 0)),
    ("openai responses", "openai", True, SSE, RESPONSES_STREAM, Usage(37, 11, 32)),
    ("openai tool call", "openai", True, SSE, TOOL_CALL_STREAM, Usage(80, 17, 0)),
    ("lmstudio (openai wire)", "openai", True, SSE, OPENAI_STREAM, Usage(12, 5, 0)),
    (
        "ollama /v1 sse",
        "ollama",
        True,
        "text/event-stream; charset=utf-8",
        OPENAI_STREAM,
        Usage(12, 5, 0),
    ),
    ("anthropic", "anthropic", True, SSE, ANTHROPIC_STREAM, Usage(2010, 42, 1800)),
    (
        "anthropic cumulative delta",
        "anthropic",
        True,
        SSE,
        ANTHROPIC_CUMULATIVE_STREAM,
        Usage(25, 15, 0),
    ),
    ("gemini sse", "gemini", True, SSE, GEMINI_SSE, Usage(8, 150, 0)),
    ("gemini json array", "gemini", True, JSON, GEMINI_ARRAY, Usage(8, 150, 0)),
    ("ollama chat", "ollama", True, NDJSON, OLLAMA_CHAT_STREAM, Usage(26, 282, 0)),
    ("ollama generate", "ollama", True, NDJSON, OLLAMA_GENERATE_STREAM, Usage(26, 290, 0)),
    ("bedrock invoke stream", "bedrock", True, EVENTSTREAM, BEDROCK_STREAM, Usage(2010, 42, 1800)),
    ("bedrock converse stream", "bedrock", True, EVENTSTREAM, CONVERSE_STREAM, Usage(130, 12, 100)),
    (
        "openai body",
        "openai",
        False,
        JSON,
        json.dumps(OPENAI_CHAT).encode(),
        Usage(2006, 300, 1920),
    ),
    ("openai embeddings", "openai", False, JSON, json.dumps(EMBEDDINGS).encode(), Usage(8, 0, 0)),
    (
        "anthropic body",
        "anthropic",
        False,
        JSON,
        json.dumps(ANTHROPIC_BODY, indent=2).encode(),
        Usage(2010, 503, 1800),
    ),
    ("gemini body", "gemini", False, JSON, json.dumps(GEMINI_BODY).encode(), Usage(2100, 98, 2048)),
    ("ollama body", "ollama", False, JSON, json.dumps(OLLAMA_BODY).encode(), Usage(26, 282, 0)),
    (
        "bedrock anthropic body",
        "bedrock",
        False,
        JSON,
        json.dumps(ANTHROPIC_BODY).encode(),
        Usage(2010, 503, 1800),
    ),
    (
        "bedrock converse body",
        "bedrock",
        False,
        JSON,
        json.dumps(CONVERSE_BODY).encode(),
        Usage(135, 628, 100),
    ),
]
STREAM_IDS = [s[0] for s in STREAMS]


def run(meter: UsageMeter, body: bytes, splits: list[int], finish: bool = True) -> Usage:
    prev = 0
    for cut in [*splits, len(body)]:
        meter.feed(body[prev:cut])
        prev = cut
    if finish:
        meter.finish()
    return meter.usage


@pytest.mark.parametrize(
    ("name", "wire", "stream", "ctype", "body", "expected"), STREAMS, ids=STREAM_IDS
)
def test_meter_reads_whole_body(
    name: str, wire: str, stream: bool, ctype: str, body: bytes, expected: Usage
) -> None:
    meter = meter_for(wire, stream, ctype)
    assert run(meter, body, []) == expected
    assert meter.saw_output
    assert meter.error is None and meter.fault is None


@pytest.mark.parametrize(
    ("name", "wire", "stream", "ctype", "body", "expected"), STREAMS, ids=STREAM_IDS
)
def test_meter_byte_by_byte(
    name: str, wire: str, stream: bool, ctype: str, body: bytes, expected: Usage
) -> None:
    meter = meter_for(wire, stream, ctype)
    assert run(meter, body, list(range(1, len(body)))) == expected
    assert meter.saw_output


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("name", "wire", "stream", "ctype", "body", "expected"), STREAMS, ids=STREAM_IDS
)
def test_meter_random_splits(
    name: str, wire: str, stream: bool, ctype: str, body: bytes, expected: Usage, seed: int
) -> None:
    rng = random.Random(seed)
    splits = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(1, 30))))
    meter = meter_for(wire, stream, ctype)
    assert run(meter, body, splits) == expected


@pytest.mark.parametrize(
    ("name", "wire", "stream", "ctype", "body", "expected"), STREAMS, ids=STREAM_IDS
)
def test_usage_is_readable_without_finish_once_the_body_passed(
    name: str, wire: str, stream: bool, ctype: str, body: bytes, expected: Usage
) -> None:
    meter = meter_for(wire, stream, ctype)
    # an NDJSON body's last line ends with its newline, an SSE event with its blank line
    assert run(meter, body, [len(body) // 2], finish=False) == expected


def test_saw_output_waits_for_the_first_token() -> None:
    meter = meter_for("anthropic", True, SSE)
    for name, obj in ANTHROPIC_EVENTS[:3]:  # message_start, content_block_start, ping
        meter.feed(sse(obj, name))
    assert not meter.saw_output
    assert meter.usage == Usage(2010, 1, 1800)
    meter.feed(sse(ANTHROPIC_EVENTS[3][1], ANTHROPIC_EVENTS[3][0]))
    assert meter.saw_output

    meter = meter_for("openai", True, SSE)
    meter.feed(sse(openai_chunk({"role": "assistant", "content": ""})))
    assert not meter.saw_output
    meter.feed(sse(openai_chunk({"content": "Hi"})))
    assert meter.saw_output


# ---------------------------------------------------------------------------------------------
# Partial streams: what a budget settles on when the client goes away


def _cut_after(body: bytes, marker: bytes) -> bytes:
    i = body.index(marker)
    return body[: body.index(b"\n\n", i) + 2]


@pytest.mark.parametrize(
    ("wire", "ctype", "body", "expected"),
    [
        # input and the first output count from message_start, before any message_delta
        (
            "anthropic",
            SSE,
            _cut_after(ANTHROPIC_STREAM, b"content_block_stop"),
            Usage(2010, 1, 1800),
        ),
        # cut in the middle of the final message_delta: the first one's count stands
        (
            "anthropic",
            SSE,
            ANTHROPIC_STREAM[: ANTHROPIC_STREAM.rindex(b'"output_tokens": 42')],
            Usage(2010, 7, 1800),
        ),
        ("gemini", SSE, GEMINI_SSE[: GEMINI_SSE.rindex(b"data:") + 40], Usage(8, 120, 0)),
        ("gemini", JSON, GEMINI_ARRAY[: GEMINI_ARRAY.rindex(b'"candidates"')], Usage(8, 120, 0)),
        ("openai", SSE, OPENAI_STREAM[: OPENAI_STREAM.index(b"data: [DONE]")], Usage(12, 5, 0)),
        # the usage chunk never came: nothing to count from the body
        ("openai", SSE, OPENAI_STREAM[: OPENAI_STREAM.index(b'"prompt_tokens"')], Usage()),
        (
            "ollama",
            NDJSON,
            OLLAMA_CHAT_STREAM[: OLLAMA_CHAT_STREAM.rindex(b'"done":true')],
            Usage(),
        ),
    ],
)
def test_partial_stream_reports_what_it_saw(
    wire: str, ctype: str, body: bytes, expected: Usage
) -> None:
    meter = meter_for(wire, True, ctype)
    for i in range(0, len(body), 7):
        meter.feed(body[i : i + 7])
    assert meter.usage == expected
    meter.finish()  # a cut connection may still end the stream: the same answer
    assert meter.usage == expected
    assert meter.saw_output


def test_bedrock_stream_cut_mid_message() -> None:
    body = (
        b"".join(bedrock_chunk(e) for e in BEDROCK_EVENTS[:-1]) + bedrock_chunk(BEDROCK_STOP)[:30]
    )
    meter = meter_for("bedrock", True, EVENTSTREAM)
    meter.feed(body)
    assert meter.usage == Usage(2010, 42, 1800)
    meter.finish()
    assert meter.fault is not None and "cut" in meter.fault
    assert meter.usage == Usage(2010, 42, 1800)


def test_ollama_last_line_without_newline_counts_at_finish() -> None:
    body = OLLAMA_CHAT_STREAM.rstrip(b"\n")
    meter = meter_for("ollama", True, NDJSON)
    meter.feed(body)
    assert meter.usage == Usage()
    meter.finish()
    assert meter.usage == Usage(26, 282, 0)


def test_partial_json_body_read_before_finish() -> None:
    body = json.dumps(OPENAI_CHAT).encode()
    meter = meter_for("openai", False, JSON)
    meter.feed(body[:-40])
    assert meter.usage == Usage()  # usage sits at the end of the body and is not whole yet
    meter.feed(body[-40:])
    assert meter.usage == Usage(2006, 300, 1920)
    assert meter.saw_output


# ---------------------------------------------------------------------------------------------
# Malformed input never raises out of feed()

GARBAGE_SSE = [
    b"data: {not json\n\n",
    b'data: {"choices": [{"delta": {"content": "x"\n\n',
    b"data: \xff\xfe\x00\n\n",
    b": keep-alive comment\n\n",
    b"event: weird\ndata: []\n\n",
    b'data: {"usage": {"prompt_tokens": "many"}}\n\n',
    b"data: 12\n\n",
]


@pytest.mark.parametrize(
    ("wire", "body", "expected"),
    [
        ("openai", OPENAI_STREAM, Usage(12, 5, 0)),
        ("anthropic", ANTHROPIC_STREAM, Usage(2010, 42, 1800)),
        ("gemini", GEMINI_SSE, Usage(8, 150, 0)),
    ],
)
def test_malformed_sse_chunks_are_skipped(wire: str, body: bytes, expected: Usage) -> None:
    events = [e + b"\n\n" for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e]
    mixed = b"".join(GARBAGE_SSE[:2]) + b"".join(
        e + GARBAGE_SSE[i % len(GARBAGE_SSE)] for i, e in enumerate(events)
    )
    meter = meter_for(wire, True, SSE)
    assert run(meter, mixed, list(range(3, len(mixed), 11))) == expected
    assert meter.fault is None


def test_last_gemini_chunk_malformed_keeps_the_one_before() -> None:
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in GEMINI_CHUNKS[:2])
    body += b'data: {"candidates": [], "usageMetadata": {"promptTokenCount": 8, "candid\n\n'
    meter = meter_for("gemini", True, SSE)
    assert run(meter, body, []) == Usage(8, 120, 0)


def test_malformed_ndjson_lines_are_skipped() -> None:
    lines = OLLAMA_CHAT_STREAM.split(b"\n")
    body = b"\n".join(
        [lines[0], b"{{{", b"", b"\xff\xfe", lines[1], b'{"done": tru', lines[2], b""]
    )
    meter = meter_for("ollama", True, NDJSON)
    assert run(meter, body, list(range(1, len(body), 5))) == Usage(26, 282, 0)


def test_malformed_bedrock_chunks_are_skipped() -> None:
    bad = [
        encode_message(
            {":event-type": "chunk", ":message-type": "event"}, b'{"bytes":"!!notbase64!!"}'
        ),
        encode_message(
            {":event-type": "chunk", ":message-type": "event"}, b'{"bytes":"bm90IGpzb24="}'
        ),
        encode_message({":event-type": "chunk", ":message-type": "event"}, b"not json at all"),
    ]
    body = bad[0] + b"".join(bedrock_chunk(e) + bad[i % 3] for i, e in enumerate(BEDROCK_EVENTS))
    meter = meter_for("bedrock", True, EVENTSTREAM)
    assert run(meter, body, list(range(1, len(body), 13))) == Usage(2010, 42, 1800)
    assert meter.fault is None


def test_json_body_that_is_not_json() -> None:
    meter = meter_for("openai", False, JSON)
    assert run(meter, b"<html>502 Bad Gateway</html>", []) == Usage()
    assert not meter.saw_output


# ---------------------------------------------------------------------------------------------
# Bedrock specifics


def test_bedrock_invocation_metrics_win() -> None:
    events = [
        obj
        for _, obj in anthropic_events(
            {"input_tokens": 12, "output_tokens": 1}, [{"output_tokens": 40}], ["Hi"]
        )
    ]
    events[-1] = BEDROCK_STOP  # Bedrock counts 45 where the model's last delta said 40
    meter = meter_for("bedrock", True, EVENTSTREAM)
    meter.feed(b"".join(bedrock_chunk(e) for e in events[:-1]))
    assert meter.usage == Usage(12, 40, 0)
    meter.feed(bedrock_chunk(events[-1]))
    assert meter.usage == Usage(12, 45, 0)


def test_bedrock_chunk_with_spaced_json_wrapper() -> None:
    import base64

    inner = base64.b64encode(json.dumps(BEDROCK_STOP).encode()).decode()
    payload = json.dumps({"bytes": inner, "p": "abcdefghijklmnop"}).encode()  # '{"bytes": "...'
    meter = meter_for("bedrock", True, EVENTSTREAM)
    meter.feed(encode_message({":event-type": "chunk", ":message-type": "event"}, payload))
    assert meter.usage == Usage(12, 45, 0)


def test_bedrock_crc_corruption_stops_reading_but_keeps_the_count() -> None:
    good = b"".join(bedrock_chunk(e) for e in BEDROCK_EVENTS[:-2])  # through message_delta 7
    last = bytearray(bedrock_chunk(BEDROCK_EVENTS[-2]))
    last[-10] ^= 0xFF
    meter = meter_for("bedrock", True, EVENTSTREAM)
    meter.feed(good + bytes(last))  # no exception
    assert meter.fault is not None and "CRC" in meter.fault
    assert meter.usage == Usage(2010, 7, 1800)
    meter.feed(bedrock_chunk(BEDROCK_STOP))  # after a fault the framing is lost: ignored
    meter.finish()
    assert meter.usage == Usage(2010, 7, 1800)


def test_bedrock_exception_is_reported() -> None:
    meter = meter_for("bedrock", True, EVENTSTREAM)
    meter.feed(bedrock_chunk(BEDROCK_EVENTS[0]))
    meter.feed(bedrock_exception("throttlingException", "Too many requests, please wait"))
    meter.finish()
    assert meter.error == "throttlingException: Too many requests, please wait"
    assert meter.usage == Usage(2010, 1, 1800)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", Usage(12, 45, 0)),
        (json.dumps(ANTHROPIC_BODY).encode(), Usage(2010, 503, 1800)),  # the body wins
        (b'{"type": "message", "content": [{"type": "text", "te', Usage(12, 45, 0)),  # cut short
    ],
)
def test_bedrock_headers_are_the_fallback(body: bytes, expected: Usage) -> None:
    headers = {
        "Content-Type": "application/json",
        "X-Amzn-Bedrock-Input-Token-Count": "12",
        "X-Amzn-Bedrock-Output-Token-Count": "45",
    }
    meter = meter_for("bedrock", False, None, headers)
    meter.feed(body)
    assert meter.usage == expected


# ---------------------------------------------------------------------------------------------
# Choosing the framing


@pytest.mark.parametrize(
    ("wire", "stream", "ctype", "headers", "body", "expected"),
    [
        # the content type decides, whatever the request asked for
        ("openai", False, SSE, None, OPENAI_STREAM, Usage(12, 5, 0)),
        ("ollama", False, NDJSON, None, OLLAMA_CHAT_STREAM, Usage(26, 282, 0)),
        ("gemini", True, JSON, None, json.dumps(GEMINI_BODY).encode(), Usage(2100, 98, 2048)),
        # from the response headers when no content type is given
        (
            "anthropic",
            False,
            None,
            {"Content-Type": "text/event-stream; charset=utf-8"},
            ANTHROPIC_STREAM,
            Usage(2010, 42, 1800),
        ),
        # no content type at all: the wire's streaming format
        ("bedrock", True, None, None, BEDROCK_STREAM, Usage(2010, 42, 1800)),
        ("ollama", True, None, None, OLLAMA_CHAT_STREAM, Usage(26, 282, 0)),
        ("anthropic", True, None, None, ANTHROPIC_STREAM, Usage(2010, 42, 1800)),
        # a stream labelled as JSON still reads at finish
        ("anthropic", True, JSON, None, ANTHROPIC_STREAM, Usage(2010, 42, 1800)),
        ("ollama", False, JSON, None, OLLAMA_CHAT_STREAM, Usage(26, 282, 0)),
    ],
)
def test_meter_for_chooses_by_content_type(
    wire: str,
    stream: bool,
    ctype: str | None,
    headers: dict[str, str] | None,
    body: bytes,
    expected: Usage,
) -> None:
    meter = meter_for(wire, stream, ctype, headers)
    assert run(meter, body, list(range(5, len(body), 97))) == expected


# ---------------------------------------------------------------------------------------------
# Errors the provider reports inside a body


@pytest.mark.parametrize(
    ("wire", "ctype", "body", "error"),
    [
        (
            "anthropic",
            SSE,
            sse(ANTHROPIC_EVENTS[0][1], "message_start")
            + sse(ANTHROPIC_EVENTS[3][1], "content_block_delta")
            + sse(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                "error",
            ),
            "overloaded_error: Overloaded",
        ),
        (
            "openai",
            SSE,
            sse(openai_chunk({"content": "Hi"}))
            + sse(
                {
                    "error": {
                        "message": "The server had an error",
                        "type": "server_error",
                        "code": None,
                    }
                }
            ),
            "server_error: The server had an error",
        ),
        (
            "ollama",
            NDJSON,
            b'{"error":"model \\"nope\\" not found, try pulling it first"}\n',
            'model "nope" not found, try pulling it first',
        ),
        (
            "gemini",
            JSON,
            json.dumps(
                {
                    "error": {
                        "code": 429,
                        "message": "Resource exhausted",
                        "status": "RESOURCE_EXHAUSTED",
                    }
                }
            ).encode(),
            "RESOURCE_EXHAUSTED: Resource exhausted",
        ),
    ],
)
def test_error_in_body_is_reported(wire: str, ctype: str, body: bytes, error: str) -> None:
    meter = meter_for(wire, True, ctype)
    meter.feed(body)
    meter.finish()
    assert meter.error == error


# ---------------------------------------------------------------------------------------------
# Bounds and the hot path


def test_huge_json_body_keeps_only_its_end() -> None:
    vectors = [
        {"object": "embedding", "index": i, "embedding": [0.001 * j for j in range(64)]}
        for i in range(1000)
    ]
    body = json.dumps(
        {
            "object": "list",
            "data": vectors,
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 900, "total_tokens": 900},
        }
    ).encode()
    meter = meter_for("openai", False, JSON, max_body=64 * 1024)
    assert len(body) > 2 * 256 * 1024  # past the bound, and past the tail it keeps
    assert run(meter, body, list(range(4096, len(body), 4096))) == Usage(900, 0, 0)
    assert meter.saw_output
    held = meter._buf, meter._tail  # type: ignore[attr-defined]
    assert len(held[0]) == 0 and held[1] is not None and len(held[1]) <= 2 * 256 * 1024


def test_oversized_ndjson_line_is_dropped_and_later_lines_still_count() -> None:
    meter = meter_for("ollama", True, NDJSON, max_body=1024)
    meter.feed(b'{"message": {"content": "' + b"x" * 5000)
    meter.feed(b'"}, "done": false}\n' + OLLAMA_CHAT_STREAM)
    meter.finish()
    assert meter.usage == Usage(26, 282, 0)


@pytest.mark.parametrize(
    ("wire", "first", "chunk", "last", "max_parses"),
    [
        (
            "openai",
            sse(openai_chunk({"role": "assistant", "content": ""})),
            sse(openai_chunk({"content": "tok"})),
            sse(
                openai_chunk(
                    None, {"prompt_tokens": 3, "completion_tokens": 1000, "total_tokens": 1003}
                )
            ),
            3,
        ),
        (
            "gemini",
            b"",
            b"data: "
            + json.dumps(
                gemini_chunk("tok", {"promptTokenCount": 3, "totalTokenCount": 3})
            ).encode()
            + b"\r\n\r\n",
            b"data: "
            + json.dumps(
                gemini_chunk(
                    "",
                    {"promptTokenCount": 3, "candidatesTokenCount": 1000, "totalTokenCount": 1003},
                )
            ).encode()
            + b"\r\n\r\n",
            2,
        ),
        (
            "anthropic",
            b"".join(sse(o, n) for n, o in ANTHROPIC_EVENTS[:3]),
            sse(ANTHROPIC_EVENTS[3][1], "content_block_delta"),
            sse({"type": "message_delta", "usage": {"output_tokens": 1000}}, "message_delta"),
            6,
        ),
    ],
)
def test_stream_chunks_are_not_all_parsed(
    monkeypatch: pytest.MonkeyPatch,
    wire: str,
    first: bytes,
    chunk: bytes,
    last: bytes,
    max_parses: int,
) -> None:
    parses = 0
    real = readers_mod.load_json

    def counting(text: str | bytes) -> object | None:
        nonlocal parses
        parses += 1
        return real(text)

    monkeypatch.setattr(readers_mod, "load_json", counting)
    meter = meter_for(wire, True, SSE)
    meter.feed(first)
    for _ in range(1000):
        meter.feed(chunk)
    meter.feed(last)
    meter.finish()
    assert meter.usage.output_tokens == 1000
    assert parses <= max_parses


def test_reading_a_json_body_early_parses_only_once_usage_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    real = meters_mod._documents

    def counting(body: bytes) -> list[object]:
        nonlocal calls
        calls += 1
        return real(body)

    monkeypatch.setattr(meters_mod, "_documents", counting)
    body = json.dumps(OPENAI_CHAT).encode()
    start = body.index(b'"usage"')
    meter = meter_for("openai", False, JSON)
    for i in range(0, len(body), 10):
        meter.feed(body[i : i + 10])
        meter.usage  # noqa: B018 - a budget may read at any time
    assert calls <= (len(body) - start) // 10 + 2
    assert meter.usage == Usage(2006, 300, 1920)


def test_bedrock_headers_read_from_mitmproxys_headers() -> None:
    """The proxy passes mitmproxy's Headers (case-insensitive, repeatable names), not a dict."""
    from mitmproxy.http import Headers

    h = Headers(
        [
            (b"Content-Type", b"application/json"),
            (b"X-Amzn-Bedrock-Input-Token-Count", b"12"),
            (b"x-amzn-bedrock-output-token-count", b" 7 "),
            (b"X-Other", b"1"),
        ]
    )
    assert usage_from_bedrock_headers(h) == Usage(12, 7, 0)
    assert usage_from_bedrock_headers(Headers([(b"content-type", b"application/json")])) is None


# ---------------------------------------------------------------------------------------------
# Whether the whole usage was reported, and the output observed as a stream passes


@pytest.mark.parametrize(
    ("name", "wire", "stream", "ctype", "body", "expected"), STREAMS, ids=STREAM_IDS
)
def test_a_whole_answer_reports_its_usage(
    name: str, wire: str, stream: bool, ctype: str, body: bytes, expected: Usage
) -> None:
    meter = meter_for(wire, stream, ctype)
    assert not meter.reported
    run(meter, body, [7])
    assert meter.reported


# (wire, content type, a stream cut before its usage came whole)
CUT_BEFORE_USAGE = [
    pytest.param(
        "anthropic",
        SSE,
        ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")],
        id="anthropic-after-message_start",
    ),
    pytest.param(
        "openai", SSE, OPENAI_STREAM[: OPENAI_STREAM.index(b'"prompt_tokens"')], id="openai"
    ),
    pytest.param(
        "openai",
        SSE,
        RESPONSES_STREAM[: RESPONSES_STREAM.index(b"event: response.completed")],
        id="responses",
    ),
    pytest.param(
        "ollama",
        NDJSON,
        OLLAMA_CHAT_STREAM[: OLLAMA_CHAT_STREAM.rindex(b'"done":true')],
        id="ollama",
    ),
    pytest.param(
        "bedrock",
        EVENTSTREAM,
        b"".join(bedrock_chunk(e) for e in BEDROCK_EVENTS[:5]),  # to the last text delta
        id="bedrock-invoke",
    ),
]


@pytest.mark.parametrize(("wire", "ctype", "body"), CUT_BEFORE_USAGE)
def test_a_cut_stream_is_not_reported_but_its_output_is_observed(
    wire: str, ctype: str, body: bytes
) -> None:
    meter = meter_for(wire, True, ctype)
    run(meter, body, list(range(5, len(body), 11)))
    assert not meter.reported
    assert meter.observed_output > 0


def test_observed_output_adds_up_over_a_long_stream() -> None:
    words = [f" word{i}" for i in range(1000)]  # 6 to 8 characters: 2 tokens each
    body = b"".join(sse(openai_chunk({"content": w}), compact=True) for w in words)
    meter = meter_for("openai", True, SSE)
    run(meter, body, list(range(100, len(body), 4096)), finish=False)
    assert meter.observed_output == 2 * len(words)
    assert meter.usage == Usage() and not meter.reported




@pytest.mark.parametrize("cut", [1, 5, 9, 12, 30])
def test_a_json_body_is_read_before_its_end_once_a_usage_key_passed(cut):
    """The usage key is looked for from where the new bytes start (32 bytes back): one split
    across two reads is found too, and a body without one is not parsed early."""
    body = b'{"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    m = meter_for("openai", False, "application/json")
    at = body.index(b'"usage') + cut % 6
    m.feed(body[:at])
    m.feed(body[at:])
    assert m.usage.input_tokens == 3 and m.usage.output_tokens == 2  # before finish()
    plain = meter_for("openai", False, "application/json")
    plain.feed(b'{"id": "x", "choices": []}')
    assert plain._marked is False  # type: ignore[attr-defined]


_OPENAI_USAGE = b'"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}'
_BODY_TABLE = [
    b'{"choices":[{"message":{"role":"assistant","content":"hi"}}],' + _OPENAI_USAGE + b"}",
    # duplicate keys: the last wins, as json.loads reads them
    b'{"usage":{"prompt_tokens":1,"completion_tokens":1},' + _OPENAI_USAGE + b"}",
    b'{"usage":{"prompt_tokens":1,"completion_tokens":1,"completion_tokens":9}}',
    # usage in odd places: nested in an item, in a string, under another key
    b'{"data":[{"usage":{"prompt_tokens":3,"completion_tokens":4}}],"note":"\\"usage\\":{}"}',
    b'{"error":{"type":"overloaded","message":"busy"},' + _OPENAI_USAGE + b"}",
    b'{"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":3},"eval_count":4}',
    # arrays (with whitespace bytes.lstrip() takes before them), NDJSON, SSE in a JSON meter
    b"[{" + _OPENAI_USAGE + b"}]",
    b" \t\r\n\x0b\x0c[{" + _OPENAI_USAGE + b'},{"choices":[]}]',
    b"\x0b\x0c{" + _OPENAI_USAGE + b"}",
    b'{"a":1}\n{' + _OPENAI_USAGE + b"}\n",
    b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: {' + _OPENAI_USAGE + b"}\n\n",
    # cut-off bodies and non-UTF-8 ones
    b'{"choices":[{"message":{"content":"hi"}}],' + _OPENAI_USAGE[:-5],
    b'{"choices":[],' + _OPENAI_USAGE + b',"x":"\xff\xfe"}',
    b'[{"a":1},{' + _OPENAI_USAGE + b'},{"b":',
    b"\xff\xfe\x00{",
    b"",
    b"   ",
]


def _read(wire: str, body: bytes, step: int) -> tuple[object, ...]:
    m = meter_for(wire, False, "application/json")
    for i in range(0, len(body), step):
        m.feed(body[i : i + step])
    m.finish()
    array = getattr(m, "_array", None) is not None
    return (m.usage, vars(m.usage), m.reported, m.saw_output, m.error, m.fault, array)


@pytest.mark.parametrize("body", _BODY_TABLE)
@pytest.mark.parametrize("wire", ["openai", "gemini", "ollama", "anthropic"])
def test_json_meter_reads_the_same_however_the_body_is_cut(wire: str, body: bytes) -> None:
    # the JSON body meter's sniff (the first byte past ASCII whitespace, found in place) and its
    # reads give the same answer for the body in one piece or cut anywhere
    whole = _read(wire, body, max(1, len(body)))
    assert whole[-1] == body.lstrip().startswith(b"[")  # an array is read element by element
    for step in (1, 2, 7):
        assert _read(wire, body, step) == whole


def test_json_meter_duplicate_usage_keys_last_wins() -> None:
    m = meter_for("openai", False, "application/json")
    m.feed(_BODY_TABLE[1])
    m.finish()
    assert m.usage == Usage(5, 7, 0) and m.reported
    m = meter_for("openai", False, "application/json")
    m.feed(_BODY_TABLE[2])
    m.finish()
    assert m.usage == Usage(1, 9, 0)
