"""Policy view: the governance in force (models, budgets, limits) for GET /admin/v1/policy.

Read-only, and scoped like everything else: an admin sees every tenant and user, a tenant admin
its tenants and their users (with only its tenants named), a developer itself and its tenants.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from candela_mitm.admin.handlers import AdminApi
from candela_mitm.admin.routes import AdminRequest
from candela_mitm.admin.views import settings_json
from candela_mitm.governance.policy import effective_models


def _models(api: AdminApi, tenant: str | None) -> dict[str, Any]:
    m = effective_models(api.rt.config.governance.models, tenant)
    return {"mode": m.mode, "entries": list(m.entries), "scope": m.scope}


def _all_tenants(api: AdminApi) -> set[str]:
    cfg = api.rt.config
    ids = {r.tenant_id for r in api.rt.store.list_tenants()}
    ids |= set(cfg.governance.tenants) | set(cfg.governance.models.tenants)
    for u in cfg.users.values():
        ids |= set(u.tenants)
    for rec in api.rt.store.list_users():
        ids |= set(rec.tenants)
    return ids


def _all_users(api: AdminApi) -> set[str]:
    live = {r.user_id for r in api.rt.store.list_users()}
    return live | {u for u in api._configured_ids() if api._known(u)}


def policy_view(api: AdminApi, req: AdminRequest) -> dict[str, Any]:
    g = api.rt.config.governance
    me = api.rt.users.settings(req.user)
    if req.role == "admin":
        scope, tenants = "all", _all_tenants(api)
        users = {u: api.rt.users.settings(u) for u in _all_users(api)}
    elif req.role == "tenant_admin":
        scope, tenants = "tenants", set(me.tenants)
        users = {}
        for u in _all_users(api) | {req.user}:
            s = api.rt.users.settings(u)
            if u == req.user or set(s.tenants) & tenants:
                users[u] = dataclasses.replace(
                    s, tenants=tuple(t for t in s.tenants if t in tenants)
                )
    else:
        scope, tenants = "self", set(me.tenants)
        users = {req.user: me}
    now = api._now()
    rl = g.rate_limits
    return {
        "scope": scope,
        "models": {
            "global": _models(api, None),
            "tenants": [{"tenant_id": t, **_models(api, t)} for t in sorted(tenants)],
            "unknown_model_price": g.unknown_model_price,
        },
        "budgets": {
            "default_budget_usd": g.budgets.default_daily_usd,
            "period": g.budgets.period,
            "time_zone": g.budgets.time_zone,
            "default_max_output_tokens": g.budgets.default_max_output_tokens,
        },
        "rate_limits": {
            "default_requests_per_minute": rl.default_requests_per_minute,
            "default_max_concurrent_requests": rl.default_max_concurrent_requests,
            "default_input_tokens_per_minute": rl.default_input_tokens_per_minute,
            "default_output_tokens_per_minute": rl.default_output_tokens_per_minute,
            "default_total_tokens_per_minute": rl.default_total_tokens_per_minute,
        },
        "tenants": [api._tenant_view(t, now) for t in sorted(tenants)],
        "users": [{"user_id": u, **settings_json(users[u])} for u in sorted(users)],
    }
