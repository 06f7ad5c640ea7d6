"""Health and LocalApi: the routes Candela answers itself, and 404 for any route nobody claimed."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.localapi import Health, LocalApi
from candela_mitm.addons.router import Router
from candela_mitm.addons.spans import Spans
from candela_mitm.observability.spans import Span

from .conftest import ALICE_KEY, BASE, make_flow, run_hooks
from .test_auth import authenticate

ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}


def through(rt, flow, *addons):
    asyncio.run(run_hooks([Router(rt), Health(), Auth(rt), *addons], flow, "requestheaders", "request"))
    return flow


@pytest.mark.parametrize("path", ["/healthz", "/healthz/"])
def test_health_answers_before_authentication(tctx, runtime, path):
    flow = through(runtime(), make_flow(path, method="GET"))  # no credential
    assert flow.response.status_code == 200 and flow.response.json() == {"status": "ok"}


def test_health_leaves_other_routes(tctx, runtime):
    flow = make_flow("/v1/models", method="GET")
    asyncio.run(run_hooks([Router(runtime()), Health()], flow, "requestheaders"))
    assert flow.response is None


def test_models_lists_local_models_first_then_every_priced_model(tctx, runtime):
    rt = runtime()
    rt.local_models = {"gpt-4o-mini": "lmstudio", "llama3.2:3b": "ollama"}  # a local name wins
    api = LocalApi(rt)
    flow = through(rt, make_flow("/v1/models", method="GET", headers=ALICE), api)
    assert flow.response.status_code == 200
    body = flow.response.json()
    ids = [m["id"] for m in body["data"]]
    assert body["object"] == "list"
    assert ids[:2] == ["gpt-4o-mini", "llama3.2:3b"] and ids.count("gpt-4o-mini") == 1
    assert body["data"][0]["owned_by"] == "lmstudio"
    priced = {p.model for p in rt.pricing.models()}
    assert set(ids[2:]) == priced - {"gpt-4o-mini"}
    assert all(m["created"] == api.started for m in body["data"])


def test_models_is_get_only(tctx, runtime):
    rt = runtime()
    flow = through(rt, make_flow("/v1/models", method="POST", headers=ALICE), LocalApi(rt))
    assert flow.response.status_code == 405
    assert flow.response.json()["error"] == "method_not_allowed"


def test_models_needs_a_caller_where_auth_is_required(tctx, runtime):
    rt = runtime()
    flow = through(rt, make_flow("/v1/models", method="GET"), LocalApi(rt))
    assert flow.response.status_code == 401


@pytest.mark.parametrize("limit, expected", [(None, 3), ("2", 2), ("nonsense", 3), ("0", 1)])
def test_traces_lists_recent_spans_newest_first(tctx, runtime, limit, expected):
    # an admin sees every span (a developer only their own: see the table at the end)
    rt = runtime({**BASE, "auth": {**BASE["auth"], "admins": ["alice@example.com"]}})
    spans = Spans(rt)
    sent = []
    for _ in range(3):  # three proxied requests, denied before forwarding (no credential)
        f = through(rt, make_flow("/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"}))
        spans.response(f)
        sent.append(ctx_of(f).span_id)
    path = "/_local/api/traces" + (f"?limit={limit}" if limit else "")
    flow = through(rt, make_flow(path, method="GET", headers=ALICE), LocalApi(rt))
    body = flow.response.json()
    assert body["count"] == expected
    assert [s["span_id"] for s in body["spans"]] == sent[::-1][:expected]
    assert body["spans"][0]["status"] == "denied" and body["spans"][0]["error"] == "unauthenticated"


@pytest.mark.parametrize("path", ["/nothing/here", "/_local/unknown", "/admin/v1/me", "/metrics"])
def test_a_route_nobody_claimed_is_404(tctx, runtime, path):
    rt = runtime()  # Admin, LocalUi and Metrics are left out: nobody claims these here
    flow = through(rt, make_flow(path, method="GET", headers=ALICE), LocalApi(rt))
    assert flow.response.status_code == 404
    assert flow.response.json() == {"error": "not_found", "message": f"No route for '{path}'", "path": path}


def test_a_planned_request_is_not_answered(tctx, runtime):
    rt = runtime()
    flow = through(rt, make_flow("/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"},
                                 headers=ALICE), LocalApi(rt))
    assert flow.response is None and ctx_of(flow).plan is not None


@pytest.mark.parametrize(
    "command, who, sees",
    [
        ("server", "alice@example.com", {"alice@example.com"}),  # a developer: their own
        ("server", "boss@example.com", {"alice@example.com", "bob@example.com"}),  # an admin
        ("local", None, {"alice@example.com", "bob@example.com"}),  # the laptop's one user
    ],
)
def test_traces_show_a_developer_only_their_own_spans(make_runtime, command, who, sees):
    boss_key = "cdl_boss_key"
    rt = make_runtime(
        command,
        admins=["boss@example.com"],
        api_keys=[
            *BASE["auth"]["api_keys"],
            {"sha256": hashlib.sha256(boss_key.encode()).hexdigest(), "user": "boss@example.com"},
        ],
    )
    for i, user in enumerate(["alice@example.com", "bob@example.com"] * 2):
        rt.spans.add(Span(f"s{i}", "t", None, "2026-01-01T00:00:00Z", user=user))
    key = {"alice@example.com": ALICE_KEY, "boss@example.com": boss_key}.get(who or "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    flow = authenticate(rt, headers, path="/_local/api/traces")
    LocalApi(rt).request(flow)
    assert flow.response is not None and flow.response.status_code == 200
    assert {s["user"] for s in json.loads(flow.response.content)["spans"]} == sees
