"""LocalGuard: in `candela` (laptop mode), only this machine's own clients, speaking JSON, get in."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os

from mitmproxy import connection, http

from candela_mitm import errors
from candela_mitm.enforcement import workload
from candela_mitm.local.guard import (
    LOOPBACK_NAMES,
    TOKEN_HEADER,
    allowed_host_names,
    host_allowed,
    is_json_content_type,
    token_path,
    ui_token,
)
from candela_mitm.runtime import Runtime

from . import mitm_patches
from .flowstate import answered, ctx_of, deny, fail_closed

log = logging.getLogger("candela.localguard")

_JSON_KINDS = ("proxy", "chat", "local", "admin")
_BODY_METHODS = ("POST", "PUT", "PATCH")


class LocalGuard:
    """The connecting program must belong to Candela's own user, root or `local.allowed_uids`
    (read from the kernel's socket table, not from anything the program sends); Host must be
    loopback on Candela's port (no DNS rebinding); bodies must be declared JSON (no cross-site
    text/plain or form POSTs); management writes carry the per-install token. Does nothing in
    candela-server, nor on the transparent listener."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.active = rt.command == "local"
        # candela-server: nothing to guard, and its hooks are not called (mitm_patches.HookTable)
        self.idle_hooks = (
            frozenset()
            if self.active
            else frozenset({"client_connected", "client_disconnected", "requestheaders"})
        )
        self.names = allowed_host_names(rt.config.listen.host)
        self.token = ui_token(token_path(rt.config.audit.sqlite_path)) if self.active else ""
        self.uids = frozenset({os.geteuid(), 0, *rt.config.local.allowed_uids})
        self.beyond_loopback = rt.config.listen.host not in LOOPBACK_NAMES
        self.foreign: dict[str, int | None] = {}  # client connection id -> the refused owner

    def _owner(self, peer: tuple, sock: tuple) -> tuple[bool, int | None]:
        """(allowed, uid) of a connection's peer program: its socket's owner, asked of the
        kernel by the connection's 4-tuple. Blocking (netlink, or /proc/net/tcp* without it)."""
        try:
            loopback = ipaddress.ip_address(peer[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            # another machine: it can only connect when the operator listens beyond loopback
            return self.beyond_loopback, None
        uid = workload.owner_uid(peer[0], peer[1], (sock[0], sock[1]))
        return uid in self.uids, uid

    async def client_connected(self, client: connection.Client) -> None:
        if not self.active or mitm_patches.is_transparent(client):
            return
        if not client.peername or not client.sockname:
            return
        try:
            allowed, uid = await self.rt.blocking(self._owner, client.peername, client.sockname)
        except Exception:  # cannot tell who connected: refuse (fail closed)
            log.exception("the owner of a local connection could not be read")
            allowed, uid = False, None
        if not allowed:
            self.foreign[client.id] = uid

    def client_disconnected(self, client: connection.Client) -> None:
        self.foreign.pop(client.id, None)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if not self.active or c is None or c.intercepted or answered(flow):
            return
        if flow.client_conn.id in self.foreign:
            uid = self.foreign[flow.client_conn.id]
            who = f"uid {uid}" if uid is not None else "an unknown owner"
            deny(
                flow,
                errors.forbidden(
                    f"This connection belongs to another local user ({who}); candela serves "
                    "its own user's programs (local.allowed_uids adds others)"
                ),
            )
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
