"""Auth: who is calling (401 otherwise) and which tenant they act for (403 if not theirs)."""

from __future__ import annotations

import dataclasses

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.errors import Denial
from candela_mitm.runtime import Runtime
from candela_mitm.tenancy import requested_tenant, resolve_tenant

from .flowstate import answered, ctx_of, deny, fail_closed

# Routes that answer without knowing the caller.
_PUBLIC = ("health",)


class Auth:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.kind in _PUBLIC:
            return
        if c.principal is None:  # transparent sandboxes are attributed before this
            result = await self.rt.authenticator.authenticate(
                flow.request.headers, flow.request.query
            )
            if isinstance(result, Denial):
                deny(flow, result)
                return
            c.principal = result
        settings = await self.rt.blocking(self.rt.users.settings, c.principal.user)
        if settings.deleted:
            deny(flow, errors.unauthenticated("This user has been removed"))
            return
        if settings.role != c.principal.role:
            c.principal = dataclasses.replace(c.principal, role=settings.role)
        c.settings = settings
        tenant = resolve_tenant(
            c.principal.user, requested_tenant(flow.request.headers), list(settings.tenants)
        )
        if isinstance(tenant, Denial):
            deny(flow, tenant)
            return
        c.tenant = tenant
