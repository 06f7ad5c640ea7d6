"""OpenTelemetry: each proxied request's span exported over OTLP with the GenAI semantic conventions.

One OTel span per Candela span, in the caller's trace: the same trace id, the caller's span as
parent, and Candela's own span id (the one sent upstream in traceparent), so the provider's
spans, if any, hang under it. The official SDK does the work: a BatchSpanProcessor with a
bounded queue hands spans to the OTLP exporter on its own thread, so the event loop only
builds the span and appends it to that queue. A dead or slow collector costs the export
thread its retries and, once the queue is full, drops spans: a request never waits for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace import TraceFlags as OTelTraceFlags

from candela_mitm.config import Otlp, Telemetry
from candela_mitm.errors import ConfigError
from candela_mitm.observability.spans import Span

log = logging.getLogger("candela.otel")

PROTOCOLS = ("http/protobuf", "grpc")
TRACES_PATH = "/v1/traces"
# Past this a JSON response body is not parsed again for the response model (the usage meter
# has read it already; a second parse of megabytes on the event loop is not worth a label).
MAX_FACTS_BODY = 256 * 1024
SHUTDOWN_S = 2.0  # at exit, the most spent flushing to a collector that may be gone

# Candela's route names as the semantic conventions' gen_ai.provider.name values.
PROVIDER_NAMES = {
    "openai": "openai",
    "google": "gcp.gemini",
    "gemini-oai": "gcp.gemini",
    "anthropic": "gcp.vertex_ai",
    "anthropic-vertex": "gcp.vertex_ai",
    "anthropic-direct": "anthropic",
    "anthropic-bedrock": "aws.bedrock",
    "bedrock-mantle": "aws.bedrock",
    "ollama": "ollama",
    "lmstudio": "lmstudio",
}

# (path fragment, gen_ai.operation.name), first match wins: more specific fragments first.
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/embeddings", "embeddings"),
    (":embedcontent", "embeddings"),
    (":batchembedcontents", "embeddings"),
    ("/api/embed", "embeddings"),
    ("/completions", "text_completion"),
    ("/responses", "chat"),
    ("/messages", "chat"),
    (":generatecontent", "generate_content"),
    (":streamgeneratecontent", "generate_content"),
    (":rawpredict", "chat"),
    (":streamrawpredict", "chat"),
    ("/converse", "chat"),  # Bedrock Converse and ConverseStream
    ("/invoke", "chat"),  # Bedrock InvokeModel(+WithResponseStream): Anthropic messages here
    ("/api/chat", "chat"),
    ("/api/generate", "text_completion"),
)


def operation_name(kind: str, path: str) -> str | None:
    """gen_ai.operation.name of a request, from its route and path; None when not a model call."""
    if kind == "chat":
        return "chat"
    bare = path.split("?", 1)[0].lower()
    for fragment, name in _OPERATIONS:
        if fragment in bare:
            return name
    return None


@dataclass(frozen=True)
class ResponseFacts:
    """What a response body says about itself beyond usage (absent fields stay None)."""

    model: str | None = None
    response_id: str | None = None
    reasoning_tokens: int | None = None
    finish_reasons: tuple[str, ...] = ()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def response_facts(body: Any) -> ResponseFacts:
    """The response model, id, reasoning tokens and finish reasons of an OpenAI, Anthropic,
    Gemini or Ollama JSON response."""
    if not isinstance(body, dict):
        return ResponseFacts()
    model = body.get("model") or body.get("modelVersion")
    rid = body.get("id") or body.get("responseId")
    usage = body.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    reasoning = None
    for details in ("completion_tokens_details", "output_tokens_details"):  # chat, responses
        d = usage.get(details)
        if isinstance(d, dict) and _int(d.get("reasoning_tokens")) is not None:
            reasoning = _int(d.get("reasoning_tokens"))
    meta = body.get("usageMetadata")
    if isinstance(meta, dict) and _int(meta.get("thoughtsTokenCount")) is not None:
        reasoning = _int(meta.get("thoughtsTokenCount"))
    reasons: list[str] = []
    for choice in body.get("choices") or body.get("candidates") or ():
        if isinstance(choice, dict):
            r = choice.get("finish_reason") or choice.get("finishReason")
            if isinstance(r, str):
                reasons.append(r)
    if isinstance(body.get("stop_reason"), str):
        reasons.append(body["stop_reason"])
    elif isinstance(body.get("done_reason"), str):
        reasons.append(body["done_reason"])
    return ResponseFacts(
        model=model if isinstance(model, str) else None,
        response_id=rid if isinstance(rid, str) else None,
        reasoning_tokens=reasoning,
        finish_reasons=tuple(reasons),
    )


def facts_from_bytes(content: bytes | None, content_type: str) -> ResponseFacts:
    if not content or len(content) > MAX_FACTS_BODY or "json" not in content_type.lower():
        return ResponseFacts()
    try:
        return response_facts(json.loads(content))
    except ValueError:
        return ResponseFacts()


# The model a stream names in its first event: OpenAI and Ollama "model", Anthropic's
# message_start {"message": {"model"}}, Gemini "modelVersion". Bedrock's binary event stream
# carries it base64-encoded: not found there.
_STREAM_MODEL = re.compile(rb'"(?:model|modelVersion)"\s*:\s*"([^"\\]{1,256})"')
SNIFF_BYTES = 16 * 1024  # every format names the model in its first event


class StreamModel:
    """Finds the response model at the start of a stream as it passes (the usage meters read
    usage only); stops looking after SNIFF_BYTES."""

    def __init__(self) -> None:
        self.model: str | None = None
        self._seen = 0
        self._tail = b""

    def look(self, data: bytes) -> None:
        if self.model is not None or self._seen >= SNIFF_BYTES:
            return
        buf = self._tail + data[: SNIFF_BYTES - self._seen]
        self._seen += len(data)
        m = _STREAM_MODEL.search(buf)
        if m:
            self.model = m.group(1).decode("utf-8", "replace")
        else:
            self._tail = buf[-320:]  # a name split across two chunks


@dataclass(frozen=True)
class RequestFacts:
    """What the span itself does not carry: the route, the caller, the upstream."""

    kind: str = "proxy"
    path: str = "/"
    route: str | None = None  # Candela's provider route name
    server_address: str | None = None
    server_port: int | None = None
    client_address: str | None = None
    intercepted: bool = False
    via: str | None = None  # how the caller authenticated (api_key, oidc, local, ...)
    decision: str = "allowed"  # allowed | denied


def attributes(span: Span, req: RequestFacts, resp: ResponseFacts) -> dict[str, Any]:
    """The span's attributes: GenAI semantic conventions, then Candela's own (absent: left out)."""
    a: dict[str, Any] = {}
    op = operation_name(req.kind, req.path)
    route = req.route or span.provider
    if op:
        a["gen_ai.operation.name"] = op
    if route:
        a["gen_ai.provider.name"] = PROVIDER_NAMES.get(route, route)
    if span.model:
        a["gen_ai.request.model"] = span.model
    if resp.model:
        a["gen_ai.response.model"] = resp.model
    if resp.response_id:
        a["gen_ai.response.id"] = resp.response_id
    if resp.finish_reasons:
        a["gen_ai.response.finish_reasons"] = list(resp.finish_reasons)
    if span.status != "denied":
        a["gen_ai.usage.input_tokens"] = span.input_tokens
        a["gen_ai.usage.output_tokens"] = span.output_tokens
        if span.cached_tokens:
            a["gen_ai.usage.cache_read.input_tokens"] = span.cached_tokens
        if resp.reasoning_tokens is not None:
            a["gen_ai.usage.reasoning.output_tokens"] = resp.reasoning_tokens
    if req.server_address:
        a["server.address"] = req.server_address
        if req.server_port:
            a["server.port"] = req.server_port
    if req.client_address:
        a["client.address"] = req.client_address
    if span.http_status is not None:
        a["http.response.status_code"] = span.http_status
    if span.status == "error":
        a["error.type"] = span.error or (str(span.http_status) if span.http_status else "error")
    for key, value in (
        ("candela.user", span.user),
        ("candela.tenant", span.tenant),
        ("candela.route", req.route),
        ("candela.auth", req.via),
    ):
        if value:
            a[key] = value
    a["candela.cost_usd"] = round(span.cost_usd, 10)
    a["candela.decision"] = req.decision
    if span.status == "denied" and span.error:
        a["candela.denial"] = span.error
    a["candela.stream"] = span.stream
    a["candela.intercepted"] = req.intercepted
    if span.ttft_ms is not None:
        a["candela.ttft_ms"] = round(span.ttft_ms, 3)
    return a


def span_name(span: Span, req: RequestFacts) -> str:
    """`{gen_ai.operation.name} {gen_ai.request.model}`, as the conventions name it."""
    op = operation_name(req.kind, req.path)
    if op and span.model:
        return f"{op} {span.model}"
    return op or f"candela {req.route or span.provider or req.kind}"


class _GivenIds(IdGenerator):
    """Hands the SDK the ids Candela already chose (set under TraceExport's lock just before
    the span starts); random ids for anything else."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self.span_id: int | None = None
        self.trace_id: int | None = None

    def generate_span_id(self) -> int:
        given, self.span_id = self.span_id, None
        return given if given is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        given, self.trace_id = self.trace_id, None
        return given if given is not None else self._random.generate_trace_id()


