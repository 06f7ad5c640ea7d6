"""admin/views.py: the JSON shapes the admin API answers with."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from candela_mitm.admin.views import grant_json, key_json, tenant_json, tenant_limits, usd_out
from candela_mitm.governance.ledger import Grant, TenantBudgetStatus
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.governance.ratelimit import TokenLimits
from candela_mitm.governance.users import TenantSettings
from candela_mitm.state.ports import TENANT_LIMIT_FIELDS, KeyRecord, to_us

T0 = datetime(2026, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)


def test_usd_out_rounds_to_nano_dollars() -> None:
    assert usd_out(0.1 + 0.2) == 0.3
    assert usd_out(1.23456789049) == 1.23456789
    assert usd_out(2e-9) == 2e-9


def key(**kw: object) -> KeyRecord:
    fields: dict = {
        "key_id": "k_0123456789abcdef",
        "sha256": "ab" * 32,
        "user_id": "alice@example.com",
        "name": "laptop",
        "actor": "admin@example.com",
        "created_us": to_us(T0),
    }
    return KeyRecord(**{**fields, **kw})


@pytest.mark.parametrize(
    ("kw", "state"),
    [
        ({}, "active"),
        ({"expires_us": to_us(T0) + 10}, "active"),
        ({"expires_us": to_us(T0) + 1}, "expired"),  # expiry is exclusive
        ({"revoked_us": to_us(T0)}, "revoked"),
        ({"revoked_us": to_us(T0), "expires_us": 0}, "revoked"),  # revoked wins over expired
    ],
)
def test_key_state(kw: dict, state: str) -> None:
    assert key_json(key(**kw), to_us(T0) + 1)["state"] == state


def test_key_json_never_shows_the_hash_only_its_fingerprint() -> None:
    j = key_json(key(models=["gpt-4o"], budget_usd=1.5, expires_us=to_us(T0) + 3_600_000_000), 0)
    assert j == {
        "id": "k_0123456789abcdef",
        "user_id": "alice@example.com",
        "name": "laptop",
        "fingerprint": "abababab",
        "state": "active",
        "created_at": "2026-05-01T12:00:00Z",
        "expires_at": "2026-05-01T13:00:00Z",
        "revoked_at": None,
        "actor": "admin@example.com",
        "models": ["gpt-4o"],
        "budget_usd": 1.5,
    }
    assert "ab" * 32 not in str(j)


def tenant(**kw: object) -> TenantSettings:
    fields: dict = {"tenant_id": "t1", "budget_usd": 10.0, "period": BudgetPeriod("weekly", "Europe/Zurich"), "source": "store"}
    return TenantSettings(**{**fields, **kw})


def test_tenant_limits_by_their_shared_names() -> None:
    t = tenant(token_limits=TokenLimits(input_tokens=5, total_tokens=9), max_concurrent_requests=3)
    assert tenant_limits(t) == {
        "max_concurrent_requests": 3,
        "input_tokens_per_minute": 5,
        "output_tokens_per_minute": None,
        "total_tokens_per_minute": 9,
    }
    assert set(tenant_limits(tenant())) == set(TENANT_LIMIT_FIELDS)
    assert set(tenant_limits(tenant()).values()) == {None}


def test_tenant_json() -> None:
    status = TenantBudgetStatus("t1", 10.0, "weekly", 0.1 + 0.2, 1.0, 10.0 - 0.3 - 1.0, "2026-04-27", "2026-05-04")
    j = tenant_json(tenant(), status)
    assert (j["tenant_id"], j["budget_usd"], j["period"], j["time_zone"], j["source"]) == (
        "t1", 10.0, "weekly", "Europe/Zurich", "store"
    )
    assert (j["spent_usd"], j["reserved_usd"], j["remaining_usd"]) == (0.3, 1.0, 8.7)
    assert (j["period_starts_at"], j["resets_at"]) == ("2026-04-27", "2026-05-04")
    assert j["max_concurrent_requests"] is None
    unbudgeted = TenantBudgetStatus("t1", None, "monthly", 2.0, 0.0, None, "a", "b")
    assert tenant_json(tenant(budget_usd=None), unbudgeted)["remaining_usd"] is None


def test_grant_json() -> None:
    g = Grant("g1", "alice@example.com", 2.0, 0.5, 0.25, 1.25, T0, "launch week", "admin@example.com", T0, False)
    assert grant_json(g) == {
        "id": "g1",
        "user_id": "alice@example.com",
        "amount_usd": 2.0,
        "used_usd": 0.5,
        "held_usd": 0.25,
        "remaining_usd": 1.25,
        "expires_at": "2026-05-01T12:00:00Z",
        "expired": False,
        "reason": "launch week",
        "actor": "admin@example.com",
        "created_at": "2026-05-01T12:00:00Z",
    }
