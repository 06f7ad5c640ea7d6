"""Admin: answers the /admin/v1 API (admin-api.md) once Auth has said who is calling."""

from __future__ import annotations

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.admin import AdminApi, AdminRequest
from candela_mitm.encoding import TooLarge, decode_body
from candela_mitm.runtime import Runtime

from .flowstate import answer_json, answered, ctx_of, deny, fail_closed


class Admin:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.api = AdminApi(rt)
        self.limit = rt.config.limits.max_body_bytes

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.kind != "admin":
            return
        if c.principal is None:  # Auth answers first; never serve an unknown caller
            deny(flow, errors.unauthenticated())
            return
        try:
            body = decode_body(
                flow.request.raw_content or b"",
                flow.request.headers.get("content-encoding", ""),
                self.limit,
            )
        except TooLarge:
            deny(flow, errors.payload_too_large(self.limit))
            return
        except ValueError as e:
            deny(flow, errors.bad_request(f"the body cannot be decoded: {e}"))
            return
        req = AdminRequest(
            method=flow.request.method,
            path=flow.request.path,
            user=c.principal.user,
            role=c.principal.role,
            body=body,
            via=c.principal.via,
            request_id=c.span_id,
        )
        resp = await self.rt.blocking(self.api.handle, req)
        answer_json(flow, resp.status, resp.payload, dict(resp.headers))
        c.denial_code = resp.error
