"""GET /admin/v1/policy: the governance in force, read-only, scoped to what the role may see."""

from __future__ import annotations

import pytest

from tests.core.admin.test_tenant_scope import ADMIN, ALICE, BOSS, OSCAR, RITA, TARA, call, q
from tests.core.admin.test_tenant_scope import rt as rt  # noqa: F401 (the fixture)


def test_an_admin_sees_every_tenant_and_user(rt):
    r = call(rt, "GET", "/admin/v1/policy", as_=ADMIN)
    assert r.status == 200
    p = r.payload
    assert p["scope"] == "all"
    assert p["models"]["global"] == {
        "mode": "allowlist",
        "entries": ["gpt-4o-mini", "gpt-4o"],
        "scope": "global",
    }
    lists = {t["tenant_id"]: t for t in p["models"]["tenants"]}
    assert lists["research-team"]["entries"] == ["gpt-4o", "claude-*"]
    assert (lists["other-team"]["mode"], lists["other-team"]["entries"]) == (
        "blocklist",
        ["o1-pro"],
    )
    budgets = {t["tenant_id"]: t["budget_usd"] for t in p["tenants"]}
    assert budgets == {"research-team": 500, "other-team": 9}
    assert p["rate_limits"]["default_requests_per_minute"] == 90
    assert p["budgets"]["default_budget_usd"] == 100.0 and p["budgets"]["period"] == "daily"
    users = {u["user_id"]: u for u in p["users"]}
    assert {ADMIN, TARA, RITA, ALICE, OSCAR, BOSS} <= set(users)
    assert users[ALICE]["tenants"] == ["research-team", "other-team"]


def test_a_tenant_admin_sees_its_tenant_only(rt):
    p = call(rt, "GET", "/admin/v1/policy", as_=TARA).payload
    assert p["scope"] == "tenants"
    assert [t["tenant_id"] for t in p["models"]["tenants"]] == ["research-team"]
    assert [t["tenant_id"] for t in p["tenants"]] == ["research-team"]
    users = {u["user_id"]: u for u in p["users"]}
    assert set(users) == {TARA, RITA, ALICE, BOSS}
    assert users[ALICE]["tenants"] == ["research-team"]  # other-team is not named
    assert "other-team" not in str(p)


def test_a_developer_sees_itself_and_its_tenants_and_a_change_shows_at_once(rt):
    p = call(rt, "GET", "/admin/v1/policy", as_=RITA).payload
    assert p["scope"] == "self"
    assert [u["user_id"] for u in p["users"]] == [RITA]
    assert [t["tenant_id"] for t in p["tenants"]] == ["research-team"]
    assert p["users"][0]["daily_budget_usd"] == 100.0
    call(rt, "PUT", f"/admin/v1/users/{q(RITA)}", {"daily_budget_usd": 7.5}, as_=ADMIN)
    call(rt, "PUT", "/admin/v1/tenants/research-team", {"period": "monthly"}, as_=ADMIN)
    p = call(rt, "GET", "/admin/v1/policy", as_=RITA).payload
    assert p["users"][0]["daily_budget_usd"] == 7.5
    assert p["tenants"][0]["period"] == "monthly"


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE"])
def test_it_is_read_only(rt, method):
    r = call(rt, method, "/admin/v1/policy", {} if method != "DELETE" else None, as_=ADMIN)
    assert (r.status, r.payload["error"]) == (405, "method_not_allowed")
