"""The operation catalogue, table by table: every operation's plan, and its answers read for tokens."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from candela_mitm.config import PROVIDER_ROUTES, parse_config
from candela_mitm.errors import ConfigError, Denial
from candela_mitm.providers.catalogue import CATALOGUE, find, parse_allowed
from candela_mitm.providers.forwarding import ForwardPlan, plan_provider_request
from candela_mitm.providers.specs import resolve_all
from candela_mitm.providers.streaming import Unmetered, make_processor
from candela_mitm.providers.usage import Usage
from tests.fakes import upstream as fake_upstream

CFG = parse_config(
    {
        "providers": {
            "anthropic": {"project": "proj", "region": "us-east5"},
            "anthropic-vertex": {"project": "proj", "region": "us-east5"},
        }
    }
)
UP = resolve_all(CFG)
V = "/v1/projects/proj/locations/us-east5/publishers"
GEN = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
MSG = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def plan(route: str, method: str, rest: str, body: Any = None, **kw: Any) -> ForwardPlan | Denial:
    return plan_provider_request(UP[route], method, rest, body, **kw)


# Every operation of every table: (route, method, path as sent, body) -> operation, where the
# model came from, the reader of its answer, whether it streams, how it is billed, and the most
# output its estimate reserves (None: the request's own or the default; 0: prompt only).
# fmt: off
ROWS: list[tuple[str, str, str, Any, str, str | None, str | None, bool, str, int | None]] = [
    # route, method, path, body,                                        operation, model, reader, stream, billing, max_out
    ("openai", "POST", "/v1/chat/completions", {"model": "gpt-4o", **CHAT}, "chat.completions", "gpt-4o", "openai", False, "metered", None),
    ("openai", "POST", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "max_tokens": 9}, "chat.completions", "gpt-4o", "openai", True, "metered", 9),
    ("openai", "POST", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x"}, "completions", "gpt-3.5-turbo-instruct", "openai", False, "metered", None),
    ("openai", "POST", "/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True}, "responses", "gpt-4o", "openai", True, "metered", None),
    ("openai", "POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}, "embeddings", "text-embedding-3-small", "openai", False, "metered", 0),
    ("openai", "POST", "/v1/images/generations", {"model": "gpt-image-1", "prompt": "a cat"}, "images.generations", "gpt-image-1", "openai", False, "metered", None),
    ("openai", "POST", "/v1/audio/speech", {"model": "tts-1", "input": "hello", "voice": "alloy"}, "audio.speech", "tts-1", None, False, "metered", None),
    ("openai", "POST", "/v1/moderations", {"input": "x"}, "moderations", None, None, False, "free", None),
    ("openai", "GET", "/v1/models", None, "models.list", None, None, False, "free", None),
    ("openai", "GET", "/v1/models/gpt-4o", None, "models.get", "gpt-4o", None, False, "free", None),
    ("anthropic-direct", "POST", "/v1/messages", {"model": "claude-sonnet-4-20250514", **MSG}, "messages", "claude-sonnet-4-20250514", "anthropic", False, "metered", 50),
    ("anthropic-direct", "POST", "/v1/messages", {"model": "claude-sonnet-4-20250514", "stream": True, **MSG}, "messages", "claude-sonnet-4-20250514", "anthropic", True, "metered", 50),
    ("anthropic-direct", "POST", "/v1/messages/count_tokens", {"model": "claude-sonnet-4-20250514", **MSG}, "messages.count_tokens", "claude-sonnet-4-20250514", None, False, "free", None),
    ("anthropic-direct", "POST", "/v1/chat/completions", {"model": "claude-sonnet-4-20250514", **CHAT}, "openai_compat.chat.completions", "claude-sonnet-4-20250514", "openai", False, "metered", None),
    ("anthropic-direct", "GET", "/v1/models", None, "models.list", None, None, False, "free", None),
    ("anthropic-direct", "GET", "/v1/models/claude-sonnet-4-20250514", None, "models.get", "claude-sonnet-4-20250514", None, False, "free", None),
    ("anthropic", "POST", "/v1/chat/completions", {"model": "claude-sonnet-4-20250514", **CHAT}, "chat.completions", "claude-sonnet-4-20250514", "anthropic", False, "metered", 4096),
    ("anthropic", "POST", "/chat/completions", {"model": "claude-sonnet-4-20250514", "stream": True, **CHAT}, "chat.completions", "claude-sonnet-4-20250514", "anthropic", True, "metered", 4096),
    ("google", "POST", "/v1beta/models/gemini-2.5-flash:generateContent", GEN, "generateContent", "gemini-2.5-flash", "gemini", False, "metered", None),
    ("google", "POST", "/v1/models/gemini-2.5-flash:generateContent", {**GEN, "generationConfig": {"maxOutputTokens": 33}}, "generateContent", "gemini-2.5-flash", "gemini", False, "metered", 33),
    ("google", "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GEN, "streamGenerateContent", "gemini-2.5-flash", "gemini", True, "metered", None),
    ("google", "POST", "/v1/models/gemini-2.5-flash:streamGenerateContent", GEN, "streamGenerateContent", "gemini-2.5-flash", "gemini", True, "metered", None),
    ("google", "POST", "/v1beta/models/gemini-2.5-flash:countTokens", GEN, "countTokens", "gemini-2.5-flash", None, False, "free", None),
    ("google", "POST", "/v1/models/gemini-2.5-flash:countTokens", GEN, "countTokens", "gemini-2.5-flash", None, False, "free", None),
    ("google", "POST", "/v1beta/models/text-embedding-004:embedContent", {"content": {"parts": [{"text": "x"}]}}, "embedContent", "text-embedding-004", None, False, "metered", 0),
    ("google", "POST", "/v1/models/text-embedding-004:embedContent", {"content": {"parts": [{"text": "x"}]}}, "embedContent", "text-embedding-004", None, False, "metered", 0),
    ("google", "POST", "/v1beta/models/text-embedding-004:batchEmbedContents", {"requests": []}, "batchEmbedContents", "text-embedding-004", None, False, "metered", 0),
    ("google", "POST", "/v1/models/text-embedding-004:batchEmbedContents", {"requests": []}, "batchEmbedContents", "text-embedding-004", None, False, "metered", 0),
    ("google", "GET", "/v1beta/models", None, "models.list", None, None, False, "free", None),
    ("google", "GET", "/v1/models", None, "models.list", None, None, False, "free", None),
    ("google", "GET", "/v1beta/models/gemini-2.5-flash", None, "models.get", "gemini-2.5-flash", None, False, "free", None),
    ("google", "GET", "/v1/models/gemini-2.5-flash", None, "models.get", "gemini-2.5-flash", None, False, "free", None),
    ("gemini-oai", "POST", "/chat/completions", {"model": "gemini-2.5-flash", **CHAT}, "chat.completions", "gemini-2.5-flash", "openai", False, "metered", None),
    ("gemini-oai", "POST", "/embeddings", {"model": "text-embedding-004", "input": "x"}, "embeddings", "text-embedding-004", "openai", False, "metered", 0),
    ("gemini-oai", "GET", "/models", None, "models.list", None, None, False, "free", None),
    ("gemini-oai", "GET", "/models/gemini-2.5-flash", None, "models.get", "gemini-2.5-flash", None, False, "free", None),
    ("anthropic-vertex", "POST", f"{V}/anthropic/models/count-tokens:rawPredict", {"model": "claude-sonnet-4@20250514", **MSG}, "claude.countTokens", "claude-sonnet-4@20250514", None, False, "free", None),
    ("anthropic-vertex", "POST", f"{V}/anthropic/models/claude-sonnet-4@20250514:rawPredict", MSG, "claude.rawPredict", "claude-sonnet-4@20250514", "anthropic", False, "metered", 50),
    ("anthropic-vertex", "POST", f"{V}/anthropic/models/claude-sonnet-4@20250514:streamRawPredict", MSG, "claude.streamRawPredict", "claude-sonnet-4@20250514", "anthropic", True, "metered", 50),
    ("anthropic-vertex", "POST", f"{V}/google/models/gemini-2.5-flash:generateContent", GEN, "gemini.generateContent", "gemini-2.5-flash", "gemini", False, "metered", None),
    ("anthropic-vertex", "POST", f"{V}/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GEN, "gemini.streamGenerateContent", "gemini-2.5-flash", "gemini", True, "metered", None),
    ("anthropic-vertex", "POST", f"{V}/google/models/gemini-2.5-flash:countTokens", GEN, "gemini.countTokens", "gemini-2.5-flash", None, False, "free", None),
    ("anthropic-vertex", "POST", "/v1beta1/projects/proj/locations/us-east5/publishers/google/models/gemini-2.5-flash:generateContent", GEN, "gemini.generateContent", "gemini-2.5-flash", "gemini", False, "metered", None),
    ("anthropic-vertex", "POST", "/v1beta1/projects/proj/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict", MSG, "claude.rawPredict", "claude-sonnet-4@20250514", "anthropic", False, "metered", 50),
    ("anthropic-vertex", "POST", "/v1beta1/projects/proj/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict", MSG, "claude.streamRawPredict", "claude-sonnet-4@20250514", "anthropic", True, "metered", 50),
    ("anthropic-vertex", "POST", "/v1beta1/projects/proj/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict", {"model": "claude-sonnet-4@20250514", **MSG}, "claude.countTokens", "claude-sonnet-4@20250514", None, False, "free", None),
    ("anthropic-vertex", "POST", "/v1beta1/projects/proj/locations/us-east5/publishers/google/models/gemini-2.5-flash:streamGenerateContent", GEN, "gemini.streamGenerateContent", "gemini-2.5-flash", "gemini", True, "metered", None),
    ("anthropic-vertex", "POST", "/v1beta1/projects/proj/locations/us-east5/publishers/google/models/gemini-2.5-flash:countTokens", GEN, "gemini.countTokens", "gemini-2.5-flash", None, False, "free", None),
    ("anthropic-bedrock", "POST", "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/invoke", {"max_tokens": 20, **CHAT}, "InvokeModel", "anthropic.claude-sonnet-4-20250514-v1:0", "bedrock", False, "metered", 20),
    ("anthropic-bedrock", "POST", "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/invoke-with-response-stream", {"max_tokens": 20, **CHAT}, "InvokeModelWithResponseStream", "anthropic.claude-sonnet-4-20250514-v1:0", "bedrock", True, "metered", 20),
    ("anthropic-bedrock", "POST", "/model/us.anthropic.claude-sonnet-4-20250514-v1:0/converse", {"messages": []}, "Converse", "us.anthropic.claude-sonnet-4-20250514-v1:0", "bedrock", False, "metered", None),
    ("anthropic-bedrock", "POST", "/model/us.anthropic.claude-sonnet-4-20250514-v1:0/converse", {"messages": [], "inferenceConfig": {"maxTokens": 77}}, "Converse", "us.anthropic.claude-sonnet-4-20250514-v1:0", "bedrock", False, "metered", 77),
    ("anthropic-bedrock", "POST", "/model/us.anthropic.claude-sonnet-4-20250514-v1:0/converse-stream", {"messages": []}, "ConverseStream", "us.anthropic.claude-sonnet-4-20250514-v1:0", "bedrock", True, "metered", None),
    ("anthropic-bedrock", "POST", "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/count-tokens", {"input": {}}, "CountTokens", "anthropic.claude-sonnet-4-20250514-v1:0", None, False, "free", None),
    # Bedrock Mantle: the OpenAI wire format, under /v1 or /openai/v1 as the model is served
    ("bedrock-mantle", "POST", "/v1/chat/completions", {"model": "openai.gpt-oss-120b", "max_tokens": 30, **CHAT}, "chat.completions", "openai.gpt-oss-120b", "openai", False, "metered", 30),
    ("bedrock-mantle", "POST", "/openai/v1/chat/completions", {"model": "openai.gpt-oss-20b", "stream": True, "max_tokens": 30, **CHAT}, "chat.completions", "openai.gpt-oss-20b", "openai", True, "metered", 30),
    ("bedrock-mantle", "POST", "/v1/responses", {"model": "openai.gpt-oss-120b", "input": "hi", "max_output_tokens": 40}, "responses", "openai.gpt-oss-120b", "openai", False, "metered", 40),
    ("bedrock-mantle", "GET", "/v1/models", None, "models.list", None, None, False, "free", None),
    ("bedrock-mantle", "GET", "/openai/v1/models/openai.gpt-oss-120b", None, "models.get", "openai.gpt-oss-120b", None, False, "free", None),
    ("ollama", "POST", "/api/chat", {"model": "llama3.2:3b", **CHAT}, "chat", "llama3.2:3b", "ollama", True, "metered", None),
    ("ollama", "POST", "/api/generate", {"model": "llama3.2:3b", "prompt": "x", "stream": False}, "generate", "llama3.2:3b", "ollama", False, "metered", None),
    ("ollama", "POST", "/api/embed", {"model": "all-minilm", "input": "x"}, "embed", "all-minilm", "ollama", False, "metered", 0),
    ("ollama", "POST", "/api/embeddings", {"model": "all-minilm", "prompt": "x"}, "embeddings", "all-minilm", None, False, "metered", 0),
    ("ollama", "POST", "/api/show", {"model": "llama3.2:3b"}, "show", "llama3.2:3b", None, False, "free", None),
    ("ollama", "GET", "/api/tags", None, "tags", None, None, False, "free", None),
    ("ollama", "GET", "/api/ps", None, "ps", None, None, False, "free", None),
    ("ollama", "GET", "/api/version", None, "version", None, None, False, "free", None),
    ("ollama", "POST", "/v1/chat/completions", {"model": "llama3.2:3b", **CHAT}, "chat.completions", "llama3.2:3b", "openai", False, "metered", None),
    ("ollama", "POST", "/v1/completions", {"model": "llama3.2:3b", "prompt": "x"}, "completions", "llama3.2:3b", "openai", False, "metered", None),
    ("ollama", "POST", "/v1/embeddings", {"model": "all-minilm", "input": "x"}, "embeddings.openai", "all-minilm", "openai", False, "metered", 0),
    ("ollama", "GET", "/v1/models", None, "models.list", None, None, False, "free", None),
    ("ollama", "GET", "/v1/models/llama3.2:3b", None, "models.get", "llama3.2:3b", None, False, "free", None),
    ("lmstudio", "POST", "/v1/chat/completions", {"model": "qwen", "stream": True}, "chat.completions", "qwen", "openai", True, "metered", None),
    ("lmstudio", "POST", "/v1/completions", {"model": "qwen", "prompt": "x"}, "completions", "qwen", "openai", False, "metered", None),
    ("lmstudio", "POST", "/v1/responses", {"model": "qwen", "input": "x"}, "responses", "qwen", "openai", False, "metered", None),
    ("lmstudio", "POST", "/v1/embeddings", {"model": "nomic", "input": "x"}, "embeddings", "nomic", "openai", False, "metered", 0),
    ("lmstudio", "GET", "/v1/models", None, "models.list", None, None, False, "free", None),
    ("lmstudio", "GET", "/v1/models/qwen", None, "models.get", "qwen", None, False, "free", None),
    ("lmstudio", "GET", "/api/v0/models", None, "models.list.native", None, None, False, "free", None),
    ("lmstudio", "GET", "/api/v0/models/qwen", None, "models.get.native", "qwen", None, False, "free", None),
]
# fmt: on


def test_every_route_has_a_table():
    assert set(CATALOGUE) == set(PROVIDER_ROUTES)


def test_every_forwarded_operation_has_a_row_here():
    """A new operation in a table needs its row above (and its answer below, if metered)."""
    covered = {(r[0], r[4]) for r in ROWS}
    forwarded = {
        (route, op.name)
        for route, ops in CATALOGUE.items()
        for op in ops
        if op.billing in ("metered", "free")
    }
    assert forwarded - covered == set()


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r[0]}:{r[1]} {r[2][:70]}")
def test_plan_follows_the_operation(row):
    route, method, path, body, name, model, reader, stream, billing, max_out = row
    p = plan(route, method, path, body)
    assert isinstance(p, ForwardPlan), p
    assert p.operation.name == name and p.operation.billing == billing
    assert p.model == model
    assert p.response_wire == reader if billing == "metered" else p.response_wire is None
    assert p.stream is stream
    assert p.metered is (billing == "metered")
    assert p.charge_reservation is (billing == "metered" and reader is None)
    if billing == "metered":
        assert p.max_output_tokens == max_out
    else:
        assert isinstance(make_processor(p, 200, "application/json", {}), Unmetered)


# ---------------------------------------------------------------------------------------------
# Answers: each metered operation's answer, as the fake upstream writes it (tests/fakes/upstream/,
# the providers' documented wire formats) or as the provider documents it, read for tokens.

FAKE = fake_upstream.FakeUpstream(openai_key=None, anthropic_key=None, gemini_key=None)
FAKE_USAGE = Usage(12, 7, 0)  # the fake's default usage


def _fake_answer(p: ForwardPlan, method: str, body: Any) -> tuple[int, str, bytes, dict[str, str]]:
    """The fake's answer to the planned request, from its route handler (its auth is not at test)."""
    target = p.upstream.base_path + p.path
    parts = urlsplit(target)
    headers = {"anthropic-version": "2023-06-01"} if p.response_wire == "anthropic" else {}
    found = fake_upstream._match(method, parts.path, headers, parse_qs(parts.query))
    assert found is not None, f"the fake serves no {method} {target}"
    _name, _family, _auth, handler, params = found
    sent = p.body if p.body is not None else body
    raw = json.dumps(sent).encode()
    rec = fake_upstream.Recorded(method, target, headers, raw, sent, 0.0, 0)
    reply = handler(FAKE, fake_upstream._Ctx(rec, FAKE._knobs(), params))
    data = reply.body if reply.chunks is None else b"".join(reply.chunks)
    hdrs = {k.lower(): v for k, v in reply.headers}
    return reply.status, hdrs.get("content-type", ""), data, hdrs