class _Counting(SpanExporter):
    """The OTLP exporter, with each failed export counted (on the export thread) and never raised."""

    def __init__(self, inner: SpanExporter, on_failure: Callable[[], None]) -> None:
        self.inner = inner
        self.on_failure = on_failure

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.debug("OTLP export failed", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.on_failure()
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def enabled(telemetry: Telemetry, env: Mapping[str, str] = os.environ) -> bool:
    """Export when configured, or when the standard variables name an endpoint; never when the
    SDK is disabled (OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return telemetry.otlp is not None or bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def protocol_of(otlp: Otlp | None, env: Mapping[str, str] = os.environ) -> str:
    protocol = (
        (otlp.protocol if otlp else None)
        or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"telemetry.otlp.protocol: {protocol!r} is not supported (one of {', '.join(PROTOCOLS)})"
        )
    return protocol


def traces_url(endpoint: str) -> str:
    """A base endpoint as OTEL_EXPORTER_OTLP_ENDPOINT means it: the traces path appended."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"telemetry.otlp.endpoint: {endpoint!r} is not an http(s) URL")
    if parts.path.rstrip("/").endswith(TRACES_PATH):
        return endpoint
    return endpoint.rstrip("/") + TRACES_PATH


def build_exporter(otlp: Otlp | None, env: Mapping[str, str] = os.environ) -> SpanExporter:
    """The SDK's OTLP exporter for the configured protocol; unset fields come from the env."""
    protocol = protocol_of(otlp, env)
    endpoint = otlp.endpoint if otlp else None
    headers = dict(otlp.headers) if otlp and otlp.headers else None
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        metadata = {k.lower(): v for k, v in headers.items()} if headers else None
        return GrpcExporter(endpoint=endpoint, headers=metadata)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(endpoint=traces_url(endpoint) if endpoint else None, headers=headers)


class TraceExport:
    """Candela's spans to an OTLP collector, batched on the SDK's export thread."""

    def __init__(
        self,
        exporter: SpanExporter,
        sample_ratio: float = 1.0,
        service_name: str = "candela",
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self._ids = _GivenIds()
        # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, when they name it, win over ours
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service_name}))
        self.provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            id_generator=self._ids,
        )
        # queue, batch and delay from OTEL_BSP_* (default: 2048 spans, 512 a batch, 5 s)
        self.processor = BatchSpanProcessor(_Counting(exporter, on_failure))
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("candela")
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls,
        telemetry: Telemetry,
        service_name: str,
        on_failure: Callable[[], None] = lambda: None,
        env: Mapping[str, str] = os.environ,
    ) -> TraceExport | None:
        """None when nothing asks for export (no telemetry.otlp, no OTLP endpoint variable)."""
        if not enabled(telemetry, env):
            return None
        otlp = telemetry.otlp
        return cls(
            build_exporter(otlp, env),
            sample_ratio=otlp.sample_ratio if otlp else 1.0,
            service_name=service_name,
            on_failure=on_failure,
        )

    def export(
        self,
        span: Span,
        req: RequestFacts,
        facts: Callable[[], ResponseFacts] = ResponseFacts,
        trace_flags: str = "01",
    ) -> bool:
        """Hand one finished span to the export queue; True when sampled. `facts` is called only
        for a sampled span (it may parse the response body)."""
        end_ns = time.time_ns()
        start_ns = end_ns - int(span.duration_ms * 1_000_000)
        parent = None
        if span.parent_span_id:
            remote = SpanContext(
                trace_id=int(span.trace_id, 16),
                span_id=int(span.parent_span_id, 16),
                is_remote=True,
                trace_flags=OTelTraceFlags(int(trace_flags, 16) & 0x01),
            )
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        with self._lock:  # the ids handed to the generator belong to this span only
            self._ids.trace_id = int(span.trace_id, 16)
            self._ids.span_id = int(span.span_id, 16)
            otel_span = self.tracer.start_span(
                span_name(span, req), context=parent, kind=SpanKind.CLIENT, start_time=start_ns
            )
            self._ids.trace_id = self._ids.span_id = None
        if not otel_span.is_recording():
            return False
        otel_span.set_attributes(attributes(span, req, facts()))
        if span.status == "error":
            otel_span.set_status(Status(StatusCode.ERROR, span.error or None))
        otel_span.end(end_time=end_ns)
        return True

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.processor.force_flush(int(timeout_s * 1000))

    def shutdown(self, timeout_s: float = SHUTDOWN_S) -> None:
        """Flush what is queued, for at most `timeout_s`: a dead collector never holds up exit."""
        t = threading.Thread(target=self.provider.shutdown, name="candela-otel-stop", daemon=True)
        t.start()
        t.join(timeout_s)
