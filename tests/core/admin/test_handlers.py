"""Admin API dispatch (admin/handlers.py) on a real Runtime: RBAC, unknown routes, parameters
checked at dispatch, malformed bodies, a store that is down."""

from __future__ import annotations

from typing import Any

import pytest

from candela_mitm.admin.routes import ROUTES, match_route
from candela_mitm.errors import StoreUnavailable
from tests.core.admin.support import ADMIN, ALICE, BOB, CAROL, GRANT, admin_actions, call, q

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


def test_store_unavailable_is_503(rt, monkeypatch):
    def broken(*a: Any, **kw: Any) -> None:
        raise StoreUnavailable("down")

    monkeypatch.setattr(rt.store, "get_user", broken)
    for who in (ADMIN, ALICE):
        r = call(rt, "GET", "/admin/v1/me", as_=who)
        assert (r.status, r.error) == (503, "governance_unavailable")


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