# documented answers the fake does not produce: (content type, body)
OPENAI_COMPLETION = json.dumps(
    {
        "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
        "object": "text_completion",
        "created": 1589478378,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
).encode()
OPENAI_IMAGE = json.dumps(
    {
        "created": 1713833628,
        "data": [{"b64_json": "aGVsbG8="}],
        "usage": {
            "total_tokens": 100,
            "input_tokens": 50,
            "output_tokens": 50,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
        },
    }
).encode()
GEMINI_EMBEDDING = json.dumps({"embedding": {"values": [0.013, -0.008, 0.021]}}).encode()
GEMINI_BATCH_EMBEDDING = json.dumps({"embeddings": [{"values": [0.1]}, {"values": [0.2]}]}).encode()
OLLAMA_EMBED = json.dumps(
    {
        "model": "all-minilm",
        "embeddings": [[0.010071029, -0.0017594862]],
        "total_duration": 14143917,
        "load_duration": 1019500,
        "prompt_eval_count": 8,
    }
).encode()
OLLAMA_LEGACY_EMBEDDING = json.dumps({"embedding": [0.5670403838157654, 0.009260174818336964]}).encode()
OPENAI_COMPLETION_STREAM = (
    b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":"Hi","index":0,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct"}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","choices":[],"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}\n\n'
    b"data: [DONE]\n\n"
)
JSON = "application/json"

