"""Tenant admins: the admin API as seen by a `tenant_admin`, scoped to the tenants it administers.

A tenant admin's own `tenants` are the tenants it administers. It reads what belongs to them
(their users, spend, leaderboard, grants, keys and audit entries) and may create grants and keys
for the users it manages; every other admin route answers 403 `forbidden`.

Two circles of users, so that nothing it does reaches past its tenants:
- it *sees* a user who belongs to at least one of its tenants (with only those tenants shown,
  and only the spend attributed to them);
- it *manages* (grants, keys, rotate, revoke) a developer whose every tenant is one of its own,
  and itself for keys: a key or a grant for a user shared with another tenant would spend in
  that tenant too, and a key for an admin would be an admin key.

Each answer is checked here, then made by the admin handler (as an admin would make it, so the
audit entry, the validation and the shapes are the same), or computed here from the ledger's
rows filtered to the tenants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from candela_mitm import errors
from candela_mitm.admin.handlers import AdminApi
from candela_mitm.admin.params import MAX_LEADERBOARD_LIMIT
from candela_mitm.admin.parsing import bad_param, day_range, int_param, moment_param
from candela_mitm.admin.resources.audit_log import audit_page
from candela_mitm.admin.routes import AdminRequest, AdminResponse
from candela_mitm.admin.views import usd_out, user_json
from candela_mitm.audit.query import AuditScope
from candela_mitm.errors import Refused
from candela_mitm.governance.users import UserSettings
from candela_mitm.state.ports import KeyRecord, SpendRow, day_of, nano_to_usd


def _forbidden(what: str) -> Refused:
    return Refused(errors.forbidden(f"A tenant admin may only {what}"))


class TenantScope:
    """One call of a tenant admin: its tenants, and the users it sees and manages."""

    def __init__(self, api: AdminApi, req: AdminRequest) -> None:
        self.api = api
        self.rt = api.rt
        self.req = req
        self.me = req.user
        self.tenants = frozenset(self.rt.users.settings(req.user).tenants)
        self._settings: dict[str, UserSettings] = {}

    # -- who ----------------------------------------------------------------------------------

    def settings(self, user: str) -> UserSettings:
        """A user's settings, read once per call."""
        if user not in self._settings:
            self._settings[user] = self.rt.users.settings(user)
        return self._settings[user]

    def known_users(self) -> set[str]:
        live = {r.user_id for r in self.rt.store.list_users()}
        return live | {u for u in self.api._configured_ids() if self.api._known(u)}

    def sees(self, user: str) -> bool:
        return user == self.me or bool(set(self.settings(user).tenants) & self.tenants)

    def manages(self, user: str) -> bool:
        s = self.settings(user)
        if s.deleted or (s.source == "default" and user != self.me):
            return False
        if user == self.me:
            return True
        return s.role == "developer" and bool(s.tenants) and set(s.tenants) <= self.tenants

    def seen_users(self) -> set[str]:
        return {u for u in self.known_users() if self.sees(u)}

    def managed_users(self) -> set[str]:
        return {u for u in self.known_users() if self.manages(u)} | {self.me}

    def as_admin(self) -> AdminRequest:
        """The request, once checked here, as the admin handler answers it (the actor stays)."""
        return dataclasses.replace(self.req, role="admin")

    # -- spend within the tenants -------------------------------------------------------------

    def spend_rows(self, first: str | None, last: str | None) -> list[SpendRow]:
        return [r for r in self.rt.store.spend_rows(first, last) if r.tenant in self.tenants]


# -- the routes -----------------------------------------------------------------------------------
# Each takes (scope, params, query, body) like AdminApi's handlers take (req, ...).


def list_users(s: TenantScope, _p: Any, _q: Any, _b: Any) -> AdminResponse:
    today = day_of(s.api._now())
    spent: dict[str, int] = {}
    for r in s.spend_rows(today, today):
        spent[r.user_id] = spent.get(r.user_id, 0) + r.cost
    users = []
    for u in sorted(s.seen_users()):
        settings = s.settings(u)
        shown = dataclasses.replace(
            settings, tenants=tuple(t for t in settings.tenants if t in s.tenants)
        )
        users.append(user_json(shown, nano_to_usd(spent.get(u, 0))))
    return AdminResponse(200, {"day": today, "count": len(users), "users": users})


def create_grant(s: TenantScope, p: dict[str, str], q: Any, body: Any) -> AdminResponse:
    user = p["user"]
    if user == s.me:
        raise _forbidden("grant to users of its tenants, not to itself")
    if not s.manages(user):
        raise _forbidden("grant to developers whose tenants are all its own")
    return s.api.create_grant(s.as_admin(), p, q, body)


def list_grants(s: TenantScope, p: dict[str, str], q: Any, body: Any) -> AdminResponse:
    if not s.sees(p["user"]):
        raise _forbidden("read the grants of users of its tenants")
    return s.api.list_grants(s.as_admin(), p, q, body)


def list_tenants(s: TenantScope, p: Any, q: Any, body: Any) -> AdminResponse:
    now = s.api._now()
    tenants = [s.api._tenant_view(t, now) for t in sorted(s.tenants)]
    return AdminResponse(200, {"count": len(tenants), "tenants": tenants})


def create_key(s: TenantScope, p: Any, q: Any, body: dict[str, Any]) -> AdminResponse:
    user = body.get("user_id", s.me)
    if isinstance(user, str) and not s.manages(user):
        raise _forbidden("mint keys for itself and developers whose tenants are all its own")
    return s.api.create_key(s.as_admin(), p, q, body)


