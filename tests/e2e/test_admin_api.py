"""Admin API end to end: a real Candela process, changes that take effect on the proxy path."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from candela_mitm.admin.routes import ROUTES
from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import FakeUpstream

from .conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
BOB = "bob@example.com"
KEYS = {"admin": ADMIN_KEY, "alice": ALICE_KEY, "bob": BOB_KEY}


@pytest.fixture(autouse=True)
def _reset(upstream: FakeUpstream) -> Iterator[None]:
    upstream.reset()
    upstream.clear()
    yield


def admin(
    candela: CandelaProcess, method: str, path: str, as_: str = "admin", **kw: Any
) -> requests.Response:
    headers = {"Authorization": f"Bearer {KEYS[as_]}"}
    r = requests.request(method, f"{candela.url}/admin/v1{path}", headers=headers, timeout=10, **kw)
    assert r.headers["content-type"].startswith("application/json")
    return r


def chat(candela: CandelaProcess, as_: str, model: str = "gpt-4o") -> requests.Response:
    return requests.post(
        f"{candela.url}/proxy/openai/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEYS[as_]}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )


def test_a_developer_is_forbidden_and_a_stranger_unauthenticated(candela):
    for path in ("/users", "/leaderboard", "/audit", f"/users/{BOB}/grants"):
        r = admin(candela, "GET", path, as_="alice")
        assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    r = admin(candela, "PUT", "/users/alice%40example.com", as_="alice", json={"role": "admin"})
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    r = requests.get(f"{candela.url}/admin/v1/me", timeout=10)
    assert (r.status_code, r.json()["error"]) == (401, "unauthenticated")
    users = {u["user_id"]: u for u in admin(candela, "GET", "/users").json()["users"]}
    assert {ALICE, BOB, "admin@example.com"} <= set(users)
    assert users[ALICE]["tenants"] == ["research-team", "other-team"]
    assert users[ALICE]["role"] == "developer"
    me = admin(candela, "GET", "/me", as_="alice").json()
    assert (me["user_id"], me["role"], me["via"]) == (ALICE, "developer", "api_key")


def test_a_budget_set_by_put_denies_and_a_grant_lifts_it(candela, upstream):
    try:
        r = admin(candela, "PUT", "/users/alice%40example.com", json={"daily_budget_usd": 0.000001})
        assert r.status_code == 200 and r.json()["daily_budget_usd"] == 0.000001
        r = chat(candela, "alice")
        assert r.status_code == 402
        body = r.json()
        assert (body["error"], body["user_id"], body["budget_usd"]) == (
            "budget_exceeded",
            ALICE,
            0.000001,
        )
        assert upstream.requests == []  # denied before it left

        expires = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        r = admin(
            candela,
            "POST",
            "/users/alice%40example.com/grants",
            json={"amount_usd": 1.0, "expires_at": expires, "reason": "demo day"},
        )
        assert r.status_code == 201
        grant_id = r.json()["id"]
        me = admin(candela, "GET", "/me", as_="alice").json()
        assert [g["id"] for g in me["grants"]] == [grant_id]
        assert me["remaining_usd"] == pytest.approx(1.000001)

        r = chat(candela, "alice")
        assert r.status_code == 200, r.text
        assert len(upstream.requests) == 1
        # the spend went past the tiny allowance into the grant (waterfall)
        me = admin(candela, "GET", "/me", as_="alice").json()
        assert me["spent_today_usd"] > 0.000001
        [grant] = admin(candela, "GET", "/users/alice%40example.com/grants").json()["grants"]
        assert grant["used_usd"] > 0 and grant["remaining_usd"] < 1.0

        audit = admin(candela, "GET", "/audit?action=admin_action&limit=5").json()["entries"]
        actions = [(e["fields"]["action"], e["fields"]["target"]) for e in audit]
        assert actions[:2] == [("grant.create", ALICE), ("user.update", ALICE)]
        assert audit[1]["fields"]["after"]["daily_budget_usd"] == 0.000001
        assert all(e["user_id"] == "admin@example.com" for e in audit[:2])
    finally:
        admin(candela, "PUT", "/users/alice%40example.com", json={"daily_budget_usd": 1000})


def test_a_rate_limit_set_by_put_takes_effect(candela, upstream):
    try:
        r = admin(candela, "PUT", f"/users/{BOB}", json={"requests_per_minute": 2})
        assert r.status_code == 200 and r.json()["requests_per_minute"] == 2
        assert [chat(candela, "bob", "gpt-4o-mini").status_code for _ in range(2)] == [200, 200]
        r = chat(candela, "bob", "gpt-4o-mini")
        assert (r.status_code, r.json()["error"], r.json()["limit"]) == (429, "rate_limited", 2)
        assert int(r.headers["Retry-After"]) >= 1
        assert len(upstream.requests) == 2
    finally:
        admin(candela, "PUT", f"/users/{BOB}", json={"requests_per_minute": 60})


def test_a_deleted_user_is_refused_until_put_revives_them(candela, upstream):
    r = admin(candela, "DELETE", "/users/bob%40example.com")
    assert r.status_code == 200 and r.json()["deleted"] is True
    r = chat(candela, "bob", "gpt-4o-mini")
    assert r.status_code == 401
    assert upstream.requests == []
    assert admin(candela, "DELETE", f"/users/{BOB}").json()["error"] == "user_not_found"
    r = admin(candela, "PUT", "/users/bob%40example.com", json={})
    assert r.status_code == 201
    assert chat(candela, "bob", "gpt-4o-mini").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/nope", None, 404, "not_found"),
        ("POST", "/me", None, 405, "method_not_allowed"),
        ("PUT", f"/users/{BOB}", {"requests_per_minute": "fast"}, 400, "invalid_parameter"),
        ("PUT", f"/users/{BOB}", {"colour": "blue"}, 400, "invalid_parameter"),
        ("GET", "/usage?since=last-week", None, 400, "invalid_parameter"),
        ("GET", "/leaderboard?by=model", None, 400, "invalid_parameter"),
        ("GET", "/audit?limit=many", None, 400, "invalid_parameter"),
    ],
)
def test_errors_are_json_with_a_code(candela, method, path, body, status, code):
    r = admin(candela, method, path, json=body)
    assert (r.status_code, r.json()["error"]) == (status, code)
    assert r.json()["message"]
    if status == 405:
        assert r.headers["Allow"] == "GET"


def test_openapi_document_covers_every_route(candela):
    r = admin(candela, "GET", "/openapi.json", as_="bob")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"]
    for route in ROUTES:
        op = doc["paths"][route.template][route.method.lower()]
        assert op["responses"], route
        assert any(code.startswith("2") for code in op["responses"])
    for schema in ("Error", "User", "Grant", "Me", "Usage", "Leaderboard", "AuditList"):
        assert doc["components"]["schemas"][schema]["type"] == "object"
