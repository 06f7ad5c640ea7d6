"""Admin API: the /admin/v1 routes of admin-api.md, over the users, the ledger and the audit log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from candela_mitm import errors
from candela_mitm.admin.openapi import openapi_document
from candela_mitm.admin.parsing import parse_object
from candela_mitm.admin.resources.audit_log import AuditLog
from candela_mitm.admin.resources.grants import Grants
from candela_mitm.admin.resources.keys import Keys
from candela_mitm.admin.resources.me import Me
from candela_mitm.admin.resources.tenants import Tenants
from candela_mitm.admin.resources.usage import Usage
from candela_mitm.admin.resources.users import Users
from candela_mitm.admin.routes import (
    AdminRequest,
    AdminResponse,
    Handled,
    Route,
    check_path_params,
    check_query_ids,
    find_routes,
    parse_query,
)
from candela_mitm.errors import Refused, StoreUnavailable


class AdminApi(Me, Users, Grants, Keys, Tenants, Usage, AuditLog):
    """Answers admin calls. Blocking (store, ledger and audit-log reads): run `handle` on a
    worker thread (Runtime.blocking), never on the event loop.

    Every change is audited before it is made: the `admin_action` entry (actor, action, target,
    before, after) must be committed to the audit ledger first, or the change is refused with
    503 and nothing changes. If the change then fails, a second entry with the same action and
    `outcome: "failed"` follows it, so the trail never claims a change that did not happen
    without saying so.
    """

    def handle(self, req: AdminRequest) -> AdminResponse:
        """The answer to one call: every refusal, raised wherever it is found, is answered here."""
        try:
            return self._dispatch(req)
        except Refused as r:
            return AdminResponse.of(r.denial)
        except StoreUnavailable:
            return AdminResponse.of(errors.governance_unavailable("the state store is unavailable"))

    def _dispatch(self, req: AdminRequest) -> Handled:
        bare, _, query = req.path.partition("?")
        routes, params = find_routes(req.path)
        if not routes:
            raise Refused(errors.not_found(bare))
        method = req.method.upper()
        route = next((r for r in routes if r.method == method), None)
        if route is None:
            allowed = tuple(sorted(r.method for r in routes))
            raise Refused(errors.method_not_allowed(method, bare, allowed))
        scoped = self._tenant_admin_handler(req, route)
        if scoped is None and route.admin_only and req.role != "admin":
            raise Refused(errors.forbidden(f"{method} {route.template} is for admins only"))
        check_path_params(params)
        q = parse_query(query, route.query)
        check_query_ids(q)
        body = parse_object(req.body) if method in ("PUT", "POST") else {}
        if scoped is not None:
            return scoped(req, params, q, body)
        handler: Callable[..., Handled] = getattr(self, route.handler)
        return handler(req, params, q, body)

    # -- tenant admins: scoped in admin/tenant_scope.py ---------------------------------------

    def _tenant_admin_handler(
        self, req: AdminRequest, route: Route
    ) -> Callable[..., Handled] | None:
        """The tenant-admin version of a route, for a tenant admin; None otherwise (and for a
        route it answers as to a developer)."""
        if req.role != "tenant_admin":
            return None
        from candela_mitm.admin import tenant_scope  # it builds on this module

        scoped = tenant_scope.HANDLERS.get(route.handler)
        if scoped is None:
            return None
        return lambda r, p, q, b: scoped(tenant_scope.TenantScope(self, r), p, q, b)


    def openapi(self, _r: Any, _p: Any, _q: Any, _b: Any) -> Handled:
        return AdminResponse(200, openapi_document())

    # -- the policy in force (admin/policy_view.py) -------------------------------------------

    def policy(self, req: AdminRequest, _p: Any, _q: Any, _b: Any) -> Handled:
        from candela_mitm.admin.policy_view import policy_view  # it builds on this module

        return AdminResponse(200, policy_view(self, req))
