"""Admin API: tenants and their budgets and limits."""

from __future__ import annotations

from typing import Any

from candela_mitm.admin.base import AdminBase
from candela_mitm.admin.parsing import limit_field, no_unknown_fields, period_field, usd_field
from candela_mitm.admin.routes import AdminRequest, AdminResponse, Handled
from candela_mitm.admin.views import tenant_limits
from candela_mitm.state.ports import TENANT_LIMIT_FIELDS, TenantRecord


class Tenants(AdminBase):
    """The /tenants routes."""

    def list_tenants(self, _r: Any, _p: Any, _q: Any, _b: Any) -> Handled:
        now = self._now()
        ids = {r.tenant_id for r in self.rt.store.list_tenants()}
        ids |= set(self.rt.config.governance.tenants)
        for u in self.rt.config.users.values():
            ids |= set(u.tenants)
        for rec in self.rt.store.list_users():
            ids |= set(rec.tenants)
        tenants = [self._tenant_view(t, now) for t in sorted(ids)]
        return AdminResponse(200, {"count": len(tenants), "tenants": tenants})

    def put_tenant(
        self, req: AdminRequest, p: dict[str, str], _q: Any, body: dict[str, Any]
    ) -> Handled:
        tenant = p["tenant"]
        no_unknown_fields(body, ("budget_usd", "period", *TENANT_LIMIT_FIELDS))
        current = self.rt.users.tenant_settings(tenant)
        stored = self.rt.store.get_tenant(tenant)
        budget = current.budget_usd
        kind: str | None = stored.budget_period if stored else None
        if stored is None and current.source == "config":
            kind = self.rt.config.governance.tenants[tenant].period
        if "budget_usd" in body:  # null: no budget of the tenant's own
            budget = None if body["budget_usd"] is None else usd_field(body, "budget_usd", False)
        if "period" in body:
            kind = period_field(body, "period")
        limits = tenant_limits(current)
        for name in TENANT_LIMIT_FIELDS:
            if name in body:  # null: no limit
                limits[name] = limit_field(body, name)
        record = TenantRecord(tenant, budget, kind, self._now(), **limits)
        before = (
            {
                "budget_usd": current.budget_usd,
                "period": current.period.kind,
                **tenant_limits(current),
            }
            if current.source != "default"
            else None
        )
        after = {"budget_usd": budget, "period": kind or self.rt.users.period().kind, **limits}
        action = "tenant.update" if before is not None else "tenant.create"
        self._audited(req, action, tenant, before, after, lambda: self.rt.store.put_tenant(record))
        return AdminResponse(200 if before else 201, self._tenant_view(tenant, self._now()))