# (row key: route, method, path) -> (content type, body) when the fake does not answer it;
# expected usage (None: the answer carries none, and the plan is charged its reservation)
# fmt: off
ANSWERS: list[tuple[str, str, str, Any, tuple[str, bytes] | None, Usage | None]] = [
    ("openai", "POST", "/v1/chat/completions", {"model": "gpt-4o", **CHAT}, None, FAKE_USAGE),
    ("openai", "POST", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, **CHAT}, None, FAKE_USAGE),
    ("openai", "POST", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x"}, (JSON, OPENAI_COMPLETION), Usage(5, 7, 0)),
    ("openai", "POST", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream": True}, ("text/event-stream", OPENAI_COMPLETION_STREAM), Usage(5, 7, 0)),
    ("openai", "POST", "/v1/responses", {"model": "gpt-4o", "input": "hi"}, None, FAKE_USAGE),
    ("openai", "POST", "/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True}, None, FAKE_USAGE),
    ("bedrock-mantle", "POST", "/v1/chat/completions", {"model": "openai.gpt-oss-120b", **CHAT}, None, FAKE_USAGE),
    ("bedrock-mantle", "POST", "/v1/chat/completions", {"model": "openai.gpt-oss-120b", "stream": True, **CHAT}, None, FAKE_USAGE),
    ("bedrock-mantle", "POST", "/v1/responses", {"model": "openai.gpt-oss-120b", "input": "hi"}, None, FAKE_USAGE),
    ("openai", "POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}, None, Usage(12, 0, 0)),
    ("openai", "POST", "/v1/images/generations", {"model": "gpt-image-1", "prompt": "a cat"}, (JSON, OPENAI_IMAGE), Usage(50, 50, 0)),
    ("openai", "POST", "/v1/audio/speech", {"model": "tts-1", "input": "hello", "voice": "alloy"}, ("audio/mpeg", b"ID3\x04\x00\x00\x00\x00\x00"), None),
    ("anthropic-direct", "POST", "/v1/messages", {"model": "claude-sonnet-4-20250514", **MSG}, None, FAKE_USAGE),
    ("anthropic-direct", "POST", "/v1/messages", {"model": "claude-sonnet-4-20250514", "stream": True, **MSG}, None, FAKE_USAGE),
    ("anthropic-direct", "POST", "/v1/chat/completions", {"model": "claude-sonnet-4-20250514", **CHAT}, None, FAKE_USAGE),
    ("anthropic-direct", "POST", "/v1/chat/completions", {"model": "claude-sonnet-4-20250514", "stream": True, **CHAT}, None, FAKE_USAGE),
    ("anthropic", "POST", "/v1/chat/completions", {"model": "claude-sonnet-4-20250514", **CHAT}, None, FAKE_USAGE),
    ("anthropic", "POST", "/v1/chat/completions", {"model": "claude-sonnet-4-20250514", "stream": True, **CHAT}, None, FAKE_USAGE),
    ("google", "POST", "/v1beta/models/gemini-2.5-flash:generateContent", GEN, None, FAKE_USAGE),
    ("google", "POST", "/v1/models/gemini-2.5-flash:generateContent", GEN, None, FAKE_USAGE),
    ("google", "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GEN, None, FAKE_USAGE),
    ("google", "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", GEN, None, FAKE_USAGE),  # JSON array
    ("google", "POST", "/v1beta/models/text-embedding-004:embedContent", {"content": {}}, (JSON, GEMINI_EMBEDDING), None),
    ("google", "POST", "/v1beta/models/text-embedding-004:batchEmbedContents", {"requests": []}, (JSON, GEMINI_BATCH_EMBEDDING), None),
    ("gemini-oai", "POST", "/chat/completions", {"model": "gemini-2.5-flash", **CHAT}, None, FAKE_USAGE),
    ("gemini-oai", "POST", "/chat/completions", {"model": "gemini-2.5-flash", "stream": True, **CHAT}, None, FAKE_USAGE),
    ("gemini-oai", "POST", "/embeddings", {"model": "text-embedding-004", "input": "x"}, None, Usage(12, 0, 0)),
    ("anthropic-vertex", "POST", f"{V}/anthropic/models/claude-sonnet-4@20250514:rawPredict", {**MSG, "anthropic_version": "vertex-2023-10-16"}, None, FAKE_USAGE),
    ("anthropic-vertex", "POST", f"{V}/anthropic/models/claude-sonnet-4@20250514:streamRawPredict", {**MSG, "stream": True, "anthropic_version": "vertex-2023-10-16"}, None, FAKE_USAGE),
    ("anthropic-vertex", "POST", f"{V}/google/models/gemini-2.5-flash:generateContent", GEN, None, FAKE_USAGE),
    ("anthropic-vertex", "POST", f"{V}/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GEN, None, FAKE_USAGE),
    ("anthropic-vertex", "POST", f"{V}/google/models/gemini-2.5-flash:streamGenerateContent", GEN, None, FAKE_USAGE),
    ("anthropic-bedrock", "POST", "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/invoke", {"max_tokens": 20, "anthropic_version": "bedrock-2023-05-31", **CHAT}, None, FAKE_USAGE),
    ("anthropic-bedrock", "POST", "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/invoke-with-response-stream", {"max_tokens": 20, "anthropic_version": "bedrock-2023-05-31", **CHAT}, None, FAKE_USAGE),
    ("anthropic-bedrock", "POST", "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/converse", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, None, FAKE_USAGE),
    ("anthropic-bedrock", "POST", "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/converse-stream", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, None, FAKE_USAGE),
    ("ollama", "POST", "/api/chat", {"model": "llama3.2:3b", **CHAT}, None, FAKE_USAGE),
    ("ollama", "POST", "/api/generate", {"model": "llama3.2:3b", "prompt": "x", "stream": False}, None, FAKE_USAGE),
    ("ollama", "POST", "/api/embed", {"model": "all-minilm", "input": "x"}, (JSON, OLLAMA_EMBED), Usage(8, 0, 0)),
    ("ollama", "POST", "/api/embeddings", {"model": "all-minilm", "prompt": "x"}, (JSON, OLLAMA_LEGACY_EMBEDDING), None),
    ("ollama", "POST", "/v1/chat/completions", {"model": "llama3.2:3b", **CHAT}, None, FAKE_USAGE),
    ("ollama", "POST", "/v1/completions", {"model": "llama3.2:3b", "prompt": "x"}, (JSON, OPENAI_COMPLETION), Usage(5, 7, 0)),
    ("ollama", "POST", "/v1/embeddings", {"model": "all-minilm", "input": "x"}, None, Usage(12, 0, 0)),
    ("lmstudio", "POST", "/v1/chat/completions", {"model": "qwen", "stream": True, **CHAT}, None, FAKE_USAGE),
    ("lmstudio", "POST", "/v1/completions", {"model": "qwen", "prompt": "x"}, (JSON, OPENAI_COMPLETION), Usage(5, 7, 0)),
    ("lmstudio", "POST", "/v1/responses", {"model": "qwen", "input": "x"}, None, FAKE_USAGE),
    ("lmstudio", "POST", "/v1/embeddings", {"model": "nomic", "input": "x"}, None, Usage(12, 0, 0)),
]
# fmt: on


def test_every_metered_operation_has_an_answer_read_here():
    answered = {(a[0], plan(a[0], a[1], a[2], a[3]).operation.name) for a in ANSWERS}
    metered = {
        (route, op.name) for route, ops in CATALOGUE.items() for op in ops if op.billing == "metered"
    }
    assert metered - answered == set()


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: f"{a[0]} {a[2][:60]} {json.dumps(a[3])[:30]}")
def test_answer_is_read_by_the_operations_reader(answer):
    route, method, path, body, recorded, expected = answer
    p = plan(route, method, path, body)
    assert isinstance(p, ForwardPlan), p
    if recorded is None:
        status, ctype, data, headers = _fake_answer(p, method, body)
        assert status == 200, data[:300]
    else:
        status, (ctype, data), headers = 200, recorded, {"content-type": recorded[0]}
    proc = make_processor(p, status, ctype, headers)
    for i in range(0, len(data), 37):  # in pieces, as a stream arrives
        proc.feed(data[i : i + 37])
    proc.finish()
    if expected is None:
        assert proc.usage == Usage() and p.charge_reservation
    else:
        assert proc.usage == expected
        assert not p.charge_reservation


def test_gemini_on_vertex_is_read_by_the_gemini_reader_not_the_routes():
    p = plan("anthropic-vertex", "POST", f"{V}/google/models/gemini-2.5-pro:generateContent", GEN)
    assert isinstance(p, ForwardPlan) and p.response_wire == "gemini" and p.metered


# ---------------------------------------------------------------------------------------------
# Refused: not in the table, refused by name, async by default, a project not the route's


@pytest.mark.parametrize(
    "route, method, path, body, reason_part",
    [
        ("openai", "GET", "/v1/files", None, "other users"),
        ("openai", "GET", "/v1/files/file-abc/content", None, "async_jobs: reserve"),
        ("openai", "GET", "/v1/files/file-abc", None, "other users"),
        ("openai", "GET", "/v1/batches", None, "other users"),
        ("openai", "GET", "/v1/batches/batch_1", None, "async_jobs: reserve"),
        ("openai", "GET", "/v1/batches", None, "other users"),
        ("openai", "GET", "/v1/chat/completions", None, "other users"),
        ("openai", "GET", "/v1/chat/completions/chatcmpl-1/messages", None, "other users"),
        ("openai", "GET", "/v1/responses/resp_1", None, "async_jobs: reserve"),
        ("openai", "GET", "/v1/responses/resp_1/input_items", None, "other users"),
        # a WebSocket operation without the upgrade: no HTTP row answers it
        ("openai", "GET", "/v1/realtime?model=gpt-4o-realtime-preview", None, None),
        ("openai", "DELETE", "/v1/files/file-abc", {"model": "gpt-4o"}, None),
        ("openai", "POST", "/v1/files", {"model": "gpt-4o"}, None),  # a dummy model unlocks nothing
        ("openai", "POST", "/v1/fine_tuning/jobs", {"model": "gpt-4o-mini"}, None),
        ("openai", "PUT", "/v1/chat/completions", {"model": "gpt-4o"}, None),
        ("openai", "POST", "/v1/responses", {"model": "gpt-4o", "background": True}, "async"),
        ("openai", "POST", "/v1/batches", {"input_file_id": "f", "endpoint": "/v1/chat/completions"}, "async"),
        ("openai", "POST", "/v1/threads/thread_1/runs", {"assistant_id": "a"}, "async"),
        ("openai", "POST", "/v1/threads/runs", {"assistant_id": "a"}, "async"),
        ("google", "POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", {"batch": {}}, "async"),
        ("google", "GET", "/v1beta/batches/b1", None, "async_jobs: reserve"),
        ("google", "GET", "/v1beta/batches", None, "other users"),
        ("google", "GET", "/v1beta/files", None, "other users"),
        ("google", "GET", "/v1beta/cachedContents/c1", None, "other users"),
        ("google", "POST", "/v1beta/tunedModels/x:generateContent", GEN, None),
        ("anthropic-direct", "POST", "/v1/messages/batches", {"requests": []}, "async"),
        ("anthropic-direct", "GET", "/v1/messages/batches/msgbatch_1/results", None, "async_jobs: reserve"),
        ("anthropic-direct", "GET", "/v1/messages/batches", None, "other users"),
        ("anthropic-direct", "GET", "/v1/files", None, "other users"),
        ("anthropic-direct", "GET", "/api/claude_code/organizations/metrics_enabled", None, "organisation"),
        ("anthropic-direct", "GET", "/api/claude_code/settings", None, "organisation"),
        ("anthropic-direct", "POST", "/v1/complete", {"model": "claude-2"}, None),
        ("anthropic", "GET", "/v1/models", None, None),
        ("anthropic-vertex", "GET", "/v1/projects/proj/locations/us-east5/publishers/google/models", None, None),
        ("anthropic-vertex", "GET", "/v1/projects/proj/locations/us-east5/batchPredictionJobs", None, None),
        ("anthropic-vertex", "POST", "/v1/projects/other/locations/us-east5/publishers/google/models/gemini-2.5-flash:generateContent", GEN, "project 'other'"),
        ("anthropic-vertex", "POST", f"{V}/google/models/gemini-2.5-flash:batchGenerateContent", GEN, "async"),
        ("anthropic-vertex", "POST", "/v2/projects/proj/locations/us-east5/publishers/google/models/gemini-2.5-flash:generateContent", GEN, None),
        ("anthropic-bedrock", "POST", "/model-invocation-job", {"modelId": "x"}, None),
        ("anthropic-bedrock", "GET", "/model/anthropic.claude-v2/invoke", None, None),
        ("ollama", "POST", "/api/pull", {"model": "llama3.2:3b"}, None),
        ("ollama", "POST", "/api/create", {"model": "x", "from": "llama3.2"}, None),
        ("ollama", "DELETE", "/api/delete", {"model": "llama3.2:3b"}, None),
        ("ollama", "POST", "/api/copy", {"source": "a", "destination": "b"}, None),
        ("ollama", "POST", "/api/push", {"model": "a"}, None),
        ("lmstudio", "POST", "/api/v0/models/load", {"model": "qwen"}, None),
    ],
)
def test_refused_with_endpoint_not_governed(route, method, path, body, reason_part):
    p = plan(route, method, path, body)
    assert isinstance(p, Denial) and p.status == 404 and p.error == "endpoint_not_governed"
    assert p.fields["method"] == method and p.fields["path"] == path.split("?", 1)[0]
    assert p.fields["provider"] == route
    if reason_part:
        assert reason_part in p.fields["reason"]


def test_async_jobs_reserve_forwards_them_charged_at_their_reservation():
    body = {"model": "gpt-4o", "input": "hi", "background": True}
    p = plan("openai", "POST", "/v1/responses", body, async_jobs="reserve")
    assert isinstance(p, ForwardPlan) and p.operation.billing == "async"
    assert p.metered and p.charge_reservation and p.model == "gpt-4o"
    g = plan(
        "google",
        "POST",
        "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        {"batch": {"input_config": {"requests": {"requests": []}}}},
        async_jobs="reserve",
    )
    assert isinstance(g, ForwardPlan) and g.charge_reservation and g.model == "gemini-2.5-flash"
    # the same operation without the flag is an ordinary metered call
    q = plan("openai", "POST", "/v1/responses", {"model": "gpt-4o", "input": "hi"}, async_jobs="reserve")
    assert isinstance(q, ForwardPlan) and not q.charge_reservation


@pytest.mark.parametrize(
    "rest, name, job_id, kind",
    [
        ("/v1/responses/resp_abc", "responses.retrieve", "resp_abc", "openai.response"),
        ("/v1/threads/thread_1/runs/run_abc", "assistants.runs.retrieve", "run_abc", "openai.run"),
        ("google:/v1beta/batches/b_123", "batches.get", "b_123", "gemini.batch"),
        ("google:/v1/batches/b_123", "batches.get", "b_123", "gemini.batch"),
        ("anthropic-direct:/v1/messages/batches/msgbatch_1", "messages.batches.retrieve", "msgbatch_1", "anthropic.batch"),
        ("/v1/batches/batch_1", "batches.retrieve", "batch_1", "openai.batch"),
        ("/v1/files/file-out/content", "files.content", "file-out", "openai.batch"),
        ("anthropic-direct:/v1/messages/batches/msgbatch_1/results", "messages.batches.results", "msgbatch_1", "anthropic.batch"),
    ],
)
def test_a_jobs_result_is_read_only_under_reserve_unmetered_naming_the_job(rest, name, job_id, kind):
    route, _, rest = rest.rpartition(":")
    route = route or "openai"
    p = plan(route, "GET", rest, None, async_jobs="reserve")
    assert isinstance(p, ForwardPlan) and p.operation.name == name
    assert p.operation.billing == "job_result" and p.operation.job == kind
    assert p.job_id == job_id and not p.metered and p.model is None and p.response_wire is None
    d = plan(route, "GET", rest, None)  # async_jobs: refuse: no job is recorded to read
    assert isinstance(d, Denial) and d.error == "endpoint_not_governed"
    # what else hangs off a response stays refused: the row names the job only
    d = plan(route, "GET", rest + "/input_items", None, async_jobs="reserve")
    assert isinstance(d, Denial) and d.error == "endpoint_not_governed"


def test_every_job_creation_has_its_result_row():
    """A job Candela records can be read (and trued up) through Candela."""
    for route, ops in CATALOGUE.items():
        created = {op.job for op in ops if op.job and op.billing != "job_result"}
        read = {op.job for op in ops if op.billing == "job_result"}
        assert created == read, route


def test_an_openai_batch_and_its_input_file_are_planned_under_reserve_only():
    p = plan("openai", "POST", "/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"}, async_jobs="reserve")
    assert isinstance(p, ForwardPlan) and p.operation.billing == "async" and p.operation.model == "file"
    assert p.operation.job == "openai.batch" and p.model is None  # the file's models: addons/jobs.py
    u = plan("openai", "POST", "/v1/files", None, async_jobs="reserve")
    assert isinstance(u, ForwardPlan) and u.operation.billing == "batch_input" and not u.metered
    for path, body in (("/v1/batches", {"input_file_id": "f"}), ("/v1/files", None)):
        d = plan("openai", "POST", path, body)  # async_jobs: refuse
        assert isinstance(d, Denial) and d.error == "endpoint_not_governed"


def _batch(*models_and_max: tuple[str, object]) -> dict:
    return {"requests": [
        {"custom_id": f"r{i}", "params": {"model": m, "max_tokens": n,
                                          "messages": [{"role": "user", "content": "hi"}]}}
        for i, (m, n) in enumerate(models_and_max)
    ]}


def test_an_anthropic_batch_is_planned_with_every_requests_model():
    body = _batch(("claude-sonnet-4-5", 100), ("claude-haiku-4-5", 50), ("claude-sonnet-4-5", 10))
    p = plan("anthropic-direct", "POST", "/v1/messages/batches", body, async_jobs="reserve")
    assert isinstance(p, ForwardPlan) and p.operation.billing == "async"
    assert p.operation.job == "anthropic.batch" and p.model == "claude-sonnet-4-5"
    assert p.batch is not None and [m for m, _ in p.batch] == [
        "claude-sonnet-4-5", "claude-haiku-4-5", "claude-sonnet-4-5"]
    assert p.batch[1][1]["max_tokens"] == 50
    d = plan("anthropic-direct", "POST", "/v1/messages/batches", body)  # async_jobs: refuse
    assert isinstance(d, Denial) and d.error == "endpoint_not_governed"


@pytest.mark.parametrize(
    "body, why",
    [
        ({"requests": []}, "non-empty"),
        ({}, "non-empty"),
        ({"requests": [{"custom_id": "a"}]}, "requests[0].params.model"),
        (_batch(("claude-sonnet-4-5", 10), ("", 10)), "requests[1].params.model"),
        (_batch(("claude-sonnet-4-5", None)), "requests[0].params.max_tokens"),
        (_batch(("claude-sonnet-4-5", True)), "requests[0].params.max_tokens"),
        (_batch(("claude-sonnet-4-5", 0)), "requests[0].params.max_tokens"),
    ],
)
def test_an_anthropic_batch_needs_a_model_and_max_tokens_per_request(body, why):
    d = plan("anthropic-direct", "POST", "/v1/messages/batches", body, async_jobs="reserve")
    assert isinstance(d, Denial) and d.error == "bad_request" and why in d.message


def test_claude_codes_reachability_probe_is_answered_by_candela():
    p = plan("anthropic-direct", "HEAD", "/", None)
    assert isinstance(p, ForwardPlan) and p.operation.billing == "local" and not p.metered


# ---------------------------------------------------------------------------------------------
# Operator-allowed reads


def test_allowed_read_is_forwarded_unmetered_and_refused_rows_yield_to_it():
    allowed = ("GET /v1/files/{id}",)
    p = plan("openai", "GET", "/v1/files/file-abc", None, allowed=allowed)
    assert isinstance(p, ForwardPlan)
    assert p.operation.billing == "allowed" and p.operation.name == "allowed:GET /v1/files/{id}"
    assert not p.metered and p.model is None and p.response_wire is None
    # only what the entry names: the file's content, the listing and a POST stay refused
    for method, path in (("GET", "/v1/files/file-abc/content"), ("GET", "/v1/files"), ("POST", "/v1/files/x")):
        d = plan("openai", method, path, {"model": "gpt-4o"} if method == "POST" else None, allowed=allowed)
        assert isinstance(d, Denial) and d.error == "endpoint_not_governed"


def test_an_allow_entry_never_makes_a_metered_operation_free():
    f = find("openai", "GET", "/v1/models", ("GET /v1/{x}",))
    assert f is not None and f.operation.name == "models.list"
    f = find("openai", "POST", "/v1/chat/completions", ("GET /v1/chat/completions",))
    assert f is not None and f.operation.billing == "metered"


@pytest.mark.parametrize(
    "entry",
    ["POST /v1/files", "DELETE /v1/files/{id}", "GET v1/files", "GET /v1/files?x=1", "GET /v1/../admin", "GET /v1/%2e%2e/x", "GET", "GET /v1/{id}/{id}", "GET /v1/./x"],
)
def test_allow_entries_are_reads_with_a_plain_path(entry):
    with pytest.raises(ValueError):
        parse_allowed(entry)
    with pytest.raises(ConfigError, match=r"providers\.openai\.allow"):
        parse_config({"providers": {"openai": {"allow": [entry]}}})


def test_allow_and_async_jobs_in_config():
    cfg = parse_config(
        {"providers": {"openai": {"allow": ["GET /v1/files/{id}"]}}, "governance": {"async_jobs": "reserve"}}
    )
    assert cfg.providers["openai"].allow == ["GET /v1/files/{id}"]
    assert cfg.governance.async_jobs == "reserve"
    assert parse_config({}).governance.async_jobs == "refuse"
    with pytest.raises(ConfigError, match="async_jobs"):
        parse_config({"governance": {"async_jobs": "free"}})


# ---------------------------------------------------------------------------------------------
# The matcher


@pytest.mark.parametrize(
    "route, method, path, name, model",
    [
        ("google", "POST", "/v1beta/models/gemini-2.5-flash:generateContent", "generateContent", "gemini-2.5-flash"),
        ("google", "post", "/v1beta/models/gemini-2.5-flash:generateContent/", "generateContent", "gemini-2.5-flash"),
        # a colon cannot hide one Gemini method behind another
        ("google", "POST", "/v1beta/models/gemini-2.5-flash:generateContent:countTokens", None, None),
        ("google", "POST", "/v1beta/models/gemini%3AgenerateContent:countTokens", None, None),
        ("anthropic-bedrock", "POST", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", "Converse", "anthropic.claude-3-haiku-20240307-v1:0"),
        ("anthropic-bedrock", "POST", "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x/converse", None, None),
        ("openai", "GET", "/v1/models/", "models.list", None),
        ("openai", "POST", "/v1/models", None, None),
        ("openai", "POST", "/v1/chat/completions/extra", None, None),
        ("anthropic-vertex", "POST", f"{V}/anthropic/models/count-tokens:rawPredict", "claude.countTokens", None),
    ],
)
def test_matcher(route, method, path, name, model):
    f = find(route, method, path)
    if name is None:
        assert f is None or f.operation.billing == "refused"
    else:
        assert f is not None and f.operation.name == name and f.model == model


def test_google_routes_forward_without_shape_parameters():
    p = plan(
        "google",
        "POST",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&fields=candidates",
        GEN,
    )
    assert isinstance(p, ForwardPlan)
    assert p.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    p = plan("google", "POST", "/v1beta/models/gemini-2.5-flash:generateContent?alt=proto", GEN)
    assert isinstance(p, ForwardPlan) and p.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    # not Google: the query is the provider's own
    o = plan("openai", "GET", "/v1/models?fields=x", None)
    assert isinstance(o, ForwardPlan) and o.path == "/v1/models?fields=x"


def test_the_readme_lists_every_row():
    """The README's catalogue is the tables' own text: a row added here is documented there."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    missing = [
        (route, op.key)
        for route, ops in CATALOGUE.items()
        for op in ops
        # the README shows Gemini's /v1beta rows and Vertex's /v1 rows, naming the other version
        if not (route == "anthropic-vertex" and op.template.startswith("/v1beta1/"))
        if not (route == "google" and op.template.startswith("/v1/"))
        if f"| `{op.key}` | {op.name} |" not in readme
    ]
    assert missing == []


def test_no_forwarded_read_names_an_object_by_id():
    """Reads forwarded by default name at most a model: never a file, batch, response or job id,
    which the organisation's credential would read whoever created it."""
    import re

    for route, ops in CATALOGUE.items():
        for op in ops:
            if op.billing == "free" and op.method in ("GET", "HEAD"):
                assert set(re.findall(r"\{(\w+)\*?\}", op.template)) <= {"model"}, (route, op.key)


def test_every_metered_row_names_its_model():
    """A metered operation is priced by its model: a row that reads none could not be charged."""
    for route, ops in CATALOGUE.items():
        for op in ops:
            if op.billing == "metered":
                assert op.model in ("body", "path"), (route, op.key)


# ---------------------------------------------------------------------------------------------
# WebSocket sessions (issue 15): matched only by an upgrade, metered per frame


@pytest.mark.parametrize(
    "route, rest, operation, model, protocol",
    [
        ("openai", "/v1/realtime?model=gpt-realtime", "realtime", "gpt-realtime", "openai-realtime"),
        ("openai", "/v1/responses", "responses.websocket", None, "openai-responses"),
        ("google", "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key=k",
         "live.bidiGenerateContent", None, "gemini-live"),
        ("google", "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContent",
         "live.bidiGenerateContent", None, "gemini-live"),
        ("anthropic-vertex", "/ws/google.cloud.aiplatform.v1.LlmBidiService/BidiGenerateContent",
         "gemini.live.bidiGenerateContent", None, "gemini-live"),
    ],
)
def test_websocket_operations_are_planned_only_for_an_upgrade(route, rest, operation, model, protocol):
    p = plan(route, "GET", rest, None, websocket=True)
    assert isinstance(p, ForwardPlan), p
    assert p.operation.name == operation and p.model == model
    assert p.operation.protocol == protocol and p.session and not p.metered
    plain = plan(route, "GET", rest, None)  # the same target without Upgrade: not an operation
    assert isinstance(plain, Denial) and plain.error == "endpoint_not_governed"


@pytest.mark.parametrize(
    "route, rest",
    [
        ("openai", "/v1/models"),  # an HTTP row is never a WebSocket
        ("openai", "/v1/chat/completions"),
        ("google", "/ws/google.ai.generativelanguage.v1beta.GenerativeService.Other"),
    ],
)
def test_an_upgrade_matches_no_http_row(route, rest):
    p = plan(route, "GET", rest, None, websocket=True)
    assert isinstance(p, Denial) and p.error == "endpoint_not_governed"


@pytest.mark.parametrize("query", ["", "?model=", "?model=a&model=b"])
def test_realtime_needs_one_model_in_the_url(query):
    p = plan("openai", "GET", "/v1/realtime" + query, None, websocket=True)
    assert isinstance(p, Denial) and p.error == "bad_request"


@pytest.mark.parametrize(
    "route, method, path, allowed, websocket",
    [
        ("openai", "POST", "/v1/chat/completions", (), False),
        ("openai", "GET", "/v1/files/file-abc", (), False),
        ("openai", "GET", "/v1/files/file-abc", ("GET /v1/files/{id}",), False),
        ("openai", "GET", "/v1/realtime", (), True),
        ("google", "POST", "/v1beta/models/gemini-2.0-flash:generateContent", (), False),
        ("google", "POST", "/v1beta/models/gemini%2D2.0-flash:streamGenerateContent", (), False),
        ("openai", "DELETE", "/v1/nothing", (), False),
    ],
)
def test_find_kept_answers_as_the_walk_does(route, method, path, allowed, websocket):
    """find keeps its answers by everything they depend on (an allow entry added or removed is
    another answer), and each caller gets params of its own."""
    from candela_mitm.providers.catalogue import find_uncached

    expected = find_uncached(route, method, path, allowed, websocket=websocket)
    first = find(route, method, path, allowed, websocket=websocket)
    assert first == expected
    if first is not None:
        first.params["model"] = "tampered"
    assert find(route, method, path, allowed, websocket=websocket) == expected
    assert find(route, method, path, list(allowed), websocket=websocket) == expected


def test_find_follows_the_allow_entries():
    assert find("openai", "GET", "/v1/files/file-abc", ("GET /v1/files/{id}",)) is not None
    refused = find("openai", "GET", "/v1/files/file-abc", ())
    assert refused is None or refused.operation.billing == "refused"
