"""Admin API views: the JSON shapes of users, keys, tenants and grants."""

from __future__ import annotations

from typing import Any

from candela_mitm.governance.ledger import Grant, TenantBudgetStatus
from candela_mitm.governance.users import TenantSettings, UserSettings
from candela_mitm.state.ports import LIMIT_FIELDS, TENANT_LIMIT_FIELDS, KeyRecord, from_us, rfc3339


def usd_out(value: float) -> float:
    return round(value, 9)  # nano-dollars: the stores' resolution, without float noise


def settings_json(s: UserSettings) -> dict[str, Any]:
    return {
        "role": s.role,
        "tenants": list(s.tenants),
        "daily_budget_usd": s.daily_budget_usd,
        "budget_period": s.budget_period.kind,
        "requests_per_minute": s.requests_per_minute,
        **{name: getattr(s, name) for name in LIMIT_FIELDS},
    }



def key_json(k: KeyRecord, now_us: int) -> dict[str, Any]:
    state = "revoked" if k.revoked_us is not None else (
        "active" if k.valid_at(now_us) else "expired"
    )
    return {
        "id": k.key_id,
        "user_id": k.user_id,
        "name": k.name,
        "fingerprint": k.sha256[:8],  # as audit entries name the key that made a request
        "state": state,
        "created_at": rfc3339(from_us(k.created_us)),
        "expires_at": None if k.expires_us is None else rfc3339(from_us(k.expires_us)),
        "revoked_at": None if k.revoked_us is None else rfc3339(from_us(k.revoked_us)),
        "actor": k.actor,
        "models": list(k.models),  # []: whatever its user may use
        "budget_usd": k.budget_usd,  # null: its user's budget; else a part of it, per its period
    }


def tenant_json(t: TenantSettings, status: TenantBudgetStatus) -> dict[str, Any]:
    return {
        "tenant_id": t.tenant_id,
        "budget_usd": t.budget_usd,
        "period": t.period.kind,
        "time_zone": t.period.time_zone,
        "source": t.source,
        "spent_usd": usd_out(status.spent_usd),
        "reserved_usd": usd_out(status.reserved_usd),
        "remaining_usd": None if status.remaining_usd is None else usd_out(status.remaining_usd),
        "period_starts_at": status.period_starts_at,
        "resets_at": status.resets_at,
        **tenant_limits(t),
    }


def tenant_limits(t: TenantSettings) -> dict[str, int | None]:
    """A tenant's limits by the names config, records and the API share (TENANT_LIMIT_FIELDS)."""
    return {
        name: (
            t.max_concurrent_requests
            if name == "max_concurrent_requests"
            else getattr(t.token_limits, name.removesuffix("_per_minute"))
        )
        for name in TENANT_LIMIT_FIELDS
    }


def user_json(s: UserSettings, spent_today_usd: float) -> dict[str, Any]:
    return {
        "user_id": s.user_id,
        **settings_json(s),
        "source": s.source,
        "spent_today_usd": usd_out(spent_today_usd),
    }


def grant_json(g: Grant) -> dict[str, Any]:
    return {
        "id": g.id,
        "user_id": g.user_id,
        "amount_usd": usd_out(g.amount_usd),
        "used_usd": usd_out(g.used_usd),
        "held_usd": usd_out(g.held_usd),
        "remaining_usd": usd_out(g.remaining_usd),
        "expires_at": rfc3339(g.expires_at),
        "expired": g.expired,
        "reason": g.reason,
        "actor": g.actor,
        "created_at": rfc3339(g.created_at),
    }

