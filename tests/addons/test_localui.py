"""LocalUi addon: `candela`'s management page and API under /_local/ (inert in candela-server)."""

from __future__ import annotations

import asyncio

import pytest

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.localui import PAGE_HEADERS, LocalUi
from candela_mitm.addons.modelpolicy import ModelPolicy
from candela_mitm.addons.router import Router

from .conftest import BASE, audit_entries, make_flow, run_hooks


def call(rt, method, path, body=None, headers=None, ui=None):
    flow = make_flow("/_local" + path, body, method=method, headers=headers)
    addons = [Router(rt), Auth(rt), ModelPolicy(rt), ui or LocalUi(rt)]
    asyncio.run(run_hooks(addons, flow, "requestheaders", "request"))
    return flow


@pytest.fixture
def local(runtime):
    return runtime(command="local")


@pytest.mark.parametrize(
    "path, ctype",
    [
        ("/", "text/html; charset=utf-8"),
        ("", "text/html; charset=utf-8"),
        ("/static/local.css", "text/css; charset=utf-8"),
        ("/static/base.css", "text/css; charset=utf-8"),
        ("/static/local.js", "text/javascript; charset=utf-8"),
    ],
)
def test_the_page_and_its_assets(tctx, local, path, ctype):
    flow = call(local, "GET", path)
    assert flow.response.status_code == 200
    assert flow.response.headers["Content-Type"] == ctype
    for k, v in PAGE_HEADERS.items():
        assert flow.response.headers[k] == v
    assert flow.response.content


@pytest.mark.parametrize(
    "method, path, headers, status, error",
    [
        ("GET", "/static/secret.txt", {}, 404, "not_found"),
        ("POST", "/api/health", {}, 405, "method_not_allowed"),
        ("DELETE", "/api/config", {}, 405, "method_not_allowed"),
        # a page elsewhere may not drive the API (browsers send Origin on cross-site POSTs)
        ("POST", "/api/stop", {"Origin": "http://evil.example"}, 403, "forbidden"),
        ("POST", "/api/config", {"Origin": "http://evil.example"}, 403, "forbidden"),
    ],
)
def test_refusals(tctx, local, method, path, headers, status, error):
    flow = call(local, method, path, {} if method == "POST" else None, headers)
    assert flow.response.status_code == status
    assert flow.response.json()["error"] == error


def test_a_wrong_method_names_the_allowed_ones(tctx, local):
    flow = call(local, "PUT", "/api/config", {})
    assert flow.response.headers["Allow"] == "GET, POST"


def test_an_unknown_local_route_is_left_for_localapi(tctx, local):
    flow = call(local, "GET", "/api/unknown")
    assert flow.response is None


def test_config_is_read_and_a_change_is_audited_first(tctx, local):
    before = call(local, "GET", "/api/config").response.json()
    assert before["cache_ttl_s"] == 3600
    flow = call(local, "POST", "/api/config", {"cache_ttl_s": 60},
                {"Origin": "http://127.0.0.1:8181", "Host": "127.0.0.1:8181"})
    assert flow.response.status_code == 200 and flow.response.json()["cache_ttl_s"] == 60
    [entry] = audit_entries(local, "local_config_change")
    assert entry["before"]["cache_ttl_s"] == 3600 and entry["after"]["cache_ttl_s"] == 60
    assert call(local, "GET", "/api/config").response.json()["cache_ttl_s"] == 60


def test_an_invalid_config_changes_nothing(tctx, local):
    flow = call(local, "POST", "/api/config", {"cache_ttl_s": -1})
    assert flow.response.status_code == 400 and flow.response.json()["error"] == "bad_request"
    assert audit_entries(local, "local_config_change") == []


@pytest.mark.parametrize("body", [{}, {"model": ""}, {"model": "x" * 300}, ["llama3.2"]])
def test_a_pull_needs_a_model_name(tctx, local, body):
    flow = call(local, "POST", "/api/pull", body)
    assert flow.response.status_code == 400 and flow.response.json()["error"] == "bad_request"


