"""Sni: routes transparent-mode connections by TLS server name; provider hosts are governed, others
are tunnelled untouched, and what would go around governance is refused and audited."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

from mitmproxy import connection, http, tls

from candela_mitm.context import RequestContext
from candela_mitm.enforcement import interception
from candela_mitm.enforcement.registry import SandboxRecord, SandboxRegistry, peer_process
from candela_mitm.errors import Denial
from candela_mitm.governance.identity import Principal
from candela_mitm.governance.tenancy import TENANT_HEADER
from candela_mitm.observability.spans import TraceContext
from candela_mitm.runtime import Runtime

from . import mitm_patches
from .flowstate import KEY, deny, fail_closed

log = logging.getLogger("candela.sni")

DENIED = "interception_denied"
REFUSED = "interception_refused"


def _ip(address: str) -> str:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _is_local_address(address: str) -> bool:
    """True for an address of this machine: binding to it succeeds only then."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


class Sni:
    def __init__(self, rt: Runtime, registry: SandboxRegistry | None = None) -> None:
        self.rt = rt
        self.hosts = interception.HostMap(rt.config.interception.hosts)
        self.registry = registry if registry is not None else SandboxRegistry()
        self.base_url_configured = {n for n, p in rt.config.providers.items() if p.base_url}
        self._refused: set[str] = set()  # client connection ids refused at the TLS handshake
        self._local: dict[str, bool] = {}

    # connections ------------------------------------------------------------------------

    def _client_allowed(self, address: str) -> bool:
        """Loopback, this machine (host-wide redirects), or a registered sandbox: never the
        network, which would turn the transparent listener into an open relay."""
        ip = _ip(address)
        if ipaddress.ip_address(ip).is_loopback or self.registry.lookup(ip) is not None:
            return True
        if ip not in self._local:
            if len(self._local) > 1024:
                self._local.clear()
            self._local[ip] = _is_local_address(ip)
        return self._local[ip]

    def client_connected(self, client: connection.Client) -> None:
        if not mitm_patches.is_transparent(client):
            return
        address = client.peername[0] if client.peername else ""
        try:
            allowed = bool(address) and self._client_allowed(address)
        except ValueError:
            allowed = False
        if not allowed:
            client.error = "Candela's transparent listener serves this machine and its sandboxes"
            self.rt.audit.record(REFUSED, reason="remote_client", client_address=address)

    def client_disconnected(self, client: connection.Client) -> None:
        self._refused.discard(client.id)

    def _provider_addresses(self) -> set[str]:
        out: set[str] = set()
        for record in self.registry.records():
            out |= interception.provider_addresses(record.hosts, self.hosts)
        return out

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = data.context.client
        if not mitm_patches.is_transparent(client):
            return
        sni = data.client_hello.sni
        if sni:
            if self.hosts.route_for(sni) is None:
                data.ignore_connection = True  # not a provider: tunnelled, never decrypted
            return
        dst = data.context.server.address
        if dst is not None and _ip(dst[0]) in self._provider_addresses():
            # no name to route or check a Host header against: refused, not tunnelled
            self._refused.add(client.id)
            await self._audit_denied(client, "sni_missing", destination=f"{dst[0]}:{dst[1]}")
        else:
            data.ignore_connection = True

    def tls_start_client(self, data: tls.TlsData) -> None:
        if data.context.client.id in self._refused:
            data.ssl_conn = None  # mitmproxy closes a client connection it has no TLS for

    def next_layer(self, nextlayer: mitm_patches.NextLayer) -> None:
        """Plain HTTP (port 80) to a host that is not a provider passes untouched, like TLS."""
        if not mitm_patches.proposes_plain_http(nextlayer):
            return  # only the first layer of a plain connection: inside TLS the SNI decided
        decision = interception.plaintext_decision(nextlayer.data_client(), self.hosts)
        if decision is not None and not decision.passthrough:
            return  # Candela's pipeline governs it (or refuses it, and audits that)
        # tunnelled untouched; with no decision yet, asked again with the rest of the request head
        mitm_patches.withdraw_proposal(nextlayer, tunnel=decision is not None)

    # requests ---------------------------------------------------------------------------

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        if not mitm_patches.is_transparent(client):
            return
        peer = _ip(client.peername[0]) if client.peername else None
        req = flow.request
        sni = client.sni
        host = req.host_header
        route_name = self.hosts.route_for(sni or host)
        route = interception.request_route(route_name, req.path) if route_name else None
        ctx = RequestContext(
            kind="proxy",
            provider=route.provider if route else None,
            rest=route.rest if route else req.path,
            trace=TraceContext.from_headers(req.headers.get("traceparent")),
            client_address=peer,
            intercepted=True,
        )
        flow.metadata[KEY] = ctx
        record = self.registry.lookup(peer)
        denial: Denial | None = None
        reason = ""
        if req.method.upper() == "CONNECT" or (
            req.http_version.startswith("HTTP/1") and req.authority
        ):
            denial, reason = interception.proxy_request_denied(req.method, req.url), "proxy_request"
        elif interception.host_mismatch(sni, host):
            denial, reason = interception.misdirected(sni or "", host), "host_mismatch"
        elif route is None:
            denial, reason = interception.host_not_intercepted(host), "host_not_intercepted"
        else:
            up = self.rt.upstreams[route.provider]
            if sni and interception.upstream_host_mismatch(
                up, sni, route.provider in self.base_url_configured
            ):
                denial = interception.region_not_configured(route.provider, sni, up.host)
                reason = "region_not_configured"
        if denial is not None:
            deny(flow, denial)
            await self._audit_denied(client, reason, record=record, sni=sni, host=host)
            return
        if record is not None:
            self._attribute(ctx, flow, record)

    def _attribute(self, ctx: RequestContext, flow: http.HTTPFlow, record: SandboxRecord) -> None:
        """The sandbox's user and tenant, whatever credential the app sent (often a dummy)."""
        ctx.principal = Principal(user=record.user, role="developer", via="local", key_id=None)
        if record.tenant:
            # Auth checks it against the user's tenants like any requested tenant
            flow.request.headers[TENANT_HEADER] = record.tenant

    # audit ------------------------------------------------------------------------------

    async def _audit_denied(
        self,
        client: connection.Client,
        reason: str,
        record: SandboxRecord | None = None,
        **fields: Any,
    ) -> None:
        address, port = (client.peername[0], client.peername[1]) if client.peername else ("", 0)
        ip = _ip(address) if address else ""
        record = record or self.registry.lookup(ip)
        who: tuple[int, str] | None = None
        if record is not None:
            try:
                who = await self.rt.blocking(peer_process, record, ip, port)
            except Exception:  # the audit entry matters more than the process name
                log.debug("no process found for %s:%d", ip, port, exc_info=True)
        entry = {
            "reason": reason,
            "client_address": ip,
            "client_port": port,
            "sandbox": record.name if record else None,
            "user_id": record.user if record else None,
            "tenant_id": record.tenant if record else None,
            "pid": who[0] if who else None,
            "comm": who[1] if who else None,
            **fields,
        }
        if not self.rt.audit.record(DENIED, **entry):
            log.error("interception denial (%s) from %s not audited: audit queue full", reason, ip)
