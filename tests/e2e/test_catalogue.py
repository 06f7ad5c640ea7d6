"""Issue 14 end to end: only the catalogue's operations leave, each one priced by its own format."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import pytest
import requests

from candela_mitm.audit.query import query_entries
from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import OPENAI_KEY, FakeUpstream
from tests.wait import WAIT_S

from .conftest import ADMIN_KEY, ALICE_KEY, base_config, candela_env, providers_config

pytestmark = pytest.mark.e2e
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
VERTEX = "/proxy/anthropic-vertex/v1/projects/proj/locations/us-east5/publishers"
GEN = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.fixture(autouse=True)
def _reset(upstream: FakeUpstream):
    upstream.reset()
    upstream.clear()
    yield


@pytest.fixture(scope="module")
def cat(tmp_path_factory, upstream, token_server):
    tmp = tmp_path_factory.mktemp("catalogue")
    providers = providers_config(upstream.url)
    providers["openai"] = {**providers["openai"], "allow": ["GET /v1/files/{id}"]}
    cfg = base_config(upstream.url, providers=providers)
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp)) as c:
        yield c


def raw_request(c: CandelaProcess, method: str, target: str, body=None, headers=None):
    """The target sent byte for byte (requests would drop a fragment and resolve dot segments)."""
    u = urlsplit(c.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    data = json.dumps(body).encode() if body is not None else None
    h = {**ALICE, **(headers or {})}
    if data is not None:
        h["Content-Type"] = "application/json"
    try:
        conn.request(method, target, body=data, headers=h)
        r = conn.getresponse()
        return r.status, r.read(), dict(r.getheaders())
    finally:
        conn.close()


def entries(c: CandelaProcess, n_min: int = 1) -> list[dict]:
    deadline = time.monotonic() + WAIT_S
    while True:
        rows = query_entries(c.tmp / "audit.db", action="llm_request", limit=1000)
        if len(rows) >= n_min or time.monotonic() > deadline:
            return [r["fields"] for r in rows]
        time.sleep(0.05)


def last_entry_for(c: CandelaProcess, span_id: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for f in entries(c):
            if f.get("span_id") == span_id:
                return f
        time.sleep(0.05)
    raise AssertionError(f"no llm_request entry for span {span_id}")


# every example of issue 14 that must not reach the provider
REFUSED = [
    ("GET", "/proxy/openai/v1/models", None, {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}, 404, "endpoint_not_governed"),
    ("GET", "/proxy/openai/v1/files", None, None, 404, "endpoint_not_governed"),
    ("GET", "/proxy/openai/v1/batches", None, None, 404, "endpoint_not_governed"),
    ("GET", "/proxy/openai/v1/chat/completions?metadata[user]=bob", None, None, 404, "endpoint_not_governed"),
    ("GET", "/proxy/google/v1beta/batches", None, None, 404, "endpoint_not_governed"),
    ("GET", "/proxy/anthropic-vertex/v1/projects/proj/locations/us-east5/batchPredictionJobs", None, None, 404, "endpoint_not_governed"),
    ("POST", "/proxy/openai/v1/files", {"model": "gpt-4o-mini", "purpose": "batch"}, None, 404, "endpoint_not_governed"),
    ("DELETE", "/proxy/openai/v1/models/ft:gpt-4o-mini:org::x", {"model": "gpt-4o-mini"}, None, 404, "endpoint_not_governed"),
    ("POST", "/proxy/openai/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "background": True}, None, 404, "endpoint_not_governed"),
    ("POST", "/proxy/google/v1beta/models/gemini-2.5-flash:batchGenerateContent", {"batch": {}}, None, 404, "endpoint_not_governed"),
    ("POST", "/proxy/openai/v1/threads/thread_1/runs", {"assistant_id": "asst_1"}, None, 404, "endpoint_not_governed"),
    ("POST", "/proxy/openai/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}, None, 404, "endpoint_not_governed"),
    ("POST", "/proxy/ollama/api/pull", {"model": "llama3.2:3b"}, None, 404, "endpoint_not_governed"),
    ("POST", "/proxy/ollama/api/create", {"model": "x", "from": "llama3.2:3b"}, None, 404, "endpoint_not_governed"),
    ("DELETE", "/proxy/ollama/api/delete", {"model": "llama3.2:3b"}, None, 404, "endpoint_not_governed"),
    ("POST", f"{VERTEX.replace('/proj/', '/someone-else/')}/google/models/gemini-2.5-flash:generateContent", GEN, None, 404, "endpoint_not_governed"),
    ("GET", "/proxy/anthropic-direct/api/claude_code/organizations/metrics_enabled", None, None, 404, "endpoint_not_governed"),
    ("POST", "/proxy/openai/v1/chat/completions#/v1/files", {"model": "gpt-4o-mini", "messages": []}, None, 400, "invalid_request_target"),
    ("GET", "/proxy/openai/v1/models/../files", None, None, 400, "invalid_request_target"),
    ("GET", "/proxy/openai/v1/models/%2e%2e/files", None, None, 400, "invalid_request_target"),
    ("POST", "/proxy/openai/v1/chat%2Fcompletions", {"model": "gpt-4o-mini", "messages": []}, None, 400, "invalid_request_target"),
]


@pytest.mark.parametrize("method, target, body, headers, status, code", REFUSED, ids=lambda v: v if isinstance(v, str) and v.startswith("/") else None)
def test_refused_before_any_byte_leaves_and_audited(cat, upstream, method, target, body, headers, status, code):
    got, raw, resp_headers = raw_request(cat, method, target, body, headers)
    assert got == status, raw[:300]
    payload = json.loads(raw)
    assert payload["error"] == code
    if code == "endpoint_not_governed":
        assert payload["method"] == method
        route_relative = "/" + target.split("/", 3)[3]  # after /proxy/<route>
        assert payload["path"] == route_relative.split("?")[0]
    assert upstream.requests == []  # nothing reached the provider
    e = last_entry_for(cat, resp_headers["X-Candela-Span-Id"])
    assert (e["decision"], e["reason"], e["user_id"]) == ("denied", code, "alice@example.com")
    assert e["method"] == method and e["path"] and "?" not in e["path"]


def test_gemini_through_vertex_is_metered_by_geminis_reader(cat, upstream):
    r = requests.post(cat.url + f"{VERTEX}/google/models/gemini-2.5-flash:generateContent", json=GEN, headers=ALICE, timeout=20)
    assert r.status_code == 200, r.text
    assert [q.route for q in upstream.requests] == ["vertex.gemini"]
    e = last_entry_for(cat, r.headers["X-Candela-Span-Id"])
    assert (e["input_tokens"], e["output_tokens"]) == (12, 7)
    assert e["cost_usd"] > 0 and e["operation"] == "gemini.generateContent"
    assert e["path"] == "/v1/projects/proj/locations/us-east5/publishers/google/models/gemini-2.5-flash:generateContent"
    # streamed (SSE) too
    r = requests.post(
        cat.url + f"{VERTEX}/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        json=GEN, headers=ALICE, timeout=20,
    )
    assert r.status_code == 200 and r.text.startswith("data: ")
    e = last_entry_for(cat, r.headers["X-Candela-Span-Id"])
    assert (e["input_tokens"], e["output_tokens"], e["stream"]) == (12, 7, True) and e["cost_usd"] > 0


def test_anthropics_openai_compatible_chat_is_metered_by_openais_reader(cat, upstream):
    body = {"model": "claude-sonnet-4-20250514", "messages": [{"role": "user", "content": "hi"}]}
    r = requests.post(cat.url + "/proxy/anthropic-direct/v1/chat/completions", json=body, headers=ALICE, timeout=20)
    assert r.status_code == 200, r.text
    assert [(q.route, q.auth) for q in upstream.requests] == [("anthropic.openai_chat", "anthropic_key")]
    e = last_entry_for(cat, r.headers["X-Candela-Span-Id"])
    assert (e["input_tokens"], e["output_tokens"]) == (12, 7) and e["cost_usd"] > 0
    assert e["operation"] == "openai_compat.chat.completions"


def test_google_parameters_that_reshape_the_answer_are_stripped(cat, upstream):
    r = requests.post(
        cat.url + "/proxy/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&fields=candidates&prettyPrint=false",
        json=GEN,
        headers={**ALICE, "X-Goog-FieldMask": "candidates", "x-goog-user-project": "someone-else"},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    (q,) = upstream.requests
    assert q.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert "x-goog-fieldmask" not in q.headers and "x-goog-user-project" not in q.headers
    e = last_entry_for(cat, r.headers["X-Candela-Span-Id"])
    assert (e["input_tokens"], e["output_tokens"]) == (12, 7) and e["cost_usd"] > 0


def test_an_operator_allowed_read_is_forwarded_unmetered_and_audited(cat, upstream):
    status, raw, headers = raw_request(cat, "GET", "/proxy/openai/v1/files/file-abc")
    (q,) = upstream.requests  # forwarded (the fake has no files: it answers 404 itself)
    assert q.path == "/v1/files/file-abc" and q.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    e = last_entry_for(cat, headers["X-Candela-Span-Id"])
    assert e["operation"] == "allowed:GET /v1/files/{id}" and e["decision"] == "allowed"
    assert e["cost_usd"] == 0 and e["estimate_usd"] == 0 and e["path"] == "/v1/files/file-abc"
    # what the entry does not name stays refused
    status, raw, _ = raw_request(cat, "GET", "/proxy/openai/v1/files/file-abc/content")
    assert status == 404 and json.loads(raw)["error"] == "endpoint_not_governed"
    assert len(upstream.requests) == 1


def test_claude_codes_auxiliary_calls_never_carry_the_organisations_key(cat, upstream):
    status, raw, _ = raw_request(cat, "HEAD", "/proxy/anthropic-direct/")
    assert status == 200 and raw == b""
    status, raw, _ = raw_request(cat, "GET", "/proxy/anthropic-direct/api/claude_code/settings")
    assert status == 404 and json.loads(raw)["error"] == "endpoint_not_governed"
    assert upstream.requests == []


def test_free_reads_are_forwarded_and_cost_nothing(cat, upstream):
    r = requests.get(cat.url + "/proxy/openai/v1/models", headers=ALICE, timeout=20)
    assert r.status_code == 200 and r.json()["object"] == "list"
    e = last_entry_for(cat, r.headers["X-Candela-Span-Id"])
    assert e["operation"] == "models.list" and e["cost_usd"] == 0 and e["path"] == "/v1/models"
    body = {"model": "claude-sonnet-4-20250514", "messages": [{"role": "user", "content": "hi"}]}
    r = requests.post(cat.url + "/proxy/anthropic-direct/v1/messages/count_tokens", json=body, headers=ALICE, timeout=20)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    e = last_entry_for(cat, r.headers["X-Candela-Span-Id"])
    assert e["operation"] == "messages.count_tokens" and e["cost_usd"] == 0 and e["estimate_usd"] == 0


@pytest.fixture(scope="module")
def reserve(tmp_path_factory, upstream, token_server):
    """candela-server with async jobs reserved, and no local runtime configured."""
    tmp = tmp_path_factory.mktemp("reserve")
    providers = {k: v for k, v in providers_config(upstream.url).items() if k not in ("ollama", "lmstudio")}
    cfg = base_config(upstream.url, providers=providers, governance={"async_jobs": "reserve", "budgets": {"default_daily_usd": 1000.0}})
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp)) as c:
        yield c


def test_async_jobs_reserve_charges_the_reservation(reserve, upstream):
    body = {"model": "gpt-4o-mini", "input": "hi", "background": True, "max_output_tokens": 500}
    r = requests.post(reserve.url + "/proxy/openai/v1/responses", json=body, headers=ALICE, timeout=20)
    assert r.status_code == 200, r.text
    assert [q.route for q in upstream.requests] == ["openai.responses"]
    e = last_entry_for(reserve, r.headers["X-Candela-Span-Id"])
    assert e["operation"] == "responses" and e["estimate_usd"] > 0
    # charged what was reserved, not only the few tokens the queued answer reports
    assert e["cost_usd"] == pytest.approx(e["estimate_usd"])
    me = requests.get(reserve.url + "/admin/v1/me", headers=ALICE, timeout=5).json()
    assert me["spent_today_usd"] == pytest.approx(e["estimate_usd"], rel=1e-6)


def test_candela_server_routes_local_runtimes_only_when_configured(reserve, upstream):
    for target in ("/proxy/ollama/api/chat", "/proxy/ollama/api/pull", "/proxy/lmstudio/v1/chat/completions"):
        status, raw, _ = raw_request(reserve, "POST", target, {"model": "llama3.2:3b", "messages": []})
        assert status == 404 and json.loads(raw)["error"] == "not_found"
    assert upstream.requests == []


def test_refusals_are_counted_by_their_code(cat, upstream):
    raw_request(cat, "GET", "/proxy/openai/v1/files")
    raw_request(cat, "GET", "/proxy/openai/v1/x/../files")
    metrics = requests.get(cat.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5).text
    assert 'candela_denials_total{error="endpoint_not_governed"}' in metrics
    assert 'candela_denials_total{error="invalid_request_target"}' in metrics
    assert upstream.requests == []
