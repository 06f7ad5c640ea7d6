"""Issue 20 end to end: candela-server exports GenAI spans over OTLP (HTTP/protobuf and gRPC)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests

from candela_mitm.providers.usage import Usage
from tests.fakes.candela import CandelaProcess, free_port
from tests.fakes.otlp import OtlpReceiver
from tests.fakes.upstream import FakeUpstream
from tests.wait import WAIT_S

from .conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, base_config, candela_env

pytestmark = pytest.mark.e2e
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}  # /metrics is served to admins
CHAT = "/proxy/openai/v1/chat/completions"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
# the batch leaves after 50 ms instead of 5 s: also shows that OTEL_BSP_* is honoured
FAST_BATCH = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


def traced(n: int) -> dict[str, str]:
    return {**ALICE, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN[:-2]}{n:02x}-01"}


@pytest.fixture(autouse=True)
def _reset(upstream: FakeUpstream) -> Iterator[None]:
    upstream.reset()
    upstream.clear()
    yield


@pytest.fixture(scope="module", params=["http/protobuf", "grpc"])
def exported(request, tmp_path_factory, upstream, token_server):
    """A receiver of the given protocol and a candela-server exporting to it."""
    protocol = request.param
    with OtlpReceiver(protocol) as receiver:
        tmp = tmp_path_factory.mktemp("otel")
        cfg = base_config(
            upstream.url,
            users={
                "alice@example.com": {"tenants": ["research-team"]},
                "bob@example.com": {"daily_budget_usd": 0.0},
            },
            governance={
                "budgets": {"default_daily_usd": 1000.0},
                "models": {"mode": "blocklist", "blocked": ["gpt-4-blocked"]},
            },
            telemetry={
                "otlp": {
                    "endpoint": receiver.endpoint,
                    "protocol": protocol,
                    "headers": {"X-Collector-Token": "tok-123"},
                }
            },
        )
        env = {**candela_env(token_server, tmp), **FAST_BATCH}
        with CandelaProcess(tmp, cfg, env=env) as c:
            yield c, receiver


def by_span(receiver: OtlpReceiver, span_id: str):
    [s] = receiver.wait_for(lambda s: s.span_id == span_id)
    return s


def test_json_request_is_one_genai_span_in_the_callers_trace(exported, upstream):
    c, receiver = exported
    upstream.usage = Usage(input_tokens=1000, output_tokens=500, cached_tokens=200)
    r = requests.post(
        c.url + CHAT,
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers={**traced(1), "X-Candela-Tenant-Id": "research-team"},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    span_id = r.headers["x-candela-span-id"]
    s = by_span(receiver, span_id)
    assert (s.trace_id, s.parent_span_id) == (CALLER_TRACE, CALLER_SPAN[:-2] + "01")
    [rec] = upstream.wait_for(1)  # the provider's own spans would hang under this one
    assert rec.headers["traceparent"] == f"00-{CALLER_TRACE}-{span_id}-01"
    assert s.name == "chat gpt-4o-mini" and s.kind == 3  # SPAN_KIND_CLIENT
    a = s.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == r.json()["model"]
    assert a["gen_ai.response.id"] == r.json()["id"]
    assert a["gen_ai.usage.input_tokens"] == 1000
    assert a["gen_ai.usage.output_tokens"] == 500
    assert a["gen_ai.usage.cache_read.input_tokens"] == 200
    assert a["gen_ai.usage.reasoning.output_tokens"] == 0
    assert a["candela.user"] == "alice@example.com"
    assert a["candela.tenant"] == "research-team"
    assert a["candela.decision"] == "allowed" and "candela.denial" not in a
    assert a["candela.cost_usd"] > 0
    assert a["http.response.status_code"] == 200 and a["candela.stream"] is False
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == upstream.port
    assert s.resource["service.name"] == "candela-server"
    assert s.headers["x-collector-token"] == "tok-123"  # telemetry.otlp.headers sent
    assert s.end_ns > s.start_ns


def test_stream_span_carries_the_streamed_usage(exported, upstream):
    c, receiver = exported
    upstream.usage = Usage(input_tokens=40, output_tokens=30)
    r = requests.post(
        c.url + CHAT,
        json={
            "model": "gpt-4o",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers=traced(2),
        timeout=20,
    )
    assert r.status_code == 200 and "data: [DONE]" in r.text
    s = by_span(receiver, r.headers["x-candela-span-id"])
    assert s.trace_id == CALLER_TRACE
    a = s.attributes
    assert a["candela.stream"] is True and a["gen_ai.request.model"] == "gpt-4o"
    model = [
        json.loads(line[6:])["model"] for line in r.text.splitlines() if line.startswith("data: {")
    ][0]
    assert a["gen_ai.response.model"] == model  # read from the stream as it passed
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (40, 30)
    assert a["candela.ttft_ms"] >= 0 and a["candela.cost_usd"] > 0


@pytest.mark.parametrize(
    ("model", "headers", "status", "code"),
    [
        ("gpt-4-blocked", ALICE, 403, "model_not_allowed"),
        ("gpt-4o-mini", {"Authorization": f"Bearer {BOB_KEY}"}, 402, "budget_exceeded"),
    ],
)
def test_a_denial_is_a_span_too(exported, upstream, model, headers, status, code):
    c, receiver = exported
    r = requests.post(
        c.url + CHAT,
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        headers={**headers, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        timeout=20,
    )
    assert r.status_code == status and r.json()["error"] == code
    assert upstream.requests == []  # denied: never forwarded
    s = by_span(receiver, r.headers["x-candela-span-id"])
    assert (s.trace_id, s.parent_span_id) == (CALLER_TRACE, CALLER_SPAN)
    a = s.attributes
    assert a["candela.decision"] == "denied" and a["candela.denial"] == code
    assert a["gen_ai.request.model"] == model and a["http.response.status_code"] == status
    assert a["candela.cost_usd"] == 0 and "gen_ai.usage.input_tokens" not in a


def test_unsampled_caller_trace_is_not_exported(exported, upstream):
    c, receiver = exported
    r = requests.post(
        c.url + CHAT,
        json={"model": "gpt-4o-mini", "messages": []},
        headers={**ALICE, "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"},
        timeout=20,
    )
    assert r.status_code == 200
    marker = requests.post(
        c.url + CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=ALICE, timeout=20
    )
    by_span(receiver, marker.headers["x-candela-span-id"])  # exported after the first
    ids = {s.span_id for s in receiver.spans}
    assert r.headers["x-candela-span-id"] not in ids


def test_a_stopped_collector_does_not_fail_requests(tmp_path, upstream, token_server):
    """Nothing listens on the endpoint: every request is still answered, and the failures are
    counted on /metrics (candela_observability_errors_total{component="otlp"})."""
    dead = f"http://127.0.0.1:{free_port()}"
    secret = {"Authorization": "Bearer sekrit-otlp-token"}
    cfg = base_config(upstream.url, telemetry={"otlp": {"endpoint": dead, "headers": secret}})
    env = {**candela_env(token_server, tmp_path), **FAST_BATCH, "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    with CandelaProcess(tmp_path, cfg, env=env) as c:
        for i in range(20):
            body = {"model": "gpt-4o-mini", "stream": i % 2 == 1, "messages": []}
            r = requests.post(c.url + CHAT, json=body, headers=ALICE, timeout=20)
            assert r.status_code == 200, r.text
        assert len(upstream.requests) == 20
        metrics = ""
        deadline = time.monotonic() + WAIT_S  # the exporter's failures, counted in its thread
        while time.monotonic() < deadline:
            metrics = requests.get(c.url + "/metrics", headers=ADMIN, timeout=10).text
            if 'candela_observability_errors_total{component="otlp"}' in metrics:
                break
            time.sleep(0.1)
        assert 'candela_observability_errors_total{component="otlp"}' in metrics
    assert "sekrit-otlp-token" not in c.log()


def test_standard_environment_variables_alone_turn_export_on(tmp_path, upstream, token_server):
    with OtlpReceiver("http/protobuf") as receiver:
        env = {
            **candela_env(token_server, tmp_path),
            **FAST_BATCH,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Basic%20abc",
            "OTEL_SERVICE_NAME": "gateway-eu",
        }
        with CandelaProcess(tmp_path, base_config(upstream.url), env=env) as c:
            r = requests.post(
                c.url + CHAT,
                json={"model": "gpt-4o-mini", "messages": []},
                headers=ALICE,
                timeout=20,
            )
            assert r.status_code == 200
            s = by_span(receiver, r.headers["x-candela-span-id"])
    assert s.resource["service.name"] == "gateway-eu"
    assert s.headers["authorization"] == "Basic abc"
    assert json.dumps(s.attributes)  # plain values only


def test_an_otel_variable_candela_cannot_honour_turns_export_off_not_the_proxy(
    tmp_path, upstream, token_server
):
    env = {
        **candela_env(token_server, tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
    }
    with CandelaProcess(tmp_path, base_config(upstream.url), env=env) as c:
        r = requests.post(
            c.url + CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=ALICE, timeout=20
        )
        assert r.status_code == 200
        metrics = requests.get(c.url + "/metrics", headers=ADMIN, timeout=5).text
    assert "OpenTelemetry export is off: telemetry.otlp.protocol: 'http/json'" in c.log()
    assert 'candela_observability_errors_total{component="otlp"} 1.0' in metrics


def test_a_receiver_stopped_while_serving_does_not_fail_requests(tmp_path, upstream, token_server):
    """gRPC this time: spans arrive, the receiver stops, requests (JSON and streams) still pass."""
    receiver = OtlpReceiver("grpc").start()
    try:
        cfg = base_config(
            upstream.url,
            telemetry={"otlp": {"endpoint": receiver.endpoint, "protocol": "grpc"}},
        )
        env = {
            **candela_env(token_server, tmp_path),
            **FAST_BATCH,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        }
        with CandelaProcess(tmp_path, cfg, env=env) as c:
            body = {"model": "gpt-4o-mini", "messages": []}
            r = requests.post(c.url + CHAT, json=body, headers=ALICE, timeout=20)
            by_span(receiver, r.headers["x-candela-span-id"])
            receiver.stop()
            for i in range(10):
                body = {"model": "gpt-4o-mini", "stream": i % 2 == 1, "messages": []}
                r = requests.post(c.url + CHAT, json=body, headers=ALICE, timeout=20)
                assert r.status_code == 200, r.text
            assert len(upstream.requests) == 11
    finally:
        receiver.stop()