def list_keys(s: TenantScope, p: Any, q: dict[str, str], body: Any) -> AdminResponse:
    user = q.get("user")
    if user is not None:
        if not s.manages(user):
            raise _forbidden("list the keys of itself and the developers it manages")
        return s.api.list_keys(s.as_admin(), p, q, body)
    every = s.api.list_keys(s.as_admin(), p, q, body).payload["keys"]
    managed = s.managed_users()
    keys = [k for k in every if k["user_id"] in managed]
    return AdminResponse(200, {"user_id": None, "count": len(keys), "keys": keys})


def _managed_key(s: TenantScope, key_id: str) -> KeyRecord:
    current = next((k for k in s.rt.store.api_keys() if k.key_id == key_id), None)
    if current is None or not s.manages(current.user_id):
        raise Refused(errors.key_not_found(key_id))  # as for a developer: nothing learnt
    return current


def revoke_key(s: TenantScope, p: dict[str, str], q: Any, body: Any) -> AdminResponse:
    _managed_key(s, p["key"])
    return s.api.revoke_key(s.as_admin(), p, q, body)


def rotate_key(s: TenantScope, p: dict[str, str], q: Any, body: Any) -> AdminResponse:
    _managed_key(s, p["key"])
    return s.api.rotate_key(s.as_admin(), p, q, body)


def usage(s: TenantScope, p: Any, q: dict[str, str], body: Any) -> AdminResponse:
    """The usage route once per tenant asked for (all of the admin's by default), summed."""
    user, tenant = q.get("user"), q.get("tenant")
    first, last = day_range(moment_param(q, "since"), moment_param(q, "until"))
    if user is not None and not s.sees(user):
        raise _forbidden("read the usage of users of its tenants")
    if tenant is not None and tenant not in s.tenants:
        raise _forbidden("read the usage of its own tenants")
    per_tenant = [
        s.api.usage(s.as_admin(), p, {**q, "tenant": t}, body).payload
        for t in ([tenant] if tenant else sorted(s.tenants))
    ]
    models: dict[tuple[str, str], dict[str, Any]] = {}
    for part in per_tenant:
        for m in part["models"]:
            row = models.setdefault(
                (m["model"], m["provider"]),
                {**m, "spend_usd": 0.0, "tokens_in": 0, "tokens_out": 0, "requests": 0},
            )
            for k in ("spend_usd", "tokens_in", "tokens_out", "requests"):
                row[k] += m[k]
    rows = sorted(models.values(), key=lambda r: (-r["spend_usd"], r["model"], r["provider"]))
    for r in rows:
        r["spend_usd"] = usd_out(r["spend_usd"])
    return AdminResponse(
        200,
        {
            "user_id": user,
            "tenant_id": tenant,
            "since": first,
            "until": last,
            "spend_usd": usd_out(sum(r["spend_usd"] for r in rows)),
            "tokens_in": sum(r["tokens_in"] for r in rows),
            "tokens_out": sum(r["tokens_out"] for r in rows),
            "requests": sum(r["requests"] for r in rows),
            "models": rows,
        },
    )


def leaderboard(s: TenantScope, p: Any, q: dict[str, str], body: Any) -> AdminResponse:
    """Ranked from the spend attributed to its tenants only (by user: within them)."""
    by = q.get("by", "tenant")
    if by not in ("tenant", "user"):
        raise bad_param("by", "must be 'tenant' or 'user'")
    first, last = day_range(moment_param(q, "since"), moment_param(q, "until"))
    limit = int_param(q, "limit", 1, MAX_LEADERBOARD_LIMIT)
    totals: dict[str, list[int]] = {}
    for r in s.spend_rows(first, last):
        t = totals.setdefault(r.tenant if by == "tenant" else r.user_id, [0, 0, 0, 0])
        t[0] += r.cost
        t[1] += r.tokens_in
        t[2] += r.tokens_out
        t[3] += r.requests
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1][0], kv[0]))[:limit]
    rows = [
        {
            "rank": i,
            "key": key,
            "spend_usd": usd_out(nano_to_usd(c)),
            "tokens_in": n_in,
            "tokens_out": n_out,
            "requests": n,
        }
        for i, (key, (c, n_in, n_out, n)) in enumerate(ranked, 1)
    ]
    return AdminResponse(200, {"by": by, "since": first, "until": last, "rows": rows})


def audit(s: TenantScope, p: Any, q: dict[str, str], body: Any) -> AdminResponse:
    """The entries of its tenants, and the admin actions it made or that concern them."""
    scope = AuditScope(
        tenants=s.tenants,
        actor=s.me,
        targets=frozenset(s.managed_users() - {s.me}) | s.tenants,
    )
    return audit_page(s.rt.audit, q, scope)


Handler = Callable[[TenantScope, Any, Any, Any], AdminResponse]

# AdminApi handler name -> its tenant-admin version. An admin route missing here is 403 for a
# tenant admin (a route added later is closed to it until it is scoped here); a route open to
# developers and missing here answers a tenant admin as it answers a developer.
HANDLERS: dict[str, Handler] = {
    "list_users": list_users,
    "create_grant": create_grant,
    "list_grants": list_grants,
    "list_tenants": list_tenants,
    "create_key": create_key,
    "list_keys": list_keys,
    "revoke_key": revoke_key,
    "rotate_key": rotate_key,
    "usage": usage,
    "leaderboard": leaderboard,
    "audit": audit,
}