def test_a_pull_is_planned_to_ollama_and_audited(tctx, local):
    flow = call(local, "POST", "/api/pull", {"model": "llama3.2:3b"})
    c = ctx_of(flow)
    assert flow.response is None  # the Upstream addon sends it on
    assert c.plan is not None and c.plan.upstream.name == "ollama"
    assert c.plan.path.endswith("/api/pull") and c.body == {"model": "llama3.2:3b", "stream": True}
    [entry] = audit_entries(local, "local_pull")
    assert (entry["model"], entry["runtime"]) == ("llama3.2:3b", "ollama")


@pytest.mark.parametrize("route, multiplier", [("google", 0.25), ("openai", None)])
def test_the_gemini_cache_price_is_set_on_the_plan(tctx, local, route, multiplier):
    path = {
        "google": "/proxy/google/v1beta/models/gemini-2.0-flash:generateContent",
        "openai": "/proxy/openai/v1/chat/completions",
    }[route]
    body = {"model": "gpt-4o-mini"} if route == "openai" else {"contents": []}
    flow = make_flow(path, body)
    asyncio.run(run_hooks([Router(local), Auth(local), LocalUi(local)], flow, "requestheaders", "request"))
    assert flow.response is None
    assert ctx_of(flow).cached_multiplier == multiplier


def test_candela_server_has_no_local_ui(tctx, runtime):
    rt = runtime({**BASE, "auth": {**BASE["auth"], "required": False}})
    flow = call(rt, "GET", "/")
    assert flow.response is None  # LocalApi answers 404 there


# --- a pull goes through the same audited model policy check as every planned request -----------


@pytest.mark.parametrize(
    "models, model, allowed",
    [
        ({}, "llama3.2:3b", True),
        ({"allowed": ["llama3.2:3b"]}, "llama3.2:3b", True),
        ({"allowed": ["llama3.2:3b"]}, "qwen2.5:7b", False),
        ({"blocked": ["qwen2.5:7b"]}, "qwen2.5:7b", False),
        ({"blocked": ["qwen2.5:7b"]}, "llama3.2:3b", True),
    ],
)
def test_a_pull_is_checked_and_audited_by_the_model_policy(tctx, runtime, models, model, allowed):
    rt = runtime({**BASE, "auth": {}, "users": {}, "governance": {"models": models}},
                       command="local")
    flow = call(rt, "POST", "/api/pull", {"model": model})
    c = ctx_of(flow)
    [check] = audit_entries(rt, "model_policy_check")
    assert (check["result"], check["model"], check["provider"]) == (
        "allowed" if allowed else "denied", model, "ollama")
    assert check["user_id"] == c.user and check["span_id"] == c.span_id
    assert c.policy == {**check, "timestamp": c.policy["timestamp"]}
    pulls = audit_entries(rt, "local_pull")
    if allowed:
        assert flow.response is None and c.plan is not None and len(pulls) == 1
    else:
        assert flow.response.status_code == 403
        assert flow.response.json()["error"] == "model_not_allowed"
        assert flow.response.json()["model"] == model
        assert c.plan is None and pulls == []  # nothing is pulled
        mode = "allowlist" if models.get("allowed") else "blocklist"
        assert rt.metrics.policy_denied.labels(model, "", mode)._value.get() == 1


def test_a_pull_whose_decision_cannot_be_audited_is_refused(tctx, local, monkeypatch):
    monkeypatch.setattr(local.audit, "record", lambda *a, **k: False)
    flow = call(local, "POST", "/api/pull", {"model": "llama3.2:3b"})
    assert flow.response.status_code == 503
    assert flow.response.json()["error"] == "governance_unavailable"
    assert ctx_of(flow).plan is None


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_compressed_bomb_on_the_local_api_is_413_and_changes_nothing(tctx, local, encoding):
    import gzip
    import zlib

    import brotli
    import zstandard

    body = b'{"cache_ttl_s": 60, "pad": "' + b" " * 5_000_000 + b'"}'
    packed = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }[encoding](body)
    before = call(local, "GET", "/api/config").response.json()
    flow = make_flow("/_local/api/config", method="POST", raw=packed,
                     headers={"Content-Encoding": encoding, "Content-Type": "application/json"})
    addons = [Router(local), Auth(local), ModelPolicy(local), LocalUi(local)]
    asyncio.run(run_hooks(addons, flow, "requestheaders", "request"))
    assert flow.response.status_code == 413 and flow.response.json()["error"] == "payload_too_large"
    assert call(local, "GET", "/api/config").response.json() == before
