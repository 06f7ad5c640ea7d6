"""Admin API: grants (budget top-ups with an expiry) of a user."""

from __future__ import annotations

from typing import Any

from candela_mitm import errors
from candela_mitm.admin.base import AdminBase
from candela_mitm.admin.params import MAX_REASON_CHARS, text_ok
from candela_mitm.admin.parsing import invalid, no_unknown_fields, parse_rfc3339, usd_field
from candela_mitm.admin.routes import AdminRequest, AdminResponse, Handled
from candela_mitm.admin.views import grant_json, usd_out
from candela_mitm.errors import Refused


class Grants(AdminBase):
    """The /users/{user}/grants routes."""

    def create_grant(
        self, req: AdminRequest, p: dict[str, str], _q: Any, body: dict[str, Any]
    ) -> Handled:
        user = p["user"]
        if not self._known(user):
            raise Refused(errors.user_not_found(user))
        no_unknown_fields(body, ("amount_usd", "expires_at", "reason"))
        for name in ("amount_usd", "expires_at", "reason"):
            if name not in body:
                raise invalid(name, "is required")
        amount = usd_field(body, "amount_usd", positive=True)
        now = self._now()
        expires = parse_rfc3339(body["expires_at"])
        if expires is None:
            raise invalid(
                "expires_at", "must be an RFC 3339 time with an offset, e.g. 2030-01-31T00:00:00Z"
            )
        if expires <= now:
            raise invalid("expires_at", "must be in the future")
        reason = body["reason"]
        if not text_ok(reason, MAX_REASON_CHARS):
            raise invalid(
                "reason", f"must be a non-empty string of at most {MAX_REASON_CHARS} characters"
            )
        row = self.rt.ledger.new_grant(user, amount, expires, reason, req.user, now)
        view = grant_json(self.rt.ledger.grant_view(row, now))
        self._audited(req, "grant.create", user, None, view, lambda: self.rt.store.add_grant(row))
        return AdminResponse(201, view)

    def list_grants(self, _r: Any, p: dict[str, str], _q: Any, _b: Any) -> Handled:
        user = p["user"]
        grants = self.rt.ledger.list_grants(user, self._now())
        return AdminResponse(
            200,
            {
                "user_id": user,
                "remaining_usd": usd_out(sum(g.remaining_usd for g in grants)),
                "grants": [grant_json(g) for g in grants],
            },
        )

