"""Issue 14: the real Node SDKs of OpenAI, Anthropic and Google work unchanged through Candela
(reverse mode) against the recording fake provider: a JSON call, a streamed call and a denial
each, as the SDK sees them and as the fake and the audit trail recorded them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from candela_mitm.audit.query import query_entries
from candela_mitm.providers.usage import Usage
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.node import node_sdk_missing, run_node
from tests.fakes.upstream import ANTHROPIC_KEY, OPENAI_KEY, FakeUpstream
from tests.required import require
from tests.wait import WAIT_S

from .conftest import ALICE_KEY, base_config, candela_env

pytestmark = [pytest.mark.e2e, pytest.mark.sdk]
AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}

# (route, allowed model, denied model, usage the fake reports, $ per million in and out)
OPENAI = (
    "openai",
    "gpt-4o-mini",
    "gpt-4o",
    Usage(input_tokens=1000, output_tokens=500),
    (0.15, 0.60),
)
ANTHROPIC = (
    "anthropic-direct",
    "claude-sonnet-4-20250514",
    "claude-opus-4-20250514",
    Usage(input_tokens=100, output_tokens=20),
    (3.0, 15.0),
)
GOOGLE = (
    "google",
    "gemini-2.5-flash",
    "gemini-2.5-pro",
    Usage(input_tokens=40, output_tokens=9),
    (0.30, 2.50),
)


@pytest.fixture(scope="module")
def node_sdk() -> None:
    missing = node_sdk_missing()
    if missing:
        require(missing)


@pytest.fixture(scope="module")
def candela(
    node_sdk: None,
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
    token_server: FakeTokenServer,
) -> Iterator[CandelaProcess]:
    tmp = tmp_path_factory.mktemp("candela-node")
    allowed = [OPENAI[1], ANTHROPIC[1], GOOGLE[1]]
    cfg = base_config(
        upstream.url,
        governance={
            "budgets": {"default_daily_usd": 1000.0},
            "models": {"mode": "allowlist", "allowed": allowed},
        },
    )
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp)) as c:
        yield c


@pytest.fixture(autouse=True)
def _reset(upstream: FakeUpstream) -> Iterator[None]:
    upstream.reset()
    upstream.clear()
    yield


def node_json(
    candela: CandelaProcess, script: str, model: str, denied: str
) -> dict[str, dict[str, Any]]:
    """Run a script of tests/fakes/node; its JSON lines by their "call" (json, stream, denied)."""
    env = {
        "CANDELA_URL": candela.url,
        "CANDELA_KEY": ALICE_KEY,
        "MODEL": model,
        "DENIED_MODEL": denied,
    }
    proc = run_node(script, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {line.pop("call"): line for line in lines}


def spans(candela: CandelaProcess, n: int) -> list[dict[str, Any]]:
    r = requests.get(f"{candela.url}/_local/api/traces?limit={n}", headers=AUTH, timeout=5)
    assert r.status_code == 200
    return list(r.json()["spans"])


def llm_requests(candela: CandelaProcess, n: int) -> list[dict[str, Any]]:
    """The newest `n` llm_request audit entries, oldest first (the writer thread commits them just after the answer)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        rows = query_entries(candela.tmp / "audit.db", action="llm_request", limit=n)
        if len(rows) >= n or time.monotonic() > deadline:
            return [r["fields"] for r in reversed(rows)]
        time.sleep(0.05)


def assert_accounted(
    candela: CandelaProcess,
    case: tuple[Any, ...],
    calls: tuple[tuple[str, str], tuple[str, str]],
    json_span: str,
) -> None:
    """JSON call, stream, denial: in that order in the audit log, the two forwarded ones with the
    (path, operation) of `calls` and charged for the usage the fake reported (traces and audit
    agree), the denial at $0."""
    route, model, denied, usage, rates = case
    cost = (usage.input_tokens * rates[0] + usage.output_tokens * rates[1]) / 1e6
    plain, streamed, refused = llm_requests(candela, 3)
    for entry, stream, (path, operation) in ((plain, False, calls[0]), (streamed, True, calls[1])):
        assert (entry["decision"], entry["status"], entry["stream"]) == ("allowed", 200, stream)
        assert (entry["provider"], entry["model"], entry["user_id"]) == (
            route,
            model,
            "alice@example.com",
        )
        assert (entry["method"], entry["path"], entry["operation"]) == ("POST", path, operation)
        assert (entry["input_tokens"], entry["output_tokens"]) == (
            usage.input_tokens,
            usage.output_tokens,
        )
        assert entry["cost_usd"] == pytest.approx(cost) and entry["usage_source"] == "reported"
    assert plain["span_id"] == json_span  # the x-candela-span-id header the SDK returned
    assert (refused["decision"], refused["status"], refused["reason"]) == (
        "denied",
        403,
        "model_not_allowed",
    )
    assert refused["model"] == denied and refused["cost_usd"] == 0
    by_id = {s["span_id"]: s for s in spans(candela, 10)}
    for entry in (plain, streamed):
        s = by_id[entry["span_id"]]
        assert (s["provider"], s["model"], s["stream"], s["status"]) == (
            route,
            model,
            entry["stream"],
            "ok",
        )
        assert (s["input_tokens"], s["output_tokens"]) == (usage.input_tokens, usage.output_tokens)
        assert s["cost_usd"] == pytest.approx(cost)


