"""OTLP export: attributes, ids in the caller's trace, sampling, config and fail-open."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from candela_mitm.config import Telemetry, parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.observability.otel import (
    RequestFacts,
    ResponseFacts,
    StreamModel,
    TraceExport,
    attributes,
    enabled,
    operation_name,
    protocol_of,
    response_facts,
    traces_url,
)
from candela_mitm.observability.spans import Span
from tests.fakes.otlp import OtlpReceiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(**kw) -> Span:
    base = dict(
        span_id="a1b2c3d4e5f60718",
        trace_id=TRACE,
        parent_span_id="00f067aa0ba902b7",
        timestamp="2026-01-01T00:00:00.000Z",
        user="alice@example.com",
        tenant="research",
        provider="openai",
        model="gpt-4o-mini",
        input_tokens=10,
        output_tokens=5,
        cost_usd=0.0012,
        duration_ms=12.5,
        http_status=200,
    )
    base.update(kw)
    return Span(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "path", "op"),
    [
        ("chat", "/v1/chat/completions", "chat"),
        ("proxy", "/v1/chat/completions?x=1", "chat"),
        ("proxy", "/v1/completions", "text_completion"),
        ("proxy", "/v1/embeddings", "embeddings"),
        ("proxy", "/v1/responses", "chat"),
        ("proxy", "/v1/messages", "chat"),
        ("proxy", "/v1/models/gemini-2.0-flash:generateContent", "generate_content"),
        (
            "proxy",
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            "generate_content",
        ),
        ("proxy", "/v1/models/text-embedding-004:embedContent", "embeddings"),
        (
            "proxy",
            "/v1/projects/p/locations/l/publishers/anthropic/models/c:streamRawPredict",
            "chat",
        ),
        ("proxy", "/model/anthropic.claude/converse-stream", "chat"),
        ("proxy", "/model/anthropic.claude/invoke", "chat"),
        ("proxy", "/api/chat", "chat"),
        ("proxy", "/api/generate", "text_completion"),
        ("proxy", "/api/embed", "embeddings"),
        ("proxy", "/v1/models", None),
        ("proxy", "/api/tags", None),
    ],
)
def test_operation_name(kind, path, op):
    assert operation_name(kind, path) == op


@pytest.mark.parametrize(
    ("body", "facts"),
    [
        (
            {
                "id": "chatcmpl-1",
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"finish_reason": "stop"}],
                "usage": {"completion_tokens_details": {"reasoning_tokens": 7}},
            },
            ResponseFacts("gpt-4o-mini-2024-07-18", "chatcmpl-1", 7, ("stop",)),
        ),
        (
            {
                "id": "resp_1",
                "model": "o3",
                "usage": {"output_tokens_details": {"reasoning_tokens": 3}},
            },
            ResponseFacts("o3", "resp_1", 3, ()),
        ),
        (
            {"id": "msg_1", "model": "claude-sonnet-4", "stop_reason": "end_turn"},
            ResponseFacts("claude-sonnet-4", "msg_1", None, ("end_turn",)),
        ),
        (
            {
                "responseId": "r1",
                "modelVersion": "gemini-2.0-flash-001",
                "candidates": [{"finishReason": "STOP"}],
                "usageMetadata": {"thoughtsTokenCount": 12},
            },
            ResponseFacts("gemini-2.0-flash-001", "r1", 12, ("STOP",)),
        ),
        (
            {"model": "llama3.2", "done_reason": "stop"},
            ResponseFacts("llama3.2", None, None, ("stop",)),
        ),
        (
            {"model": 3, "usage": {"completion_tokens_details": {"reasoning_tokens": True}}},
            ResponseFacts(),
        ),
        ([1, 2], ResponseFacts()),
    ],
)
def test_response_facts(body, facts):
    assert response_facts(body) == facts


def test_attributes_of_an_allowed_request():
    a = attributes(
        span(cached_tokens=4, ttft_ms=3.21),
        RequestFacts(
            kind="proxy",
            path="/v1/chat/completions",
            route="anthropic-bedrock",
            server_address="bedrock.example",
            server_port=443,
            via="api_key",
        ),
        ResponseFacts(model="m-2", reasoning_tokens=2),
    )
    assert a == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "aws.bedrock",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "m-2",
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.usage.cache_read.input_tokens": 4,
        "gen_ai.usage.reasoning.output_tokens": 2,
        "server.address": "bedrock.example",
        "server.port": 443,
        "http.response.status_code": 200,
        "candela.user": "alice@example.com",
        "candela.tenant": "research",
        "candela.route": "anthropic-bedrock",
        "candela.auth": "api_key",
        "candela.cost_usd": 0.0012,
        "candela.decision": "allowed",
        "candela.stream": False,
        "candela.intercepted": False,
        "candela.ttft_ms": 3.21,
    }


def test_attributes_of_a_denial_and_of_an_error():
    denied = attributes(
        span(status="denied", error="budget_exceeded", http_status=402, input_tokens=0, cost_usd=0),
        RequestFacts(path="/v1/chat/completions", route="openai", decision="denied"),
        ResponseFacts(),
    )
    assert denied["candela.decision"] == "denied" and denied["candela.denial"] == "budget_exceeded"
    assert "gen_ai.usage.input_tokens" not in denied and "error.type" not in denied
    failed = attributes(
        span(status="error", error=None, http_status=502),
        RequestFacts(path="/v1/chat/completions", route="openai"),
        ResponseFacts(),
    )
    assert failed["error.type"] == "502" and "candela.denial" not in failed


def memory_export(**kw) -> tuple[TraceExport, InMemorySpanExporter]:
    mem = InMemorySpanExporter()
    return TraceExport(mem, **kw), mem


def test_span_keeps_candelas_ids_in_the_callers_trace():
    export, mem = memory_export()
    assert export.export(span(), RequestFacts(path="/v1/chat/completions", route="openai"))
    export.flush()
    [s] = mem.get_finished_spans()
    assert f"{s.context.trace_id:032x}" == TRACE
    assert f"{s.context.span_id:016x}" == "a1b2c3d4e5f60718"
    assert s.parent is not None and f"{s.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert s.name == "chat gpt-4o-mini"
    assert s.end_time - s.start_time == 12_500_000
    export.shutdown()


def test_root_span_when_no_traceparent_came_in():
    export, mem = memory_export()
    export.export(span(parent_span_id=None), RequestFacts(path="/v1/embeddings"))
    export.flush()
    [s] = mem.get_finished_spans()
    assert s.parent is None and f"{s.context.trace_id:032x}" == TRACE
    assert s.name == "embeddings gpt-4o-mini"


def test_sampling_follows_the_caller_then_the_ratio():
    export, mem = memory_export(sample_ratio=0.0)
    facts_called = []

    def facts() -> ResponseFacts:
        facts_called.append(1)
        return ResponseFacts()

    assert not export.export(span(), RequestFacts(), facts, trace_flags="00")
    assert not export.export(span(parent_span_id=None), RequestFacts(), facts)  # ratio 0
    assert export.export(span(), RequestFacts(), facts, trace_flags="01")  # caller sampled it
    export.flush()
    assert len(mem.get_finished_spans()) == 1 and facts_called == [1]


class _Broken(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("collector down")


def test_failed_exports_are_counted_not_raised():
    failures = []
    export = TraceExport(_Broken(), on_failure=lambda: failures.append(1))
    for _ in range(3):
        export.export(span(), RequestFacts())
    export.flush()
    assert failures  # one per failed batch
    export.shutdown()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_exports_to_a_real_otlp_receiver(protocol):
    with OtlpReceiver(protocol) as receiver:
        telemetry = parse_config(
            {"telemetry": {"otlp": {"endpoint": receiver.endpoint, "protocol": protocol}}}
        ).telemetry
        export = TraceExport.from_config(telemetry, "candela-test", env={})
        assert export is not None
        export.export(span(), RequestFacts(path="/v1/chat/completions", route="openai"))
        export.flush()
        [s] = receiver.wait_for(lambda s: s.span_id == "a1b2c3d4e5f60718")
        export.shutdown()
    assert s.attributes["gen_ai.usage.output_tokens"] == 5
    assert s.resource["service.name"] == "candela-test"


def test_config_is_strict():
    cfg = parse_config({"telemetry": {"otlp": {"endpoint": "http://c:4318", "sample_ratio": 0.5}}})
    assert cfg.telemetry.otlp is not None and cfg.telemetry.otlp.sample_ratio == 0.5
    with pytest.raises(ConfigError, match="telemetry.otlp.sample_ratio"):
        parse_config({"telemetry": {"otlp": {"sample_ratio": 2}}})
    with pytest.raises(ConfigError, match="telemetry.otlp.compression: unknown key"):
        parse_config({"telemetry": {"otlp": {"compression": "gzip"}}})
    with pytest.raises(ConfigError, match="telemetry.otlp.protocol"):
        parse_config({"telemetry": {"otlp": {"protocol": "http/json"}}})
    for bad in ("collector:4318", "http://", "grpc://c:4317"):
        with pytest.raises(ConfigError, match="telemetry.otlp.endpoint: .*http:// or https://"):
            parse_config({"telemetry": {"otlp": {"endpoint": bad}}})


@pytest.mark.parametrize(
    ("telemetry", "env", "on"),
    [
        ({}, {}, False),
        ({"otlp": {}}, {}, True),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"otlp": {}}, {"OTEL_SDK_DISABLED": "true"}, False),
        ({"otlp": {}}, {"OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_enabled(telemetry, env, on):
    assert enabled(Telemetry.model_validate(telemetry), env) is on


def test_protocol_and_url():
    assert protocol_of(None, {}) == "http/protobuf"
    assert protocol_of(None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    with pytest.raises(ConfigError, match="http/json"):
        protocol_of(None, {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("https://c/otlp/") == "https://c/otlp/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    with pytest.raises(ConfigError):
        traces_url("c:4318")


@pytest.mark.parametrize(
    ("chunks", "model"),
    [
        (
            [b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06"}\n\n'],
            "gpt-4o-2024-08-06",
        ),
        (
            [
                b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","mod',
                b'el": "claude-sonnet-4-5"}}\n\n',
            ],
            "claude-sonnet-4-5",
        ),
        (
            [b'data: {"candidates":[],"modelVersion":"gemini-2.5-flash"}\r\n\r\n'],
            "gemini-2.5-flash",
        ),
        ([b'{"model":"llama3.2:3b","message":{"content":"hi"},"done":false}\n'], "llama3.2:3b"),
        ([b"x" * (20 * 1024), b'data: {"model":"too-late"}\n\n'], None),
        ([b'data: {"choices":[{"delta":{"content":"no model here"}}]}\n\n'], None),
    ],
)
def test_stream_model(chunks, model):
    sniff = StreamModel()
    for chunk in chunks:
        sniff.look(chunk)
    assert sniff.model == model
