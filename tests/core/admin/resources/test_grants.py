"""admin/resources/grants.py: grant validation and expiry."""

from __future__ import annotations

import pytest

from tests.core.admin.support import ALICE, BOB, GRANT, admin_actions, call, q

# -- grants ------------------------------------------------------------------------------------


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


def test_grants_below_one_nano_dollar_are_400(rt):
    r = call(rt, "POST", f"/admin/v1/users/{ALICE}/grants", {**GRANT, "amount_usd": 9e-10})
    assert (r.status, r.error, r.payload["field"]) == (400, "invalid_parameter", "amount_usd")