def no_candela_key_upstream(rec: Any) -> None:
    joined = json.dumps(rec.headers)
    assert ALICE_KEY not in joined
    assert not any(h.startswith("x-candela") for h in rec.headers)


def test_openai_node_sdk(candela: CandelaProcess, upstream: FakeUpstream) -> None:
    route, model, denied, usage, rates = OPENAI
    upstream.configure(usage=usage, n_chunks=3)
    out = node_json(candela, "openai.mjs", model, denied)
    assert out["json"]["text"] == upstream.reply_text
    assert out["json"]["usage"] == [1000, 500] and out["json"]["span"]
    # Candela asks the upstream for the usage chunk; a client that did not ask never sees it
    assert out["stream"]["text"] == upstream.reply_text and out["stream"]["usage_chunks"] == 0
    assert out["denied"] == {"status": 403, "error": "model_not_allowed", "api_error": True}
    plain, streamed = upstream.wait_for(2)
    assert [r.route_path for r in (plain, streamed)] == ["/v1/chat/completions"] * 2
    for rec in (plain, streamed):
        assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}" and rec.auth == "openai_key"
        assert rec.json["model"] == model
        no_candela_key_upstream(rec)
    assert streamed.stream and streamed.json["stream_options"] == {"include_usage": True}
    assert_accounted(
        candela, OPENAI, (("/v1/chat/completions", "chat.completions"),) * 2, out["json"]["span"]
    )
    assert len(upstream.requests) == 2  # the denied model never left


def test_anthropic_node_sdk(candela: CandelaProcess, upstream: FakeUpstream) -> None:
    route, model, denied, usage, rates = ANTHROPIC
    upstream.configure(usage=usage, n_chunks=3)
    out = node_json(candela, "anthropic.mjs", model, denied)
    assert out["json"] == {
        "text": upstream.reply_text,
        "usage": [100, 20],
        "span": out["json"]["span"],
    }
    assert out["stream"]["text"] == upstream.reply_text and out["stream"]["usage"] == [100, 20]
    events = out["stream"]["events"]
    assert (
        events[0] == "message_start"
        and events[-1] == "message_stop"
        and "content_block_delta" in events
    )
    assert out["denied"] == {"status": 403, "error": "model_not_allowed", "api_error": True}
    plain, streamed = upstream.wait_for(2)
    for rec in (plain, streamed):
        assert rec.route_path == "/v1/messages" and rec.json["model"] == model
        # the SDK sent the Candela key as x-api-key: the organisation's key replaced it
        assert rec.headers["x-api-key"] == ANTHROPIC_KEY and rec.auth == "anthropic_key"
        assert "authorization" not in rec.headers and rec.headers["anthropic-version"]
        no_candela_key_upstream(rec)
    assert streamed.stream and streamed.json["stream"] is True
    assert_accounted(candela, ANTHROPIC, (("/v1/messages", "messages"),) * 2, out["json"]["span"])
    assert len(upstream.requests) == 2


def test_google_genai_node_sdk(
    candela: CandelaProcess, upstream: FakeUpstream, token_server: FakeTokenServer
) -> None:
    route, model, denied, usage, rates = GOOGLE
    upstream.configure(usage=usage, n_chunks=3)
    out = node_json(candela, "google.mjs", model, denied)
    assert out["json"] == {
        "text": upstream.reply_text,
        "usage": [40, 9],
        "span": out["json"]["span"],
    }
    assert out["stream"] == {"text": upstream.reply_text, "chunks": 3}
    # @google/genai's ApiError: the status, and Candela's JSON body as its message
    assert out["denied"] == {"status": 403, "error": "model_not_allowed", "api_error": True}
    plain, streamed = upstream.wait_for(2)
    base = f"/v1beta/models/{model}"
    assert (plain.path, streamed.path) == (
        f"{base}:generateContent",
        f"{base}:streamGenerateContent?alt=sse",
    )
    for rec in (plain, streamed):
        # the Candela key came as x-goog-api-key; the organisation's service account went on
        assert rec.auth == "google_token" and token_server.is_valid(
            rec.headers["authorization"][7:]
        )
        assert "x-goog-api-key" not in rec.headers
        no_candela_key_upstream(rec)
    assert_accounted(
        candela,
        GOOGLE,
        (
            (f"{base}:generateContent", "generateContent"),
            (f"{base}:streamGenerateContent", "streamGenerateContent"),
        ),
        out["json"]["span"],
    )
    assert len(upstream.requests) == 2
