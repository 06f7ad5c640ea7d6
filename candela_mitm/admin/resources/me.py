"""Admin API: GET /me, the caller's own settings, spend and budgets."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from candela_mitm.admin.base import AdminBase
from candela_mitm.admin.routes import AdminRequest, AdminResponse, Handled
from candela_mitm.admin.views import grant_json, usd_out
from candela_mitm.governance.identity import KeyScope
from candela_mitm.governance.ledger import KeyBudget
from candela_mitm.governance.users import UserSettings
from candela_mitm.state.ports import LIMIT_FIELDS


class Me(AdminBase):
    """The caller's own view."""

    def me(self, req: AdminRequest, _p: Any, _q: Any, _b: Any) -> Handled:
        s = self.rt.users.settings(req.user)
        now = self._now()
        status = self.rt.ledger.status(req.user, s.daily_budget_usd, now, s.budget_period)
        return AdminResponse(
            200,
            {
                "user_id": req.user,
                "role": req.role,
                "via": req.via,
                "tenants": list(s.tenants),
                "day": status.day,
                "daily_budget_usd": s.daily_budget_usd,
                "budget_period": status.period,
                "period_starts_at": status.period_starts_at,
                "spent_today_usd": usd_out(self.rt.ledger.spent_today(req.user, now)),
                "spent_period_usd": usd_out(status.spent_usd),
                "reserved_usd": usd_out(status.reserved_usd),
                "remaining_usd": usd_out(status.remaining_usd),
                "resets_at": status.resets_at,
                "requests_per_minute": s.requests_per_minute,
                **{name: getattr(s, name) for name in LIMIT_FIELDS},
                "grants": [grant_json(g) for g in status.grants],
                "tenant_budgets": [self._tenant_view(t, now) for t in s.tenants],
                "key_budget": self._key_view(req.key_scope, s, now),
            },
        )

    def _key_view(
        self, key: KeyScope | None, s: UserSettings, now: datetime
    ) -> dict[str, Any] | None:
        if key is None or key.budget_usd is None:
            return None
        budget = KeyBudget(key.key_id, key.budget_id or key.key_id, key.budget_usd)
        k = self.rt.ledger.key_status(budget, s.budget_period, now)
        return {
            "key_id": k.key_id,
            "budget_usd": k.budget_usd,
            "period": k.period,
            "spent_usd": usd_out(k.spent_usd),
            "reserved_usd": usd_out(k.reserved_usd),
            "remaining_usd": usd_out(k.remaining_usd),
            "resets_at": k.resets_at,
        }

