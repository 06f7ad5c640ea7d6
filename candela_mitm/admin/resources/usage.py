"""Admin API: usage and the spend leaderboard, read from the ledger."""

from __future__ import annotations

from typing import Any, Literal

from candela_mitm import errors
from candela_mitm.admin.base import AdminBase
from candela_mitm.admin.params import MAX_LEADERBOARD_LIMIT
from candela_mitm.admin.parsing import (
    bad_param,
    day_range,
    int_param,
    moment_param,
)
from candela_mitm.admin.routes import AdminRequest, AdminResponse, Handled
from candela_mitm.admin.views import usd_out
from candela_mitm.errors import Refused


class Usage(AdminBase):
    """The /usage and /leaderboard routes."""

    def usage(self, req: AdminRequest, _p: Any, q: dict[str, str], _b: Any) -> Handled:
        user = q.get("user")
        if req.role != "admin":
            if user is None:
                user = req.user
            elif user != req.user:
                raise Refused(errors.forbidden("A developer may only read their own usage"))
        first, last = day_range(moment_param(q, "since"), moment_param(q, "until"))
        tenant = q.get("tenant")
        rows = self.rt.ledger.usage(user, tenant, first, last)
        return AdminResponse(
            200,
            {
                "user_id": user,
                "tenant_id": tenant,
                "since": first,
                "until": last,
                "spend_usd": usd_out(sum(r.spend_usd for r in rows)),
                "tokens_in": sum(r.tokens_in for r in rows),
                "tokens_out": sum(r.tokens_out for r in rows),
                "requests": sum(r.requests for r in rows),
                "models": [
                    {
                        "model": r.model,
                        "provider": r.provider,
                        "spend_usd": usd_out(r.spend_usd),
                        "tokens_in": r.tokens_in,
                        "tokens_out": r.tokens_out,
                        "requests": r.requests,
                    }
                    for r in rows
                ],
            },
        )

    def leaderboard(self, _r: Any, _p: Any, q: dict[str, str], _b: Any) -> Handled:
        by = q.get("by", "tenant")
        if by not in ("tenant", "user"):
            raise bad_param("by", "must be 'tenant' or 'user'")
        by_: Literal["tenant", "user"] = "tenant" if by == "tenant" else "user"
        since, until = moment_param(q, "since"), moment_param(q, "until")
        limit = int_param(q, "limit", 1, MAX_LEADERBOARD_LIMIT)
        first, last = day_range(since, until)
        rows = self.rt.ledger.leaderboard(by_, first, last, limit)
        return AdminResponse(
            200,
            {
                "by": by,
                "since": first,
                "until": last,
                "rows": [
                    {
                        "rank": i,
                        "key": r.key,
                        "spend_usd": usd_out(r.spend_usd),
                        "tokens_in": r.tokens_in,
                        "tokens_out": r.tokens_out,
                        "requests": r.requests,
                    }
                    for i, r in enumerate(rows, 1)
                ],
            },
        )

