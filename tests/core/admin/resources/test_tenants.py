"""admin/resources/tenants.py: tenant budgets, periods and limits."""

from __future__ import annotations

import pytest

from candela_mitm.governance.ledger import Reservation
from tests.core.admin.support import ALICE, LIMITS, admin_actions, call, q

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


