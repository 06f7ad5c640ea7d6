"""Admin API core on a real Runtime: routes, RBAC, validation, audit, the OpenAPI document."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from candela_mitm.admin.handlers import AdminApi
from candela_mitm.admin.openapi import openapi_document
from candela_mitm.admin.routes import ROUTES, AdminRequest, AdminResponse, match_route
from candela_mitm.audit import query_entries
from candela_mitm.config import parse_config
from candela_mitm.errors import StoreUnavailable
from candela_mitm.governance.ledger import Reservation
from candela_mitm.runtime import Runtime, build_runtime

ADMIN = "admin@example.com"
ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"
ROLES = {ADMIN: "admin", ALICE: "developer", BOB: "developer", CAROL: "developer"}
DOC = openapi_document()
_REGISTRY = Registry().with_resource("urn:candela-admin", DRAFT202012.create_resource(DOC))


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def q(user: str) -> str:
    return user.replace("@", "%40")


def future(days: float = 1.0) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    cfg = parse_config(
        {
            "state": {"sqlite_path": str(tmp_path / "state.db")},
            "audit": {"sqlite_path": str(tmp_path / "audit.db")},
            "auth": {
                "api_keys": [
                    {"sha256": sha("a"), "user": ALICE},
                    {"sha256": sha("b"), "user": BOB},
                    {"sha256": sha("c"), "user": ADMIN},
                ],
                "admins": [ADMIN],
            },
            "users": {
                ALICE: {
                    "tenants": ["research-team"],
                    "daily_budget_usd": 20.0,
                    "requests_per_minute": 120,
                }
            },
            "governance": {"budgets": {"default_daily_usd": 10.0}},
        }
    )
    runtime = build_runtime(cfg, "server")
    yield runtime
    runtime.close()
    runtime.store.close()


def _schema_of(path: str, method: str, status: int) -> dict[str, Any]:
    """The documented response schema of this call: every answer must be documented."""
    matched = match_route(path)
    routes = [] if not isinstance(matched, tuple) else matched[0]
    route = next((r for r in routes if r.method == method), None)
    if route is None or status == 405:
        return {"$ref": "urn:candela-admin#/components/schemas/Error"}
    responses = DOC["paths"][route.template][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {route.template} answers {status}, undocumented"
    resp = responses[str(status)]
    if "$ref" in resp:
        resp = DOC["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
    ref = resp["content"]["application/json"]["schema"]["$ref"]
    return {"$ref": "urn:candela-admin" + ref}


def call(
    rt: Runtime,
    method: str,
    path: str,
    body: Any = None,
    as_: str = ADMIN,
    raw: bytes | None = None,
    key_scope: Any = None,
) -> AdminResponse:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    resp = AdminApi(rt).handle(
        AdminRequest(method, path, as_, ROLES[as_], data, "api_key", "span-1", key_scope)
    )
    json.dumps(resp.payload)  # the addon sends it as JSON
    Draft202012Validator(_schema_of(path, method, resp.status), registry=_REGISTRY).validate(
        resp.payload
    )
    if resp.status >= 400:
        assert set(resp.payload) >= {"error", "message"}
    return resp


def admin_actions(rt: Runtime) -> list[dict[str, Any]]:
    """Committed admin_action entries, oldest first."""
    assert rt.audit.flush(5)
    entries = query_entries(rt.audit.db_path, action="admin_action", limit=1000)
    return [e["fields"] for e in reversed(entries)]


def spend(
    rt: Runtime, user: str, cost: float, tenant: str | None = "research-team", **kw: Any
) -> None:
    budget = rt.users.settings(user).daily_budget_usd  # settle draws this allowance first
    r = rt.ledger.reserve(user, tenant, 0.0, budget, "req", **kw)
    assert isinstance(r, Reservation)
    assert rt.ledger.settle(r, cost, 100, 10, "gpt-4o", "openai", **kw).applied


GRANT = {"amount_usd": 2.0, "expires_at": "2099-01-01T00:00:00Z", "reason": "launch week"}

# -- RBAC --------------------------------------------------------------------------------------

# method, path, body, admin status, developer (alice) status
RBAC = [
    ("GET", "/admin/v1/me", None, 200, 200),
    ("GET", "/admin/v1/users", None, 200, 403),
    ("PUT", f"/admin/v1/users/{q(CAROL)}", {"daily_budget_usd": 1}, 201, 403),
    ("PUT", f"/admin/v1/users/{q(ALICE)}", {"daily_budget_usd": 1}, 200, 403),
    ("DELETE", f"/admin/v1/users/{q(BOB)}", None, 200, 403),
    ("POST", f"/admin/v1/users/{q(BOB)}/grants", GRANT, 201, 403),
    ("GET", f"/admin/v1/users/{q(BOB)}/grants", None, 200, 403),
    ("GET", f"/admin/v1/users/{q(ALICE)}/grants", None, 200, 403),
    ("GET", "/admin/v1/usage", None, 200, 200),
    ("GET", f"/admin/v1/usage?user={q(ALICE)}", None, 200, 200),
    ("GET", f"/admin/v1/usage?user={q(BOB)}", None, 200, 403),
    ("GET", "/admin/v1/leaderboard?by=user", None, 200, 403),
    ("GET", "/admin/v1/tenants", None, 200, 403),
    ("POST", "/admin/v1/keys", {"user_id": BOB}, 201, 403),
    ("GET", "/admin/v1/keys", None, 200, 200),
    ("GET", f"/admin/v1/keys?user={q(BOB)}", None, 200, 403),
    ("DELETE", "/admin/v1/keys/k_0123456789abcdef", None, 404, 404),
    ("POST", "/admin/v1/keys/k_0123456789abcdef/rotate", {}, 404, 404),
    ("PUT", "/admin/v1/tenants/research-team", {"budget_usd": 5}, 201, 403),
    ("GET", "/admin/v1/audit", None, 200, 403),
    ("GET", "/admin/v1/openapi.json", None, 200, 200),
    ("GET", "/admin/v1/policy", None, 200, 200),
]


@pytest.mark.parametrize(("method", "path", "body", "admin_status", "dev_status"), RBAC)
def test_rbac(rt, method, path, body, admin_status, dev_status):
    dev = call(rt, method, path, body, as_=ALICE)
    assert dev.status == dev_status
    if dev_status == 403:
        assert dev.payload["error"] == "forbidden"
    assert admin_actions(rt) == []  # a refused caller changes nothing
    assert rt.store.list_users(include_deleted=True) == []
    assert call(rt, method, path, body).status == admin_status
    changes = method in ("PUT", "POST", "DELETE") and admin_status < 400
    assert len(admin_actions(rt)) == (1 if changes else 0)


def test_every_route_is_in_the_rbac_table():
    covered = set()
    for method, path, *_ in RBAC:
        matched = match_route(path)
        assert isinstance(matched, tuple)
        covered |= {(r.method, r.template) for r in matched[0] if r.method == method}
    assert covered == {(r.method, r.template) for r in ROUTES}


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "allow"),
    [
        ("GET", "/admin/v1/nope", 404, "not_found", None),
        ("GET", "/admin/v2/me", 404, "not_found", None),
        ("GET", "/admin/v1", 404, "not_found", None),
        ("GET", "/admin/v1/users/x/grants/y", 404, "not_found", None),
        ("GET", "/admin/v1/users//grants", 404, "not_found", None),
        ("POST", "/admin/v1/me", 405, "method_not_allowed", "GET"),
        ("PATCH", f"/admin/v1/users/{q(ALICE)}", 405, "method_not_allowed", "DELETE, PUT"),
        ("GET", f"/admin/v1/users/{q(ALICE)}", 405, "method_not_allowed", "DELETE, PUT"),
        ("DELETE", "/admin/v1/users/x/grants", 405, "method_not_allowed", "GET, POST"),
        ("GET", "/admin/v1/users/%ff/grants", 400, "bad_request", None),  # not UTF-8
    ],
)
def test_unknown_paths_and_methods(rt, method, path, status, code, allow):
    for who in (ADMIN, ALICE):
        r = call(rt, method, path, as_=who)
        assert (r.status, r.error) == (status, code)
        assert r.headers.get("Allow") == allow


@pytest.mark.parametrize("user", ["%20x", "x%20", "a%0ab", "a%7f", "x" * 321])
def test_bad_user_ids_are_400_for_admins_403_for_developers(rt, user):
    path = f"/admin/v1/users/{user}/grants"
    r = call(rt, "GET", path)
    assert (r.status, r.error, r.payload["parameter"]) == (400, "invalid_parameter", "user")
    assert call(rt, "GET", path, as_=ALICE).error == "forbidden"


def test_path_user_ids_are_percent_decoded(rt):
    r = call(rt, "PUT", "/admin/v1/users/dave%40example.com", {"tenants": ["x"]})
    assert r.status == 201 and r.payload["user_id"] == "dave@example.com"
    assert rt.users.settings("dave@example.com").tenants == ("x",)
    # an encoded slash stays inside the id; a trailing slash is the same route
    assert call(rt, "PUT", "/admin/v1/users/team%2Fbot", {}).payload["user_id"] == "team/bot"
    assert call(rt, "POST", "/admin/v1/users/team%2Fbot/grants/", GRANT).status == 201
    assert call(rt, "GET", "/admin/v1/users/team%2Fbot/grants").payload["user_id"] == "team/bot"
    assert call(rt, "GET", "/admin/v1/users/").status == 200


# -- users -------------------------------------------------------------------------------------

ALICE_CONFIG = {
    "role": "developer",
    "tenants": ["research-team"],
    "daily_budget_usd": 20.0,
    "budget_period": "daily",
    "requests_per_minute": 120,
    "max_concurrent_requests": None,
    "input_tokens_per_minute": None,
    "output_tokens_per_minute": None,
    "total_tokens_per_minute": None,
}
LIMITS = ("max_concurrent_requests", "input_tokens_per_minute", "output_tokens_per_minute",
          "total_tokens_per_minute")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"daily_budget_usd": 5},
        {"daily_budget_usd": 0},
        {"daily_budget_usd": 0.25},
        {"requests_per_minute": 3},
        {"requests_per_minute": 0},
        {"tenants": []},
        {"tenants": ["a", "b"]},
        {"role": "admin"},
        {"role": "developer", "daily_budget_usd": 1.5, "requests_per_minute": 7},
        {"budget_period": "monthly"},
        {"budget_period": "weekly", "daily_budget_usd": 70},
        {"max_concurrent_requests": 2, "total_tokens_per_minute": 5000},
        {"input_tokens_per_minute": 0, "output_tokens_per_minute": 10},
    ],
)
def test_partial_put_changes_only_what_it_names(rt, body):
    r = call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", body)
    want = {**ALICE_CONFIG, **body}
    assert r.status == 200  # alice exists (config): an update
    got = {k: r.payload[k] for k in want}
    assert got == want and r.payload["source"] == "store"
    s = rt.users.settings(ALICE)
    assert (
        s.role, list(s.tenants), s.daily_budget_usd, s.budget_period.kind, s.requests_per_minute,
        *(getattr(s, n) for n in LIMITS),
    ) == tuple(want.values())
    [entry] = admin_actions(rt)
    assert entry["before"] == ALICE_CONFIG and entry["after"] == want


def test_partial_puts_in_sequence_keep_earlier_changes(rt):
    path = f"/admin/v1/users/{q(CAROL)}"
    assert call(rt, "PUT", path, {"requests_per_minute": 5}).status == 201
    assert call(rt, "PUT", path, {"tenants": ["t1"]}).status == 200
    r = call(rt, "PUT", path, {"daily_budget_usd": 3})
    assert {k: r.payload[k] for k in ALICE_CONFIG} == {
        "role": "developer",
        "tenants": ["t1"],
        "daily_budget_usd": 3.0,
        "budget_period": "daily",
        "requests_per_minute": 5,
        **dict.fromkeys(LIMITS),
    }
    actions = admin_actions(rt)
    assert [a["action"] for a in actions] == ["user.create", "user.update", "user.update"]
    assert actions[0]["before"] is None
    assert actions[2]["before"]["requests_per_minute"] == 5
    assert all(a["actor"] == ADMIN and a["target"] == CAROL for a in actions)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"role": "root"}, "role"),
        ({"role": 1}, "role"),
        ({"tenants": "research-team"}, "tenants"),
        ({"tenants": [1]}, "tenants"),
        ({"tenants": ["a", "a"]}, "tenants"),
        ({"tenants": [""]}, "tenants"),
        ({"tenants": [" a"]}, "tenants"),
        ({"tenants": ["x" * 129]}, "tenants"),
        ({"tenants": None}, "tenants"),
        ({"daily_budget_usd": "5"}, "daily_budget_usd"),
        ({"daily_budget_usd": -1}, "daily_budget_usd"),
        ({"daily_budget_usd": True}, "daily_budget_usd"),
        ({"daily_budget_usd": None}, "daily_budget_usd"),
        ({"daily_budget_usd": 1e10}, "daily_budget_usd"),
        ({"requests_per_minute": 1.5}, "requests_per_minute"),
        ({"requests_per_minute": 60.5}, "requests_per_minute"),
        ({"requests_per_minute": -1}, "requests_per_minute"),
        ({"requests_per_minute": True}, "requests_per_minute"),
        ({"requests_per_minute": "60"}, "requests_per_minute"),
        ({"daily_budget_usd": 5, "nickname": "al"}, "nickname"),
    ],
)
def test_put_validation_names_the_field_and_changes_nothing(rt, body, field):
    r = call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", body)
    assert (r.status, r.error, r.payload["field"]) == (400, "invalid_parameter", field)
    assert field in r.payload["message"]
    assert rt.store.get_user(ALICE, include_deleted=True) is None
    assert admin_actions(rt) == []


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "bad_request"),
        (b"[1]", "bad_request"),
        (b'"x"', "bad_request"),
        (b"{", "invalid_json"),
        (b'{"daily_budget_usd": NaN}', "invalid_json"),
        (b'{"daily_budget_usd": Infinity}', "invalid_json"),
        (b"\xff\xfe{", "invalid_json"),
    ],
)
def test_put_body_must_be_a_json_object(rt, raw, code):
    r = call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", raw=raw)
    assert (r.status, r.error) == (400, code)
    assert admin_actions(rt) == []


def test_a_configured_admin_keeps_the_admin_role(rt):
    r = call(rt, "PUT", f"/admin/v1/users/{q(ADMIN)}", {"role": "developer"})
    assert (r.status, r.payload["field"]) == (400, "role")
    assert (
        call(rt, "PUT", f"/admin/v1/users/{q(ADMIN)}", {"daily_budget_usd": 1}).payload["role"]
        == "admin"
    )


def test_a_stored_role_takes_effect(rt):
    assert call(rt, "PUT", f"/admin/v1/users/{q(BOB)}", {"role": "admin"}).status == 200
    assert rt.users.settings(BOB).role == "admin"
    assert call(rt, "PUT", f"/admin/v1/users/{q(BOB)}", {"role": "developer"}).status == 200
    assert rt.users.settings(BOB).role == "developer"


def test_list_users_from_every_source(rt):
    call(rt, "PUT", f"/admin/v1/users/{q(CAROL)}", {"daily_budget_usd": 2})
    call(rt, "PUT", "/admin/v1/users/gone%40example.com", {})
    call(rt, "DELETE", "/admin/v1/users/gone%40example.com")
    spend(rt, "oidc-user@example.com", 0.75, tenant=None)
    spend(rt, ALICE, 1.25)
    r = call(rt, "GET", "/admin/v1/users")
    users = {u["user_id"]: u for u in r.payload["users"]}
    assert list(users) == sorted(users)
    assert set(users) == {ADMIN, ALICE, BOB, CAROL, "oidc-user@example.com"}
    assert r.payload["count"] == 5
    assert users[ALICE] | {} == {
        "user_id": ALICE,
        **ALICE_CONFIG,
        "source": "config",
        "spent_today_usd": 1.25,
    }
    assert (users[CAROL]["source"], users[CAROL]["daily_budget_usd"]) == ("store", 2.0)
    assert (users[ADMIN]["role"], users[BOB]["source"]) == ("admin", "default")
    assert users["oidc-user@example.com"]["spent_today_usd"] == 0.75


def test_delete_keeps_spend_and_audit_and_put_revives(rt):
    spend(rt, ALICE, 0.4)
    assert rt.audit.record("llm_request", user_id=ALICE, tenant_id="research-team", cost_usd=0.4)
    r = call(rt, "DELETE", f"/admin/v1/users/{q(ALICE)}")
    assert r.status == 200 and r.payload["deleted"] is True
    assert rt.users.settings(ALICE).deleted  # Auth refuses a deleted user
    assert ALICE not in {u["user_id"] for u in call(rt, "GET", "/admin/v1/users").payload["users"]}
    # spend history and audit entries stay
    usage = call(rt, "GET", f"/admin/v1/usage?user={q(ALICE)}").payload
    assert (usage["spend_usd"], usage["requests"]) == (0.4, 1)
    entries = call(rt, "GET", f"/admin/v1/audit?user={q(ALICE)}").payload["entries"]
    assert [e["action"] for e in entries] == ["llm_request"]
    [entry] = admin_actions(rt)
    assert entry == {
        "actor": ADMIN,
        "action": "user.delete",
        "target": ALICE,
        "before": ALICE_CONFIG,
        "after": None,
        "request_id": "span-1",
    }
    # gone: a second delete and a grant find nobody
    assert call(rt, "DELETE", f"/admin/v1/users/{q(ALICE)}").error == "user_not_found"
    assert call(rt, "POST", f"/admin/v1/users/{q(ALICE)}/grants", GRANT).error == "user_not_found"
    # PUT revives, with the settings the user had
    r = call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", {"requests_per_minute": 9})
    assert r.status == 201
    s = rt.users.settings(ALICE)
    assert not s.deleted and (s.tenants, s.daily_budget_usd, s.requests_per_minute) == (
        ("research-team",),
        20.0,
        9,
    )


@pytest.mark.parametrize(
    ("user", "status", "code"),
    [
        ("nobody@example.com", 404, "user_not_found"),
        (ADMIN, 400, "bad_request"),  # not yourself: the API would lose its admin
    ],
)
def test_delete_refusals(rt, user, status, code):
    r = call(rt, "DELETE", f"/admin/v1/users/{q(user)}")
    assert (r.status, r.error) == (status, code)
    assert admin_actions(rt) == []


# -- grants ------------------------------------------------------------------------------------


def test_grants_waterfall_shows_in_me(rt):
    call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", {"daily_budget_usd": 1.0})
    late = call(
        rt, "POST", f"/admin/v1/users/{q(ALICE)}/grants", {**GRANT, "expires_at": future(2)}
    )
    early = call(
        rt,
        "POST",
        f"/admin/v1/users/{q(ALICE)}/grants",
        {"amount_usd": 3.0, "expires_at": future(1), "reason": "incident"},
    )
    assert late.status == early.status == 201
    assert late.payload["id"] != early.payload["id"]
    me = call(rt, "GET", "/admin/v1/me", as_=ALICE).payload
    assert (me["daily_budget_usd"], me["spent_today_usd"], me["remaining_usd"]) == (1.0, 0.0, 6.0)
    # 2.5 draws the allowance (1.0), then the grant that expires first (1.5 of 3.0)
    spend(rt, ALICE, 2.5)
    me = call(rt, "GET", "/admin/v1/me", as_=ALICE).payload
    assert (me["spent_today_usd"], me["remaining_usd"]) == (2.5, 3.5)
    assert [(g["id"], g["remaining_usd"]) for g in me["grants"]] == [
        (early.payload["id"], 1.5),
        (late.payload["id"], 2.0),
    ]
    listed = call(rt, "GET", f"/admin/v1/users/{q(ALICE)}/grants").payload
    assert listed["remaining_usd"] == 3.5
    assert [(g["used_usd"], g["reason"], g["actor"]) for g in listed["grants"]] == [
        (1.5, "incident", ADMIN),
        (0.0, "launch week", ADMIN),
    ]
    actions = [a for a in admin_actions(rt) if a["action"] == "grant.create"]
    assert [a["after"]["id"] for a in actions] == [late.payload["id"], early.payload["id"]]
    assert all(a["before"] is None and a["target"] == ALICE for a in actions)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expires_at": "2099-01-01T00:00:00Z", "reason": "r"}, "amount_usd"),
        ({**GRANT, "amount_usd": 0}, "amount_usd"),
        ({**GRANT, "amount_usd": -1}, "amount_usd"),
        ({**GRANT, "amount_usd": 1e-12}, "amount_usd"),
        ({**GRANT, "amount_usd": "1"}, "amount_usd"),
        ({**GRANT, "amount_usd": False}, "amount_usd"),
        ({"amount_usd": 1, "reason": "r"}, "expires_at"),
        ({**GRANT, "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({**GRANT, "expires_at": "2099-01-01"}, "expires_at"),
        ({**GRANT, "expires_at": "2099-01-01T00:00:00"}, "expires_at"),
        ({**GRANT, "expires_at": "2099-02-30T00:00:00Z"}, "expires_at"),
        ({**GRANT, "expires_at": 4102444800}, "expires_at"),
        ({"amount_usd": 1, "expires_at": "2099-01-01T00:00:00Z"}, "reason"),
        ({**GRANT, "reason": "  "}, "reason"),
        ({**GRANT, "reason": 5}, "reason"),
        ({**GRANT, "id": "g_mine"}, "id"),
    ],
)
def test_grant_validation(rt, body, field):
    r = call(rt, "POST", f"/admin/v1/users/{q(ALICE)}/grants", body)
    assert (r.status, r.error, r.payload["field"]) == (400, "invalid_parameter", field)
    assert rt.ledger.list_grants(ALICE) == [] and admin_actions(rt) == []


def test_grant_expiry_with_an_offset(rt):
    r = call(
        rt,
        "POST",
        f"/admin/v1/users/{q(BOB)}/grants",
        {**GRANT, "expires_at": "2099-01-01T02:00:00+02:00"},
    )
    assert r.payload["expires_at"] == "2099-01-01T00:00:00Z"
    assert r.payload["remaining_usd"] == 2.0 and r.payload["expired"] is False


# -- fail closed -------------------------------------------------------------------------------


def test_no_change_when_the_audit_trail_refuses(rt):
    rt.audit.queue_max = 0  # the queue is "full": record() answers False
    try:
        put = call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", {"daily_budget_usd": 0})
        grant = call(rt, "POST", f"/admin/v1/users/{q(ALICE)}/grants", GRANT)
        delete = call(rt, "DELETE", f"/admin/v1/users/{q(ALICE)}")
    finally:
        rt.audit.queue_max = 100
    for r in (put, grant, delete):
        assert (r.status, r.error) == (503, "governance_unavailable")
    assert rt.store.get_user(ALICE, include_deleted=True) is None
    assert rt.ledger.list_grants(ALICE) == [] and admin_actions(rt) == []


def test_a_change_that_fails_after_its_audit_entry_is_marked_failed(rt, monkeypatch):
    def broken(record: Any) -> None:
        raise StoreUnavailable("disk gone")

    monkeypatch.setattr(rt.store, "put_user", broken)
    r = call(rt, "PUT", f"/admin/v1/users/{q(CAROL)}", {"daily_budget_usd": 1})
    assert (r.status, r.error) == (503, "governance_unavailable")
    intent, failed = admin_actions(rt)
    assert intent["action"] == failed["action"] == "user.create"
    assert "outcome" not in intent
    assert (failed["outcome"], failed["reason"]) == ("failed", "StoreUnavailable")


def test_store_unavailable_is_503(rt, monkeypatch):
    def broken(*a: Any, **kw: Any) -> None:
        raise StoreUnavailable("down")

    monkeypatch.setattr(rt.store, "get_user", broken)
    for who in (ADMIN, ALICE):
        r = call(rt, "GET", "/admin/v1/me", as_=who)
        assert (r.status, r.error) == (503, "governance_unavailable")


# -- usage and leaderboard ---------------------------------------------------------------------


@pytest.fixture
def history(rt: Runtime) -> Runtime:
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)
    spend(rt, ALICE, 1.0, "research-team", now=yesterday)
    spend(rt, ALICE, 2.0, "research-team", now=now)
    spend(rt, ALICE, 4.0, "other-team", now=now)
    spend(rt, BOB, 8.0, None, now=now)
    return rt


TODAY = datetime.now(UTC).date().isoformat()
YESTERDAY = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()


@pytest.mark.parametrize(
    ("who", "query", "spend_usd", "requests"),
    [
        (ADMIN, "", 15.0, 4),
        (ADMIN, f"user={q(ALICE)}", 7.0, 3),
        (ADMIN, f"user={q(ALICE)}&since={TODAY}", 6.0, 2),
        (ADMIN, f"user={q(ALICE)}&until={YESTERDAY}", 1.0, 1),
        (ADMIN, f"since={TODAY}T00:00:00Z", 14.0, 3),
        (ADMIN, "tenant=research-team", 3.0, 2),
        (ADMIN, "user=&tenant=", 15.0, 4),  # empty means absent
        (ALICE, "", 7.0, 3),  # a developer without user= gets their own
        (ALICE, f"user={q(ALICE)}&tenant=other-team", 4.0, 1),
        (BOB, "key=cdl_bob_key", 8.0, 1),  # ?key= carries a credential, never refused
    ],
)
def test_usage(history, who, query, spend_usd, requests):
    r = call(history, "GET", f"/admin/v1/usage?{query}", as_=who)
    assert r.status == 200
    assert (r.payload["spend_usd"], r.payload["requests"]) == (spend_usd, requests)
    assert sum(m["spend_usd"] for m in r.payload["models"]) == pytest.approx(spend_usd)
    if who != ADMIN:
        assert r.payload["user_id"] == who


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("/admin/v1/usage?since=yesterday", "since"),
        ("/admin/v1/usage?until=2026-13-01", "until"),
        ("/admin/v1/usage?since=2026-05-02&until=2026-05-01", "until"),
        ("/admin/v1/usage?model=gpt-4o", "model"),
        ("/admin/v1/usage?user=a&user=b", "user"),
        ("/admin/v1/leaderboard?by=model", "by"),
        ("/admin/v1/leaderboard?since=2026/05/01", "since"),
        ("/admin/v1/leaderboard?limit=ten", "limit"),
        ("/admin/v1/leaderboard?limit=0", "limit"),
        ("/admin/v1/audit?limit=-1", "limit"),
        ("/admin/v1/audit?limit=1.5", "limit"),
        ("/admin/v1/audit?limit=10001", "limit"),
        ("/admin/v1/audit?since=soon", "since"),
        ("/admin/v1/audit?before_seq=x", "before_seq"),
        ("/admin/v1/audit?before_seq=4611686018427387905", "before_seq"),  # 2**62 + 1
        ("/admin/v1/audit?action=LLM", "action"),
        ("/admin/v1/audit?action=" + "a" * 65, "action"),
        ("/admin/v1/audit?user=%20alice", "user"),
        ("/admin/v1/usage?tenant=a%0ab", "tenant"),
        ("/admin/v1/usage?tenant=" + "t" * 129, "tenant"),
        ("/admin/v1/usage?user=" + "u" * 321, "user"),
        ("/admin/v1/keys?user=a%7f", "user"),
        ("/admin/v1/usage?since=2026-05-01%2000:00:00Z", "since"),  # RFC 3339 needs the T
        ("/admin/v1/usage?since=%D9%A2%D9%A0%D9%A2%D9%A6-01-01", "since"),  # Arabic-Indic digits
        ("/admin/v1/usage?since=1969-12-31", "since"),
        ("/admin/v1/me?verbose=1", "verbose"),
    ],
)
def test_bad_query_parameters_are_400(rt, path, parameter):
    r = call(rt, "GET", path)
    assert (r.status, r.error, r.payload["parameter"]) == (400, "invalid_parameter", parameter)


@pytest.mark.parametrize(
    "method, path, body, parameter",
    [
        ("DELETE", "/admin/v1/keys/k_missing", None, "key"),
        ("POST", "/admin/v1/keys/k_0123456789ABCDEF/rotate", {}, "key"),
        ("PUT", "/admin/v1/tenants/%20t", {}, "tenant"),
        ("PUT", "/admin/v1/tenants/" + "t" * 129, {}, "tenant"),
        ("DELETE", "/admin/v1/users/a%09b", None, "user"),
    ],
)
def test_bad_path_parameters_are_400_naming_them(rt, method, path, body, parameter):
    r = call(rt, method, path, body)
    assert (r.status, r.error, r.payload["parameter"]) == (400, "invalid_parameter", parameter)
    assert r.payload["message"].startswith(f"Path parameter '{parameter}'")
    assert admin_actions(rt) == []


@pytest.mark.parametrize(
    "method, path, body",
    [
        # the year as written is in range; its UTC form may be a day either side
        ("GET", "/admin/v1/usage?since=1970-01-01T00:00:00%2B23:59", None),
        ("GET", "/admin/v1/usage?until=9998-12-31T23:59:59-23:59", None),
        ("GET", "/admin/v1/audit?since=2026-05-01t00:00:00.123456789z", None),
        ("GET", "/admin/v1/audit?before_seq=4611686018427387904", None),  # 2**62
        ("GET", "/admin/v1/audit?action=llm_request&user=alice%40example.com", None),
        ("GET", "/admin/v1/usage?tenant=research%20team", None),  # inner spaces are fine
        # JSON Schema's integers: 60.0 is one
        ("PUT", "/admin/v1/users/new@example.com", {"requests_per_minute": 60.0}),
        ("POST", f"/admin/v1/users/{ALICE}/grants", {**GRANT, "amount_usd": 1e-9}),
    ],
)
def test_edges_the_document_calls_valid_are_accepted(rt, method, path, body):
    assert call(rt, method, path, body).status in (200, 201)


def test_grants_below_one_nano_dollar_are_400(rt):
    r = call(rt, "POST", f"/admin/v1/users/{ALICE}/grants", {**GRANT, "amount_usd": 9e-10})
    assert (r.status, r.error, r.payload["field"]) == (400, "invalid_parameter", "amount_usd")


@pytest.mark.parametrize(
    ("query", "rows"),
    [
        ("", [("other-team", 4.0), (None, 8.0), ("research-team", 3.0)]),
        ("by=tenant", [(None, 8.0), ("other-team", 4.0), ("research-team", 3.0)]),
        ("by=user", [(BOB, 8.0), (ALICE, 7.0)]),
        ("by=user&limit=1", [(BOB, 8.0)]),
        (f"by=user&since={TODAY}", [(BOB, 8.0), (ALICE, 6.0)]),
        (f"by=tenant&until={YESTERDAY}", [("research-team", 1.0)]),
    ],
)
def test_leaderboard(history, query, rows):
    r = call(history, "GET", f"/admin/v1/leaderboard?{query}")
    got = [(row["key"], row["spend_usd"]) for row in r.payload["rows"]]
    want = sorted(rows, key=lambda kv: -kv[1])
    assert got == want
    assert [row["rank"] for row in r.payload["rows"]] == list(range(1, len(want) + 1))


# -- audit listing -----------------------------------------------------------------------------


def test_audit_listing_newest_first_with_filters_and_paging(rt):
    for budget in (1, 2, 3):
        call(rt, "PUT", f"/admin/v1/users/{q(BOB)}", {"daily_budget_usd": budget})
    rt.audit.record("llm_request", user_id=ALICE, cost_usd=0.1)
    everything = call(rt, "GET", "/admin/v1/audit").payload["entries"]
    seqs = [e["seq"] for e in everything]
    assert seqs == sorted(seqs, reverse=True)
    page = call(rt, "GET", "/admin/v1/audit?action=admin_action&limit=2").payload
    assert [e["fields"]["after"]["daily_budget_usd"] for e in page["entries"]] == [3, 2]
    assert page["next_before_seq"] == page["entries"][-1]["seq"]
    rest = call(
        rt,
        "GET",
        f"/admin/v1/audit?action=admin_action&limit=2&before_seq={page['next_before_seq']}",
    ).payload
    assert [e["fields"]["after"]["daily_budget_usd"] for e in rest["entries"]] == [1]
    assert rest["next_before_seq"] is None
    mine = call(rt, "GET", f"/admin/v1/audit?user={q(ADMIN)}&action=admin_action").payload
    assert mine["count"] == 3 and all(e["user_id"] == ADMIN for e in mine["entries"])
    first = page["entries"][0]
    assert first["fields"]["before"]["daily_budget_usd"] == 2
    assert first["fields"]["actor"] == ADMIN and first["fields"]["target"] == BOB
    assert call(rt, "GET", f"/admin/v1/audit?since={future(1)}").payload["count"] == 0
    assert call(rt, "GET", f"/admin/v1/audit?since={TODAY}").payload["count"] == len(everything)


def test_audit_listing_before_anything_was_written(tmp_path):
    cfg = parse_config(
        {
            "state": {"sqlite_path": str(tmp_path / "s.db")},
            "audit": {"sqlite_path": str(tmp_path / "a.db")},
            "auth": {"admins": [ADMIN]},
        }
    )
    runtime = build_runtime(cfg, "server")
    try:
        r = call(runtime, "GET", "/admin/v1/audit")
        assert r.status == 200 and r.payload["entries"] == []
    finally:
        runtime.close()
        runtime.store.close()


# -- OpenAPI -----------------------------------------------------------------------------------


def test_openapi_document_is_valid_and_covers_every_route(rt):
    doc = call(rt, "GET", "/admin/v1/openapi.json", as_=BOB).payload
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.")
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == {(r.method, r.template) for r in ROUTES}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            codes = set(op["responses"])
            assert {"400", "401", "503"} <= codes, (method, path)
            assert any(c.startswith("2") for c in codes)
            route = next(r for r in ROUTES if r.template == path and r.method == method.upper())
            if route.admin_only:
                assert "403" in codes
            documented_query = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
            assert documented_query == set(route.query)
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"]


@pytest.mark.parametrize(
    "method, path, body, field",
    [
        # amounts far out of range: refused before any arithmetic (1e308 nano-dollars overflowed)
        ("POST", f"/admin/v1/users/{ALICE}/grants",
         {"amount_usd": 1e308, "expires_at": "2030-01-01T00:00:00Z", "reason": "x"}, "amount_usd"),
        ("PUT", "/admin/v1/users/new@example.com", {"daily_budget_usd": 1e308}, "daily_budget_usd"),
        # times whose UTC form is outside any calendar (year 0) or at its very end
        ("POST", f"/admin/v1/users/{ALICE}/grants",
         {"amount_usd": 1, "expires_at": "9999-12-31T23:00:00-05:00", "reason": "x"}, "expires_at"),
        ("GET", "/admin/v1/usage?since=0001-01-01T00:00:00%2B01:00", None, "since"),
        ("GET", "/admin/v1/usage?until=9999-12-31", None, "until"),
        ("GET", "/admin/v1/usage?since=9999-12-31T23:59:59-05:00", None, "since"),
        ("GET", "/admin/v1/leaderboard?since=0001-01-01", None, "since"),
        ("GET", "/admin/v1/audit?since=0001-01-01T00:00:00%2B01:00", None, "since"),
    ],
)
def test_out_of_range_input_is_400_naming_the_field(rt, method, path, body, field):
    for as_ in (ADMIN, ALICE) if path.startswith("/admin/v1/usage") else (ADMIN,):
        r = call(rt, method, path, body, as_=as_)
        assert (r.status, r.error, r.payload["field"]) == (400, "invalid_parameter", field)


@pytest.mark.parametrize(
    "path, body",
    [
        (f"/admin/v1/users/{ALICE}/grants", {**GRANT, "reason": "a\ud800"}),
        ("/admin/v1/users/new@example.com", {"tenants": ["\udfff"]}),
        ("/admin/v1/keys", {"name": "x\ud800y"}),
    ],
)
def test_lone_surrogates_are_400_and_change_nothing(rt, path, body):
    r = call(rt, "POST" if path.endswith(("grants", "keys")) else "PUT", path, body)
    assert (r.status, r.error) == (400, "invalid_json")
    assert admin_actions(rt) == []


def test_json_nested_thousands_deep_is_400(rt):
    r = call(rt, "PUT", "/admin/v1/users/new@example.com", raw=b"[" * 20_000 + b"]" * 20_000)
    assert (r.status, r.error) == (400, "invalid_json")


# -- tenants and periods -----------------------------------------------------------------------


def test_put_tenant_creates_updates_and_is_audited(rt):
    path = "/admin/v1/tenants/research-team"
    r = call(rt, "PUT", path, {"budget_usd": 50, "period": "monthly"})
    assert r.status == 201
    assert (r.payload["budget_usd"], r.payload["period"], r.payload["source"]) == (
        50, "monthly", "store"
    )
    assert r.payload["remaining_usd"] == 50 and r.payload["resets_at"].endswith("T00:00:00Z")
    r = call(rt, "PUT", path, {"budget_usd": 80})  # partial: the period stays
    assert r.status == 200 and (r.payload["budget_usd"], r.payload["period"]) == (80, "monthly")
    r = call(rt, "PUT", path, {"budget_usd": None})  # no budget of its own
    assert r.status == 200 and r.payload["budget_usd"] is None and r.payload["remaining_usd"] is None
    t = rt.users.tenant_settings("research-team")
    assert t.budget_usd is None and t.period.kind == "monthly"
    none = dict.fromkeys(LIMITS)
    actions = [(a["action"], a["target"], a["before"], a["after"]) for a in admin_actions(rt)]
    assert actions == [
        ("tenant.create", "research-team", None,
         {"budget_usd": 50, "period": "monthly", **none}),
        ("tenant.update", "research-team", {"budget_usd": 50, "period": "monthly", **none},
         {"budget_usd": 80, "period": "monthly", **none}),
        ("tenant.update", "research-team", {"budget_usd": 80, "period": "monthly", **none},
         {"budget_usd": None, "period": "monthly", **none}),
    ]
    r = call(rt, "PUT", path, {"total_tokens_per_minute": 9000})
    assert r.payload["total_tokens_per_minute"] == 9000 and r.payload["budget_usd"] is None
    assert rt.users.tenant_settings("research-team").token_limits.active() == {
        "total_tokens": 9000
    }
    r = call(rt, "PUT", path, {"max_concurrent_requests": 12})  # its users' requests in flight
    assert r.status == 200 and r.payload["max_concurrent_requests"] == 12
    assert r.payload["total_tokens_per_minute"] == 9000  # partial: the rest stays
    assert rt.users.tenant_settings("research-team").max_concurrent_requests == 12
    assert admin_actions(rt)[-1]["after"]["max_concurrent_requests"] == 12


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"budget_usd": -1}, "budget_usd"),
        ({"budget_usd": "5"}, "budget_usd"),
        ({"budget_usd": 2e9}, "budget_usd"),
        ({"period": "yearly"}, "period"),
        ({"daily_budget_usd": 1}, "daily_budget_usd"),
        ({"total_tokens_per_minute": -5}, "total_tokens_per_minute"),
        ({"max_concurrent_requests": -1}, "max_concurrent_requests"),
        ({"max_concurrent_requests": True}, "max_concurrent_requests"),
    ],
)
def test_put_tenant_refuses_bad_fields(rt, body, field):
    r = call(rt, "PUT", "/admin/v1/tenants/t1", body)
    assert r.status == 400 and r.payload["error"] == "invalid_parameter"
    assert r.payload["field"] == field
    assert admin_actions(rt) == [] and rt.store.get_tenant("t1") is None


def test_put_user_refuses_an_unknown_period(rt):
    r = call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", {"budget_period": "hourly"})
    assert r.status == 400 and r.payload["field"] == "budget_period"


def test_tenant_list_and_me_show_tenant_budgets_and_periods(rt):
    call(rt, "PUT", "/admin/v1/tenants/research-team", {"budget_usd": 3, "period": "weekly"})
    call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", {"budget_period": "monthly"})
    r = rt.ledger.reserve(
        ALICE, "research-team", 0.0, 20.0, "req",
        period=rt.users.settings(ALICE).budget_period,
        tenant_budget_usd=3.0,
        tenant_period=rt.users.tenant_settings("research-team").period,
    )
    assert isinstance(r, Reservation)
    assert rt.ledger.settle(r, 1.25, 100, 10, "gpt-4o", "openai").applied
    listed = call(rt, "GET", "/admin/v1/tenants").payload
    [team] = [t for t in listed["tenants"] if t["tenant_id"] == "research-team"]
    assert (team["spent_usd"], team["remaining_usd"], team["period"]) == (1.25, 1.75, "weekly")
    me = call(rt, "GET", "/admin/v1/me", as_=ALICE).payload
    assert me["budget_period"] == "monthly" and me["spent_period_usd"] == 1.25
    assert me["remaining_usd"] == 18.75 and me["resets_at"].endswith("-01T00:00:00Z")
    assert me["period_starts_at"].endswith("-01T00:00:00Z")
    [tb] = me["tenant_budgets"]
    assert tb["tenant_id"] == "research-team" and tb["remaining_usd"] == 1.75


# -- API keys ----------------------------------------------------------------------------------


def test_mint_list_revoke_a_key(rt):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "name": "ci",
                                             "expires_at": "2099-01-01T00:00:00Z"})
    assert r.status == 201
    key, kid = r.payload["key"], r.payload["id"]
    assert key.startswith("cdk_") and len(key) > 40
    assert (r.payload["user_id"], r.payload["name"], r.payload["state"]) == (BOB, "ci", "active")
    assert r.payload["fingerprint"] == sha(key)[:8] and r.payload["actor"] == ADMIN
    # only the digest is kept: the key is nowhere in the store nor in the audit trail
    [stored] = rt.store.api_keys(BOB)
    assert stored.sha256 == sha(key) and key not in json.dumps(stored.to_json())
    [created] = admin_actions(rt)
    assert created["action"] == "key.create" and created["target"] == BOB
    assert key not in json.dumps(created) and created["after"]["id"] == kid
    listed = call(rt, "GET", f"/admin/v1/keys?user={q(BOB)}").payload
    assert [k["id"] for k in listed["keys"]] == [kid] and "key" not in listed["keys"][0]
    r = call(rt, "DELETE", f"/admin/v1/keys/{kid}")
    assert r.status == 200 and r.payload["state"] == "revoked" and r.payload["revoked_at"]
    assert not rt.store.api_key(sha(key)).valid_at(0)
    again = call(rt, "DELETE", f"/admin/v1/keys/{kid}")  # a repeat changes nothing
    assert again.status == 200 and again.payload["revoked_at"] == r.payload["revoked_at"]
    assert [a["action"] for a in admin_actions(rt)] == ["key.create", "key.revoke"]


def test_a_key_narrowed_to_models_keeps_them_through_rotation(rt):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "models": ["gpt-4o-mini", "claude-*"]})
    assert r.status == 201 and r.payload["models"] == ["gpt-4o-mini", "claude-*"]
    [stored] = rt.store.api_keys(BOB)
    assert stored.models == ("gpt-4o-mini", "claude-*")
    [created] = admin_actions(rt)
    assert created["after"]["models"] == ["gpt-4o-mini", "claude-*"]  # audited
    rotated = call(rt, "POST", f"/admin/v1/keys/{r.payload['id']}/rotate", {"grace_s": 0})
    assert rotated.status == 201 and rotated.payload["models"] == ["gpt-4o-mini", "claude-*"]
    plain = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB}).payload
    assert plain["models"] == []


def test_a_key_budget_is_stored_listed_audited_and_kept_by_rotation(rt):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "budget_usd": 2.5})
    assert r.status == 201 and r.payload["budget_usd"] == 2.5
    [stored] = rt.store.api_keys(BOB)
    assert stored.budget_usd == 2.5 and stored.budget_id == r.payload["id"]
    [created] = admin_actions(rt)
    assert created["action"] == "key.create" and created["after"]["budget_usd"] == 2.5
    listed = call(rt, "GET", f"/admin/v1/keys?user={q(BOB)}").payload
    assert [k["budget_usd"] for k in listed["keys"]] == [2.5]
    rotated = call(rt, "POST", f"/admin/v1/keys/{r.payload['id']}/rotate", {"grace_s": 0})
    assert rotated.status == 201 and rotated.payload["budget_usd"] == 2.5
    new = rt.store.api_key(sha(rotated.payload["key"]))
    # the rotated key spends from the first key's row: rotating gives no fresh budget
    assert new is not None and new.budget_id == r.payload["id"] != new.key_id
    again = call(rt, "POST", f"/admin/v1/keys/{rotated.payload['id']}/rotate", {"grace_s": 0})
    assert rt.store.api_key(sha(again.payload["key"])).budget_id == r.payload["id"]
    # the whole user's budget is a part of it too; no budget: the user's
    assert call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "budget_usd": 10}).status == 201
    assert call(rt, "POST", "/admin/v1/keys", {"user_id": BOB}).payload["budget_usd"] is None


@pytest.mark.parametrize(
    "budget",
    [0, -1, 10.01, "5", True, [1], 1e308, 1e-12],
)
def test_key_budget_validation_names_the_field(rt, budget):
    # BOB's budget is the default, $10 per day: a key's is a part of it
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "budget_usd": budget})
    assert (r.status, r.payload["error"], r.payload["field"]) == (
        400, "invalid_parameter", "budget_usd"
    )
    assert rt.store.api_keys(BOB) == [] and admin_actions(rt) == []


def test_me_with_a_budgeted_key_shows_its_budget_and_spend(rt):
    from candela_mitm.governance.identity import KeyScope
    from candela_mitm.governance.ledger import KeyBudget, Reservation

    minted = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "budget_usd": 2.0}).payload
    record = rt.store.api_key(sha(minted["key"]))
    scope = KeyScope(record.key_id, record.models, record.budget_usd, record.budget_id)
    r = rt.ledger.reserve(BOB, None, 0.5, 10.0, "req", key_budget=KeyBudget(
        record.key_id, record.budget_id, 2.0))
    assert isinstance(r, Reservation)
    rt.ledger.settle(r, 0.75, 1, 1, "gpt-4o-mini", "openai")
    held = rt.ledger.reserve(BOB, None, 0.25, 10.0, "req", key_budget=KeyBudget(
        record.key_id, record.budget_id, 2.0))
    assert isinstance(held, Reservation)
    me = call(rt, "GET", "/admin/v1/me", as_=BOB, key_scope=scope).payload
    kb = me["key_budget"]
    assert (kb["key_id"], kb["budget_usd"], kb["period"]) == (minted["id"], 2.0, "daily")
    assert (kb["spent_usd"], kb["reserved_usd"], kb["remaining_usd"]) == (0.75, 0.25, 1.0)
    assert kb["resets_at"] == me["resets_at"]  # the user's period
    assert call(rt, "GET", "/admin/v1/me", as_=BOB).payload["key_budget"] is None


@pytest.mark.parametrize(
    "models",
    [[], "gpt-4o", [""], ["gpt\n4o"], ["x" * 257], [1], ["m"] * 65],
)
def test_key_models_validation_names_the_field(rt, models):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "models": models})
    assert (r.status, r.payload["error"], r.payload["field"]) == (400, "invalid_parameter", "models")
    assert rt.store.api_keys(BOB) == []


def test_developers_mint_and_revoke_only_their_own_keys(rt):
    mine = call(rt, "POST", "/admin/v1/keys", {}, as_=ALICE)
    assert mine.status == 201 and mine.payload["user_id"] == ALICE
    bobs = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB}).payload
    listed = call(rt, "GET", "/admin/v1/keys", as_=ALICE).payload
    assert listed["user_id"] == ALICE and [k["id"] for k in listed["keys"]] == [mine.payload["id"]]
    r = call(rt, "DELETE", f"/admin/v1/keys/{bobs['id']}", as_=ALICE)
    assert r.status == 404 and r.payload["error"] == "key_not_found"
    assert rt.store.api_key(sha(bobs["key"])).revoked_us is None
    assert call(rt, "DELETE", f"/admin/v1/keys/{mine.payload['id']}", as_=ALICE).status == 200


@pytest.mark.parametrize(
    ("body", "field", "status"),
    [
        ({"user_id": 5}, "user_id", 400),
        ({"name": 7}, "name", 400),
        ({"expires_at": "tomorrow"}, "expires_at", 400),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at", 400),
        ({"scopes": []}, "scopes", 400),
    ],
)
def test_mint_refuses_bad_fields(rt, body, field, status):
    r = call(rt, "POST", "/admin/v1/keys", body)
    assert r.status == status and r.payload["field"] == field
    assert rt.store.api_keys() == [] and admin_actions(rt) == []


def test_mint_for_an_unknown_user_is_404(rt):
    r = call(rt, "POST", "/admin/v1/keys", {"user_id": "nobody@example.com"})
    assert r.status == 404 and r.payload["error"] == "user_not_found"


def test_rotate_keeps_the_old_key_for_its_grace_period(rt):
    old = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB, "name": "ci",
                                               "expires_at": "2099-01-01T00:00:00Z"}).payload
    r = call(rt, "POST", f"/admin/v1/keys/{old['id']}/rotate", {"grace_s": 600})
    assert r.status == 201
    new = r.payload
    assert new["key"].startswith("cdk_") and new["key"] != old["key"]
    assert (new["user_id"], new["name"], new["expires_at"]) == (BOB, "ci", "2099-01-01T00:00:00Z")
    assert new["replaces"]["id"] == old["id"]
    stored_old = rt.store.api_key(sha(old["key"]))
    stored_new = rt.store.api_key(sha(new["key"]))
    grace_end = stored_old.expires_us
    created = stored_new.created_us
    assert grace_end == created + 600 * 1_000_000
    assert stored_old.valid_at(grace_end - 1) and not stored_old.valid_at(grace_end)
    assert stored_new.valid_at(grace_end)
    [_, rotated] = admin_actions(rt)
    assert rotated["action"] == "key.rotate" and rotated["after"]["new"]["id"] == new["id"]
    assert old["key"] not in json.dumps(rotated) and new["key"] not in json.dumps(rotated)
    # a rotation never lengthens a key's life, and a dead key is not rotated
    call(rt, "DELETE", f"/admin/v1/keys/{new['id']}")
    r = call(rt, "POST", f"/admin/v1/keys/{new['id']}/rotate", {})
    assert r.status == 400 and r.payload["field"] == "key"


@pytest.mark.parametrize("grace", [-1, "60", 10**9, True])
def test_rotate_refuses_a_bad_grace(rt, grace):
    old = call(rt, "POST", "/admin/v1/keys", {"user_id": BOB}).payload
    r = call(rt, "POST", f"/admin/v1/keys/{old['id']}/rotate", {"grace_s": grace})
    assert r.status == 400 and r.payload["field"] == "grace_s"
    assert len(rt.store.api_keys()) == 1
