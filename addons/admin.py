"""Admin: answers the /admin/v1 API (admin-api.md) once Auth has said who is calling."""

from __future__ import annotations

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.admin.handlers import AdminApi
from candela_mitm.admin.routes import AdminRequest
from candela_mitm.runtime import Runtime

from .flowstate import (
    answer_json,
    answered,
    ctx_of,
    decoded_body,
    deny,
    fail_closed,
    for_routes,
    only_when,
)


class Admin:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.api = AdminApi(rt)
        self.limit = rt.config.limits.max_body_bytes

    @for_routes("admin")
    @only_when(lambda self, flow: getattr(ctx_of(flow), "kind", None) == "admin")
    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.kind != "admin":
            return
        if c.principal is None:  # Auth answers first; never serve an unknown caller
            deny(flow, errors.unauthenticated())
            return
        body = await decoded_body(flow, self.limit)
        if body is None:
            return
        req = AdminRequest(
            method=flow.request.method,
            path=flow.request.path,
            user=c.principal.user,
            role=c.principal.role,
            body=body,
            via=c.principal.via,
            request_id=c.span_id,
            key_scope=c.principal.key_scope,
        )
        resp = await self.rt.blocking(self.api.handle, req)
        answer_json(flow, resp.status, resp.payload, dict(resp.headers))
        c.denial_code = resp.error
