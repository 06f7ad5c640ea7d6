"""Realtime frames: models named by client frames, usage read from server frames, error events."""

from __future__ import annotations

import json

import pytest

from candela_mitm.providers.realtime import (
    add_usage,
    asks_for_work,
    error_event,
    model_named,
    model_reported,
    names_model_badly,
    parse_frame,
    tokens_by_kind,
    usage_of,
)
from candela_mitm.providers.usage import Usage
from tests.fakes.realtime import RtUsage, usage_event

RT, RESP, LIVE = "openai-realtime", "openai-responses", "gemini-live"


@pytest.mark.parametrize(
    "protocol, frame, model",
    [
        (RT, {"type": "session.update", "session": {"model": "gpt-realtime"}}, "gpt-realtime"),
        (RT, {"type": "session.update", "session": {"instructions": "x"}}, None),
        (RT, {"type": "response.create", "response": {"model": "x"}}, None),  # not a switch
        (RESP, {"type": "response.create", "model": "gpt-4o-mini", "input": "hi"}, "gpt-4o-mini"),
        (RESP, {"type": "response.create", "response": {"model": "o3"}}, "o3"),
        (RESP, {"type": "response.cancel"}, None),
        (LIVE, {"setup": {"model": "models/gemini-live-2.5-flash-preview"}}, "gemini-live-2.5-flash-preview"),
        (LIVE, {"setup": {"model": "projects/p/locations/l/publishers/google/models/gemini-2.0-flash"}},
         "gemini-2.0-flash"),
        (LIVE, {"clientContent": {"turns": []}}, None),
    ],
)
def test_model_named(protocol, frame, model):
    assert model_named(protocol, frame) == model
    assert not names_model_badly(protocol, frame)


@pytest.mark.parametrize(
    "protocol, frame",
    [
        (RT, {"type": "session.update", "session": {"model": ""}}),
        (RESP, {"type": "response.create", "model": 42}),
        # two models in one frame: which one the provider runs is not Candela's guess
        (RESP, {"type": "response.create", "model": "gpt-4o-mini", "response": {"model": "gpt-4o"}}),
        (LIVE, {"setup": {"model": "models/"}}),
        (LIVE, {"setup": {"model": None}}),
    ],
)
def test_a_model_field_that_names_no_model_is_flagged(protocol, frame):
    assert model_named(protocol, frame) is None and names_model_badly(protocol, frame)


@pytest.mark.parametrize("content", [b"\x00\x01audio", b"[1, 2]", b"not json", "é".encode("latin-1")])
def test_parse_frame_keeps_only_json_objects(content):
    assert parse_frame(content) is None


@pytest.mark.parametrize("protocol", [RT, LIVE])
def test_audio_and_text_tokens_are_read_apart(protocol):
    u = usage_of(protocol, usage_event(protocol, RtUsage(300, 2000, 50, 1200, 100), 1))
    assert u is not None
    assert (u.input_tokens, u.output_tokens) == (2300, 1250)
    assert (u.input_audio_tokens, u.output_audio_tokens) == (2000, 1200)
    assert tokens_by_kind(u)["input_text"] == 300 and tokens_by_kind(u)["output_text"] == 50


def test_realtime_cached_audio_tokens():
    frame = usage_event(RT, RtUsage(100, 100, 10, 10, 80), 1)
    frame["response"]["usage"]["input_token_details"]["cached_tokens_details"] = {
        "text_tokens": 30, "audio_tokens": 50,
    }
    u = usage_of(RT, frame)
    assert u is not None and u.cached_tokens == 80 and u.cached_audio_tokens == 50


def test_responses_usage_frames():
    done = usage_event(RESP, RtUsage(input_text=120, output_text=30, cached=20), 3)
    u = usage_of(RESP, done)
    assert u == Usage(120, 30, 20)
    assert usage_of(RESP, {"type": "response.output_text.delta", "delta": "x"}) is None
    incomplete = dict(done, type="response.incomplete")
    assert usage_of(RESP, incomplete) == Usage(120, 30, 20)


@pytest.mark.parametrize(
    "protocol, frame",
    [
        (RT, {"type": "response.created", "response": {"usage": {"input_tokens": 5}}}),
        (RT, {"type": "session.created"}),
        (LIVE, {"serverContent": {"modelTurn": {"parts": [{"text": "hi"}]}}}),
        (LIVE, {"setupComplete": {}}),
    ],
)
def test_frames_without_usage(protocol, frame):
    assert usage_of(protocol, frame) is None


def test_the_model_a_usage_frame_reports():
    done = usage_event(RESP, RtUsage(), 1)
    done["response"]["model"] = "gpt-4o-mini-2024-07-18"
    assert model_reported(done) == "gpt-4o-mini-2024-07-18"
    assert model_reported({"usageMetadata": {}}) is None


def test_add_usage_sums_every_kind():
    total = Usage()
    a = Usage(10, 5, 2)
    a.input_audio_tokens, a.output_audio_tokens = 4, 3
    add_usage(total, a)
    add_usage(total, a)
    assert total == Usage(20, 10, 4)
    assert (total.input_audio_tokens, total.output_audio_tokens) == (8, 6)


@pytest.mark.parametrize(
    "protocol, read",
    [
        (RT, lambda e: (e["type"], e["error"]["code"])),
        (RESP, lambda e: (e["type"], e["code"])),
        (LIVE, lambda e: (e["error"]["status"], e["error"]["details"][0]["reason"])),
    ],
)
def test_error_events_carry_candelas_code_in_the_providers_shape(protocol, read):
    event = json.loads(error_event(protocol, 403, "model_not_allowed", "no"))
    expected = ("PERMISSION_DENIED", "model_not_allowed") if protocol == LIVE else (
        "error", "model_not_allowed"
    )
    assert read(event) == expected


@pytest.mark.parametrize(
    "protocol, read",
    [
        (RT, lambda e: e["error"]["limit_kind"]),
        (RESP, lambda e: e["limit_kind"]),
        (LIVE, lambda e: e["error"]["details"][0]["metadata"]["limit_kind"]),
    ],
)
def test_error_events_carry_the_denials_fields(protocol, read):
    fields = {"limit_kind": "output_tokens", "limit": 500, "retry_after_s": 60}
    event = json.loads(error_event(protocol, 429, "rate_limited", "slow down", fields))
    assert read(event) == "output_tokens"


@pytest.mark.parametrize(
    "protocol, frame, asks",
    [
        (RT, {"type": "response.create"}, True),
        (RT, {"type": "input_audio_buffer.append", "audio": "AA"}, False),
        (RT, {"type": "session.update", "session": {}}, False),
        (RESP, {"type": "response.create", "model": "gpt-5"}, True),
        (LIVE, {"clientContent": {"turns": [], "turnComplete": True}}, True),
        (LIVE, {"client_content": {"turns": [], "turn_complete": True}}, True),
        (LIVE, {"clientContent": {"turns": []}}, False),  # Live waits for more
        (LIVE, {"toolResponse": {"functionResponses": []}}, True),
        (LIVE, {"realtimeInput": {"audio": {"data": "AA"}}}, False),  # answered on its own
        (LIVE, {"setup": {"model": "models/x"}}, False),
    ],
)
def test_frames_that_ask_for_work(protocol, frame, asks):
    assert asks_for_work(protocol, frame) is asks
