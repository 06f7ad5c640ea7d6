"""ModelPolicy addon: every model decision audited (spec 002); a denied model never leaves."""

from __future__ import annotations

import asyncio

import pytest

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.modelpolicy import ModelPolicy
from candela_mitm.addons.router import Router

from .conftest import ALICE_KEY, BASE, audit_entries, make_flow, run_hooks

CHAT = "/proxy/openai/v1/chat/completions"
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}


def ask(rt, model, tenant=None, path=CHAT):
    headers = {**ALICE, **({"X-Candela-Tenant-Id": tenant} if tenant else {})}
    flow = make_flow(path, {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                     headers=headers)
    addons = [Router(rt), Auth(rt), ModelPolicy(rt)]
    asyncio.run(run_hooks(addons, flow, "requestheaders", "request"))
    return flow


# models config, tenant asked for, model -> allowed, policy mode, scope
TABLE = [
    ({}, None, "gpt-4o", True, "none", "global"),
    ({"mode": "allowlist", "allowed": ["gpt-4o-mini"]}, None, "gpt-4o-mini", True, "allowlist", "global"),
    ({"mode": "allowlist", "allowed": ["gpt-4o-mini"]}, None, "gpt-4o", False, "allowlist", "global"),
    ({"blocked": ["gpt-4o"]}, None, "gpt-4o", False, "blocklist", "global"),
    ({"blocked": ["gpt-4o"]}, None, "gpt-4o-mini", True, "blocklist", "global"),
    # a tenant's own policy replaces the global one, it is not merged with it
    (
        {"allowed": ["gpt-4o-mini"], "tenants": {"b": {"models": {"allowed": ["gpt-4o"]}}}},
        "b", "gpt-4o", True, "allowlist", "tenant",
    ),
    (
        {"allowed": ["gpt-4o-mini"], "tenants": {"b": {"models": {"allowed": ["gpt-4o"]}}}},
        "b", "gpt-4o-mini", False, "allowlist", "tenant",
    ),
    (
        {"allowed": ["gpt-4o-mini"], "tenants": {"b": {"models": {"allowed": ["gpt-4o"]}}}},
        "research-team", "gpt-4o", False, "allowlist", "global",
    ),
]


@pytest.mark.parametrize("models, tenant, model, allowed, mode, scope", TABLE)
def test_each_decision_is_audited_and_a_denial_is_403(
    tctx, runtime, models, tenant, model, allowed, mode, scope
):
    rt = runtime({**BASE, "governance": {"models": models}})
    flow = ask(rt, model, tenant)
    c = ctx_of(flow)
    expected_tenant = tenant or "research-team"
    assert c.policy is not None and c.policy["result"] == ("allowed" if allowed else "denied")
    [entry] = audit_entries(rt, "model_policy_check")
    assert entry["result"] == c.policy["result"]
    assert (entry["model"], entry["tenant_id"], entry["user_id"]) == (
        model, expected_tenant, "alice@example.com")
    assert (entry["policy_mode"], entry["policy_scope"], entry["provider"]) == (mode, scope, "openai")
    assert entry["span_id"] == c.span_id
    if allowed:
        assert flow.response is None and c.denial_code is None
    else:
        assert flow.response.status_code == 403
        assert flow.response.json() == {
            "error": "model_not_allowed",
            "message": flow.response.json()["message"],
            "model": model,
            "tenant_id": expected_tenant,
            "policy": mode,
        }
        assert c.denial_code == "model_not_allowed"
        denied = rt.metrics.policy_denied.labels(model, expected_tenant, mode)._value.get()
        assert denied == 1


def test_a_decision_the_audit_trail_refuses_is_no_decision(tctx, runtime, monkeypatch):
    rt = runtime()
    monkeypatch.setattr(rt.audit, "record", lambda *a, **k: False)  # queue full or closed
    flow = ask(rt, "gpt-4o-mini")
    assert flow.response.status_code == 503
    assert flow.response.json()["error"] == "governance_unavailable"


def test_a_request_without_a_model_is_not_checked(tctx, runtime):
    rt = runtime({**BASE, "governance": {"models": {"allowed": ["gpt-4o-mini"]}}})
    flow = make_flow("/proxy/openai/v1/models", method="GET", headers=ALICE)
    asyncio.run(run_hooks([Router(rt), Auth(rt), ModelPolicy(rt)], flow, "requestheaders", "request"))
    assert flow.response is None and ctx_of(flow).policy is None
    assert audit_entries(rt, "model_policy_check") == []


def test_an_answered_request_is_left_alone(tctx, runtime):
    rt = runtime({**BASE, "governance": {"models": {"allowed": ["gpt-4o-mini"]}}})
    flow = make_flow(CHAT, {"model": "gpt-4o"})  # no credential: Auth answers 401
    asyncio.run(run_hooks([Router(rt), Auth(rt), ModelPolicy(rt)], flow, "requestheaders", "request"))
    assert flow.response.status_code == 401
    assert audit_entries(rt, "model_policy_check") == []
