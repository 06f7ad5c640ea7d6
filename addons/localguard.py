"""LocalGuard: in `candela` (laptop mode), only this machine's own clients, speaking JSON, get in."""

from __future__ import annotations

import hmac

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.local.guard import (
    TOKEN_HEADER,
    allowed_host_names,
    host_allowed,
    is_json_content_type,
    token_path,
    ui_token,
)
from candela_mitm.runtime import Runtime

from .flowstate import answered, ctx_of, deny, fail_closed

_JSON_KINDS = ("proxy", "chat", "local", "admin")
_BODY_METHODS = ("POST", "PUT", "PATCH")


class LocalGuard:
    """Host must be loopback on Candela's port (no DNS rebinding), bodies must be declared JSON
    (no cross-site text/plain or form POSTs), management writes carry the per-install token.
    Does nothing in candela-server, nor on the transparent listener."""

    def __init__(self, rt: Runtime) -> None:
        self.active = rt.command == "local"
        self.names = allowed_host_names(rt.config.listen.host)
        self.token = ui_token(token_path(rt.config.audit.sqlite_path)) if self.active else ""

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if not self.active or c is None or c.intercepted or answered(flow):
            return
        req = flow.request
        port = flow.client_conn.sockname[1] if flow.client_conn.sockname else None
        if not host_allowed(req.host_header, self.names, port):
            deny(flow, errors.host_not_allowed(req.host_header))
            return
        method = req.method.upper()
        if c.kind in _JSON_KINDS and method in _BODY_METHODS:
            ctype = req.headers.get("content-type")
            has_body = req.headers.get("content-length", "0") != "0" or "transfer-encoding" in req.headers
            if has_body and not is_json_content_type(ctype):
                deny(flow, errors.unsupported_media_type(ctype))
                return
        if c.kind == "local" and method in _BODY_METHODS and c.rest.startswith("/api/"):
            sent = req.headers.get(TOKEN_HEADER, "")
            if not hmac.compare_digest(sent.encode(), self.token.encode()):
                deny(
                    flow,
                    errors.forbidden(
                        f"The management API needs the {TOKEN_HEADER} header from the /_local/ page"
                    ),
                )
