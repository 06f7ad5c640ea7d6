"""Admin addon: the /admin/v1 API behind Auth, answered off the event loop, every change audited."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from candela_mitm.addons.admin import Admin
from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.router import Router

from .conftest import ALICE_KEY, ALICE_SHA, audit_entries, make_flow, run_hooks

ADMIN_KEY = "cdl_admin_example_key_0123456789"
CFG = {
    "providers": {"openai": {"base_url": "http://upstream.test:8080"}},
    "auth": {
        "api_keys": [
            {"sha256": ALICE_SHA, "user": "alice@example.com"},
            {"sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "user": "root@example.com"},
        ],
        "admins": ["root@example.com"],
    },
    "users": {"alice@example.com": {"tenants": ["research-team"]}},
}
KEYS = {"alice": ALICE_KEY, "root": ADMIN_KEY}


def call(rt, method, path, as_=None, body=None):
    headers = {"Authorization": f"Bearer {KEYS[as_]}"} if as_ else {}
    flow = make_flow("/admin/v1" + path, body, method=method, headers=headers)
    asyncio.run(run_hooks([Router(rt), Auth(rt), Admin(rt)], flow, "requestheaders", "request"))
    return flow


@pytest.mark.parametrize(
    "as_, method, path, status, error",
    [
        (None, "GET", "/me", 401, "unauthenticated"),
        ("alice", "GET", "/me", 200, None),
        ("alice", "GET", "/users", 403, "forbidden"),
        ("alice", "PUT", "/users/alice%40example.com", 403, "forbidden"),
        ("root", "GET", "/users", 200, None),
        ("root", "GET", "/nothing", 404, "not_found"),
        ("root", "DELETE", "/me", 405, "method_not_allowed"),
        ("root", "GET", "/usage?colour=blue", 400, "invalid_parameter"),
        ("alice", "GET", "/openapi.json", 200, None),
    ],
)
def test_routes_roles_and_denials(tctx, runtime, as_, method, path, status, error):
    rt = runtime(CFG)
    flow = call(rt, method, path, as_, {} if method in ("PUT", "POST") else None)
    assert flow.response.status_code == status
    assert flow.response.headers["Content-Type"] == "application/json"
    assert flow.response.json().get("error") == error
    assert ctx_of(flow).denial_code == error
    assert ctx_of(flow).status_code == status


def test_me_names_the_caller(tctx, runtime):
    rt = runtime(CFG)
    me = call(rt, "GET", "/me", "alice").response.json()
    assert (me["user_id"], me["role"], me["via"]) == ("alice@example.com", "developer", "api_key")
    assert me["tenants"] == ["research-team"]


def test_a_change_is_audited_then_applies_to_the_next_request(tctx, runtime):
    rt = runtime(CFG)
    flow = call(rt, "PUT", "/users/alice%40example.com", "root", {"requests_per_minute": 7})
    assert flow.response.status_code == 200
    assert flow.response.json()["requests_per_minute"] == 7
    [entry] = audit_entries(rt, "admin_action")
    assert (entry["actor"], entry["action"], entry["target"]) == (
        "root@example.com", "user.update", "alice@example.com")
    assert entry["after"]["requests_per_minute"] == 7
    assert entry["request_id"] == ctx_of(flow).span_id
    assert rt.users.settings("alice@example.com").requests_per_minute == 7


def test_a_body_over_the_limit_is_413_before_the_api_sees_it(tctx, runtime):
    rt = runtime({**CFG, "limits": {"max_body_bytes": 1000}})
    flow = make_flow("/admin/v1/users/alice%40example.com", method="PUT",
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                     raw=json.dumps({"tenants": ["x" * 2000]}).encode())
    asyncio.run(run_hooks([Router(rt), Auth(rt), Admin(rt)], flow, "requestheaders", "request"))
    assert flow.response.status_code == 413
    assert audit_entries(rt, "admin_action") == []


def test_other_routes_are_left_alone(tctx, runtime):
    rt = runtime(CFG)
    flow = make_flow("/v1/models", method="GET", headers={"Authorization": f"Bearer {ALICE_KEY}"})
    asyncio.run(run_hooks([Router(rt), Auth(rt), Admin(rt)], flow, "requestheaders", "request"))
    assert flow.response is None
