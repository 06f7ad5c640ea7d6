"""admin/resources/me.py: what a caller sees of its own budget and grants."""

from __future__ import annotations

from tests.core.admin.support import ADMIN, ALICE, GRANT, admin_actions, call, future, q, spend


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


