"""admin/resources/users.py: list, partial PUT, validation, roles, delete and revive."""

from __future__ import annotations

import pytest

from tests.core.admin.support import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    GRANT,
    LIMITS,
    admin_actions,
    call,
    q,
    spend,
)

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


def test_put_user_refuses_an_unknown_period(rt):
    r = call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", {"budget_period": "hourly"})
    assert r.status == 400 and r.payload["field"] == "budget_period"

