"""Admin API: users (list, create or update, delete)."""

from __future__ import annotations

from typing import Any

from candela_mitm import errors
from candela_mitm.admin.base import AdminBase
from candela_mitm.admin.params import MAX_RPM
from candela_mitm.admin.parsing import (
    int_field,
    invalid,
    limit_field,
    no_unknown_fields,
    period_field,
    tenants_field,
    usd_field,
)
from candela_mitm.admin.routes import AdminRequest, AdminResponse, Handled
from candela_mitm.admin.views import settings_json, user_json
from candela_mitm.errors import Refused
from candela_mitm.state.ports import LIMIT_FIELDS, UserRecord, day_of, rfc3339, to_us


class Users(AdminBase):
    """The /users routes."""

    def _spent_today(self) -> dict[str, float]:
        today = day_of(self._now())
        rows = self.rt.ledger.leaderboard("user", since=today, until=today)
        return {r.key: r.spend_usd for r in rows if r.key}

    def list_users(self, _r: Any, _p: Any, _q: Any, _b: Any) -> Handled:
        records = self.rt.store.list_users(include_deleted=True)
        removed = {r.user_id for r in records if r.deleted}
        spent = self._spent_today()
        # users who only spent today (e.g. an OIDC identity never configured) are users too
        ids = (self._configured_ids() | set(spent) | {r.user_id for r in records}) - removed
        users = [user_json(self.rt.users.settings(u), spent.get(u, 0.0)) for u in sorted(ids)]
        return AdminResponse(200, {"day": day_of(self._now()), "count": len(users), "users": users})

    def put_user(
        self, req: AdminRequest, p: dict[str, str], _q: Any, body: dict[str, Any]
    ) -> Handled:
        user = p["user"]
        no_unknown_fields(
            body,
            (
                "role",
                "tenants",
                "daily_budget_usd",
                "budget_period",
                "requests_per_minute",
                *LIMIT_FIELDS,
            ),
        )
        current = self.rt.users.settings(user)
        existed = self._known(user)
        # a partial body changes only what it names: start from the settings in force
        role: str = current.role
        tenants = current.tenants
        budget = current.daily_budget_usd
        rpm = current.requests_per_minute
        stored = self.rt.store.get_user(user)
        cfg_user = self.rt.config.users.get(user)
        period: str | None = (stored.budget_period if stored else None) or (
            cfg_user.budget_period if cfg_user else None
        )
        if "budget_period" in body:
            period = period_field(body, "budget_period")
        if "role" in body:
            if body["role"] not in ("admin", "tenant_admin", "developer"):
                raise invalid("role", "must be 'admin', 'tenant_admin' or 'developer'")
            role = body["role"]
            if role != "admin" and user in self.rt.users.admins:
                raise invalid("role", "cannot be changed: the user is an admin by auth.admins")
        if "tenants" in body:
            tenants = tenants_field(body["tenants"])
        if "daily_budget_usd" in body:
            budget = usd_field(body, "daily_budget_usd", positive=False)
        if "requests_per_minute" in body:
            rpm = int_field(body, "requests_per_minute", MAX_RPM)
        limits = {name: getattr(current, name) for name in LIMIT_FIELDS}
        for name in LIMIT_FIELDS:
            if name in body:  # null: no limit of the user's own (the default applies)
                limits[name] = limit_field(body, name)
        now = self._now()
        record = UserRecord(
            user_id=user,
            role=role,
            tenants=tenants,
            daily_budget_usd=budget,
            requests_per_minute=rpm,
            updated_at=now,
            budget_period=period,
            **limits,
        )
        before = settings_json(current) if existed else None
        after = {
            "role": role,
            "tenants": list(tenants),
            "daily_budget_usd": budget,
            "budget_period": period or self.rt.users.period().kind,
            "requests_per_minute": rpm,
            **limits,
        }
        action = "user.update" if existed else "user.create"
        self._audited(req, action, user, before, after, lambda: self.rt.store.put_user(record))
        saved = self.rt.users.settings(user)
        return AdminResponse(
            200 if existed else 201, user_json(saved, self.rt.ledger.spent_today(user, now))
        )

    def delete_user(self, req: AdminRequest, p: dict[str, str], _q: Any, _b: Any) -> Handled:
        user = p["user"]
        if not self._known(user):
            raise Refused(errors.user_not_found(user))
        if user == req.user:
            raise Refused(errors.bad_request("An admin cannot delete their own user", user_id=user))
        current = self.rt.users.settings(user)
        now = self._now()

        def remove() -> None:
            if self.rt.store.get_user(user) is None:
                # a user from the config has no record yet: keep their settings, then mark it
                self.rt.store.put_user(
                    UserRecord(
                        user_id=user,
                        role=current.role,
                        tenants=current.tenants,
                        daily_budget_usd=current.daily_budget_usd,
                        requests_per_minute=current.requests_per_minute,
                        updated_at=now,
                        budget_period=current.budget_period.kind,
                        **{name: getattr(current, name) for name in LIMIT_FIELDS},
                    )
                )
            self.rt.store.delete_user(user, to_us(now))

        self._audited(req, "user.delete", user, settings_json(current), None, remove)
        return AdminResponse(200, {"user_id": user, "deleted": True, "deleted_at": rfc3339(now)})

