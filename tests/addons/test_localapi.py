"""Health and LocalApi: the routes Candela answers itself, and 404 for any route nobody claimed."""

from __future__ import annotations

import asyncio

import pytest

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.localapi import Health, LocalApi
from candela_mitm.addons.router import Router
from candela_mitm.addons.spans import Spans

from .conftest import ALICE_KEY, make_flow, run_hooks

ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}


def through(rt, flow, *addons):
    asyncio.run(run_hooks([Router(rt), Health(), Auth(rt), *addons], flow, "requestheaders", "request"))
    return flow


@pytest.mark.parametrize("path", ["/healthz", "/healthz/"])
def test_health_answers_before_authentication(tctx, store_runtime, path):
    flow = through(store_runtime(), make_flow(path, method="GET"))  # no credential
    assert flow.response.status_code == 200 and flow.response.json() == {"status": "ok"}


def test_health_leaves_other_routes(tctx, store_runtime):
    flow = make_flow("/v1/models", method="GET")
    asyncio.run(run_hooks([Router(store_runtime()), Health()], flow, "requestheaders"))
    assert flow.response is None


def test_models_lists_local_models_first_then_every_priced_model(tctx, store_runtime):
    rt = store_runtime()
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


def test_models_is_get_only(tctx, store_runtime):
    rt = store_runtime()
    flow = through(rt, make_flow("/v1/models", method="POST", headers=ALICE), LocalApi(rt))
    assert flow.response.status_code == 405
    assert flow.response.json()["error"] == "method_not_allowed"


def test_models_needs_a_caller_where_auth_is_required(tctx, store_runtime):
    rt = store_runtime()
    flow = through(rt, make_flow("/v1/models", method="GET"), LocalApi(rt))
    assert flow.response.status_code == 401


@pytest.mark.parametrize("limit, expected", [(None, 3), ("2", 2), ("nonsense", 3), ("0", 1)])
def test_traces_lists_recent_spans_newest_first(tctx, store_runtime, limit, expected):
    rt = store_runtime()
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
def test_a_route_nobody_claimed_is_404(tctx, store_runtime, path):
    rt = store_runtime()  # Admin, LocalUi and Metrics are left out: nobody claims these here
    flow = through(rt, make_flow(path, method="GET", headers=ALICE), LocalApi(rt))
    assert flow.response.status_code == 404
    assert flow.response.json() == {"error": "not_found", "message": f"No route for '{path}'", "path": path}


def test_a_planned_request_is_not_answered(tctx, store_runtime):
    rt = store_runtime()
    flow = through(rt, make_flow("/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"},
                                 headers=ALICE), LocalApi(rt))
    assert flow.response is None and ctx_of(flow).plan is not None
