"""Tenant admins in the admin API: they read and act on their own tenants only, enforced by the API."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from candela_mitm.admin.handlers import AdminApi
from candela_mitm.admin.routes import AdminRequest, AdminResponse
from candela_mitm.config import parse_config
from candela_mitm.governance.ledger import Reservation
from candela_mitm.runtime import Runtime, build_runtime
from tests.core.admin.support import _REGISTRY, _schema_of, admin_actions

ADMIN = "admin@example.com"
TARA = "tara@example.com"  # tenant admin of research-team
RITA = "rita@example.com"  # developer in research-team only
ALICE = "alice@example.com"  # developer in research-team and other-team (shared)
OSCAR = "oscar@example.com"  # developer in other-team only
BOSS = "boss@example.com"  # an admin who is also in research-team
ROLES = {ADMIN: "admin", TARA: "tenant_admin", RITA: "developer", ALICE: "developer"}
GRANT = {"amount_usd": 2.0, "expires_at": "2099-01-01T00:00:00Z", "reason": "launch week"}


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    cfg = parse_config(
        {
            "state": {"sqlite_path": str(tmp_path / "state.db")},
            "audit": {"sqlite_path": str(tmp_path / "audit.db")},
            "auth": {
                "api_keys": [{"sha256": sha(u), "user": u} for u in (ADMIN, TARA, RITA)],
                "admins": [ADMIN],
            },
            "users": {
                TARA: {"role": "tenant_admin", "tenants": ["research-team"]},
                RITA: {"tenants": ["research-team"]},
                ALICE: {"tenants": ["research-team", "other-team"]},
                OSCAR: {"tenants": ["other-team"]},
                BOSS: {"role": "admin", "tenants": ["research-team"]},
            },
            "governance": {
                "budgets": {"default_daily_usd": 100.0},
                "tenants": {"research-team": {"budget_usd": 500}, "other-team": {"budget_usd": 9}},
                "models": {
                    "allowed": ["gpt-4o-mini", "gpt-4o"],
                    "tenants": {
                        "research-team": {"models": {"allowed": ["gpt-4o", "claude-*"]}},
                        "other-team": {"models": {"mode": "blocklist", "blocked": ["o1-pro"]}},
                    },
                },
                "rate_limits": {"default_requests_per_minute": 90},
            },
        }
    )
    runtime = build_runtime(cfg, "server")
    for user, tenant, cost in (
        (RITA, "research-team", 1.0),
        (ALICE, "research-team", 2.0),
        (ALICE, "other-team", 4.0),
        (OSCAR, "other-team", 8.0),
    ):
        r = runtime.ledger.reserve(user, tenant, 0.0, 100.0, "req")
        assert isinstance(r, Reservation)
        assert runtime.ledger.settle(r, cost, 100, 10, "gpt-4o", "openai").applied
    yield runtime
    runtime.close()
    runtime.store.close()


def call(rt: Runtime, method: str, path: str, body: Any = None, as_: str = TARA) -> AdminResponse:
    data = b"" if body is None else json.dumps(body).encode()
    role = ROLES.get(as_, "developer")
    resp = AdminApi(rt).handle(AdminRequest(method, path, as_, role, data, "api_key", "span-9"))
    Draft202012Validator(_schema_of(path, method, resp.status), registry=_REGISTRY).validate(
        resp.payload
    )
    return resp


def q(user: str) -> str:
    return user.replace("@", "%40")


def test_the_role_comes_from_the_config_and_the_api(rt):
    assert rt.users.settings(TARA).role == "tenant_admin"
    me = call(rt, "GET", "/admin/v1/me").payload
    assert (me["role"], me["tenants"]) == ("tenant_admin", ["research-team"])
    r = call(rt, "PUT", f"/admin/v1/users/{q(RITA)}", {"role": "tenant_admin"}, as_=ADMIN)
    assert r.status == 200 and r.payload["role"] == "tenant_admin"
    assert rt.users.settings(RITA).role == "tenant_admin"
    r = call(rt, "PUT", f"/admin/v1/users/{q(RITA)}", {"role": "owner"}, as_=ADMIN)
    assert (r.status, r.payload["error"], r.payload["field"]) == (400, "invalid_parameter", "role")


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("PUT", f"/admin/v1/users/{q(RITA)}", {"daily_budget_usd": 1000}),
        ("DELETE", f"/admin/v1/users/{q(RITA)}", None),
        ("PUT", "/admin/v1/tenants/research-team", {"budget_usd": 10_000}),
        ("POST", f"/admin/v1/users/{q(OSCAR)}/grants", GRANT),  # another tenant's user
        ("POST", f"/admin/v1/users/{q(ALICE)}/grants", GRANT),  # shared with another tenant
        ("POST", f"/admin/v1/users/{q(BOSS)}/grants", GRANT),  # an admin
        ("POST", f"/admin/v1/users/{q(TARA)}/grants", GRANT),  # itself
        ("POST", f"/admin/v1/users/{q('nobody@example.com')}/grants", GRANT),
        ("GET", f"/admin/v1/users/{q(OSCAR)}/grants", None),
        ("POST", "/admin/v1/keys", {"user_id": OSCAR}),
        ("POST", "/admin/v1/keys", {"user_id": BOSS}),  # an admin key: never
        ("POST", "/admin/v1/keys", {"user_id": ALICE}),
        ("GET", f"/admin/v1/keys?user={q(OSCAR)}", None),
        ("GET", "/admin/v1/usage?tenant=other-team", None),
        ("GET", f"/admin/v1/usage?user={q(OSCAR)}", None),
    ],
)
def test_everything_outside_its_tenants_is_forbidden_and_changes_nothing(rt, method, path, body):
    before = admin_actions(rt)
    r = call(rt, method, path, body)
    assert (r.status, r.payload["error"]) == (403, "forbidden"), r.payload
    assert admin_actions(rt) == before
    assert rt.store.api_keys() == []
    assert all(rt.ledger.list_grants(u, rt.ledger.clock()) == [] for u in (OSCAR, ALICE, TARA))


def test_it_sees_its_tenants_users_with_only_its_tenants_and_their_spend_there(rt):
    users = {u["user_id"]: u for u in call(rt, "GET", "/admin/v1/users").payload["users"]}
    assert set(users) == {TARA, RITA, ALICE, BOSS}
    assert users[ALICE]["tenants"] == ["research-team"]  # other-team is not named
    assert users[ALICE]["spent_today_usd"] == pytest.approx(2.0)  # not the 4.0 in other-team
    assert users[RITA]["spent_today_usd"] == pytest.approx(1.0)
    tenants = call(rt, "GET", "/admin/v1/tenants").payload["tenants"]
    assert [(t["tenant_id"], t["spent_usd"]) for t in tenants] == [("research-team", 3.0)]


def test_usage_and_leaderboard_count_only_its_tenants(rt):
    u = call(rt, "GET", "/admin/v1/usage").payload
    assert (u["spend_usd"], u["requests"]) == (pytest.approx(3.0), 2)
    u = call(rt, "GET", f"/admin/v1/usage?user={q(ALICE)}").payload
    assert u["spend_usd"] == pytest.approx(2.0)
    u = call(rt, "GET", "/admin/v1/usage?tenant=research-team&since=2000-01-01").payload
    assert (u["tenant_id"], u["since"], u["spend_usd"]) == (
        "research-team",
        "2000-01-01",
        pytest.approx(3.0),
    )
    by_tenant = call(rt, "GET", "/admin/v1/leaderboard?by=tenant").payload["rows"]
    assert [(r["key"], r["spend_usd"]) for r in by_tenant] == [("research-team", 3.0)]
    by_user = call(rt, "GET", "/admin/v1/leaderboard?by=user&limit=1").payload["rows"]
    assert [(r["rank"], r["key"], r["spend_usd"]) for r in by_user] == [(1, ALICE, 2.0)]
    # an admin's leaderboard is the whole picture
    everyone = call(rt, "GET", "/admin/v1/leaderboard?by=user", as_=ADMIN).payload["rows"]
    assert [r["key"] for r in everyone] == [OSCAR, ALICE, RITA]
    r = call(rt, "GET", "/admin/v1/leaderboard?by=model")
    assert (r.status, r.payload["parameter"]) == (400, "by")


def test_it_grants_and_mints_for_its_developers_audited_with_itself_as_actor(rt):
    r = call(rt, "POST", f"/admin/v1/users/{q(RITA)}/grants", GRANT)
    assert r.status == 201 and (r.payload["user_id"], r.payload["actor"]) == (RITA, TARA)
    assert call(rt, "GET", f"/admin/v1/users/{q(RITA)}/grants").payload["remaining_usd"] == 2.0
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": RITA, "name": "ci"})
    assert r.status == 201 and r.payload["user_id"] == RITA and r.payload["key"].startswith("cdk_")
    rita_key = r.payload["id"]
    own = call(rt, "POST", "/admin/v1/keys", {"name": "mine"}).payload
    assert own["user_id"] == TARA
    oscar_key = call(rt, "POST", "/admin/v1/keys", {"user_id": OSCAR}, as_=ADMIN).payload["id"]

    listed = call(rt, "GET", "/admin/v1/keys").payload
    assert {k["id"] for k in listed["keys"]} == {rita_key, own["id"]}
    assert call(rt, "GET", f"/admin/v1/keys?user={q(RITA)}").payload["count"] == 1
    # another tenant's key is "not there" (as for a developer), and stays active
    for method, path in (("DELETE", ""), ("POST", "/rotate")):
        r = call(rt, method, f"/admin/v1/keys/{oscar_key}{path}", {} if method == "POST" else None)
        assert (r.status, r.payload["error"]) == (404, "key_not_found")
    r = call(rt, "POST", f"/admin/v1/keys/{rita_key}/rotate", {"grace_s": 0})
    assert r.status == 201 and r.payload["replaces"]["id"] == rita_key
    assert call(rt, "DELETE", f"/admin/v1/keys/{r.payload['id']}").payload["state"] == "revoked"
    states = {k.key_id: k.revoked_us for k in rt.store.api_keys()}
    assert states[oscar_key] is None

    done = [(a["actor"], a["action"], a["target"]) for a in admin_actions(rt)]
    assert (TARA, "grant.create", RITA) in done
    assert (TARA, "key.create", RITA) in done
    assert (TARA, "key.rotate", RITA) in done
    assert (TARA, "key.revoke", RITA) in done


def test_its_audit_log_holds_its_tenants_and_its_own_actions_only(rt):
    call(rt, "POST", f"/admin/v1/users/{q(RITA)}/grants", GRANT)
    call(rt, "POST", f"/admin/v1/users/{q(OSCAR)}/grants", GRANT, as_=ADMIN)
    call(rt, "PUT", "/admin/v1/tenants/other-team", {"budget_usd": 50}, as_=ADMIN)
    call(rt, "PUT", "/admin/v1/tenants/research-team", {"budget_usd": 600}, as_=ADMIN)
    rt.audit.record("llm_request", user_id=OSCAR, tenant_id="other-team", cost_usd=1.0)
    rt.audit.record("llm_request", user_id=ALICE, tenant_id="research-team", cost_usd=1.0)
    rt.audit.record("proxy_start")
    assert rt.audit.flush(5)
    entries = call(rt, "GET", "/admin/v1/audit?limit=1000").payload["entries"]
    seen = [
        (e["action"], e["tenant_id"], e["fields"].get("action"), e["fields"].get("target"))
        for e in entries
    ]
    assert ("llm_request", "research-team", None, None) in seen
    assert ("admin_action", None, "grant.create", RITA) in seen
    assert ("admin_action", None, "tenant.update", "research-team") in seen
    for action, tenant, _what, target in seen:
        assert tenant in (None, "research-team")
        assert target not in (OSCAR, "other-team")
        assert action != "proxy_start"
    everything = call(rt, "GET", "/admin/v1/audit?limit=1000", as_=ADMIN).payload["entries"]
    assert len(everything) > len(entries)
    r = call(rt, "GET", "/admin/v1/audit?action=llm_request&user=" + q(OSCAR))
    assert r.status == 200 and r.payload["entries"] == []


def test_a_developer_is_not_widened_by_the_tenant_admin_routes(rt):
    for method, path in (
        ("GET", "/admin/v1/users"),
        ("GET", "/admin/v1/leaderboard"),
        ("GET", "/admin/v1/audit"),
        ("GET", f"/admin/v1/users/{q(RITA)}/grants"),
    ):
        r = call(rt, method, path, as_=RITA)
        assert (r.status, r.payload["error"]) == (403, "forbidden")
