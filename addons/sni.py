"""Sni: routes transparent-mode connections by TLS server name; provider hosts are governed, others
are tunnelled untouched, and what would go around governance is refused and audited.

Decided at the ClientHello, in this order: no SNI is refused (`no_sni`) from a sandbox whatever
the address, and under host enforcement (which relays every HTTPS connection here) towards a
provider address, else tunnelled untouched (TLS to an address names no server: it is not a
provider host's); a provider host (a name or family of interception.hosts) is decrypted and
governed, and forwarded to that same host unless a base_url pins its route; a name on a
provider's shared edge (interception.shared_edges) is decrypted and each of its requests' Host
read as the bytes pass: a provider Host there is refused (`domain_fronting`), the rest forwarded
re-encrypted; any other name to an address known to be a provider's is refused
(`sni_not_provider`); anything else is tunnelled untouched. Refusals are `bypass_attempt` audit entries with the process behind the
connection, read from the kernel (enforcement/workload.py).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
from hashlib import sha256
from typing import Any

from mitmproxy import connection, ctx, http, tcp, tls

from candela_mitm import errors
from candela_mitm.audit.actions import BYPASS_ATTEMPT
from candela_mitm.config import WorkloadRule
from candela_mitm.context import RequestContext
from candela_mitm.enforcement import host as host_enforcement
from candela_mitm.enforcement import interception, workload
from candela_mitm.enforcement.registry import SandboxRecord, SandboxRegistry, peer_workload
from candela_mitm.errors import Denial
from candela_mitm.governance import provider_keys
from candela_mitm.governance.identity import Principal, Via
from candela_mitm.governance.tenancy import TENANT_HEADER
from candela_mitm.observability.spans import TraceContext
from candela_mitm.runtime import Runtime

from . import mitm_patches
from .auth import plain_headers, query_of
from .flowstate import KEY, deny, fail_closed, only_when
from .upstream import replaces_provider_key

log = logging.getLogger("candela.sni")

DENIED = "interception_denied"
REFUSED = "interception_refused"


def _ip(address: str) -> str:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _remote_end(client: connection.Client) -> tuple[str, int] | None:
    """The client socket's other end: in transparent mode mitmproxy's sockname is the kernel's
    original destination (SO_ORIGINAL_DST), so the kernel can find the client's socket by its
    4-tuple (a wrong one would only cost the slower lookup by the local end)."""
    try:
        return (_ip(client.sockname[0]), client.sockname[1]) if client.sockname else None
    except ValueError:
        return None


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
        self.edges = interception.HostSet(rt.config.interception.shared_edges)
        self.registry = registry if registry is not None else SandboxRegistry()
        self.base_url_configured = {n for n, p in rt.config.providers.items() if p.base_url}
        self.enforce_state_path = host_enforcement.STATE_PATH
        self._refused: set[str] = set()  # client connection ids refused at the TLS handshake
        self._edge: set[str] = set()  # client connection ids on a shared edge (decrypted)
        self._streams: dict[str, interception.RequestStream] = {}  # their requests, as relayed
        self._workloads: dict[str, workload.Workload | None] = {}  # per client connection
        self._local: dict[str, bool] = {}
        self._enforced: tuple[int, frozenset[str]] = (-1, frozenset())
        self.candela_keys = frozenset(k.sha256 for k in rt.config.auth.api_keys)

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
        self._edge.discard(client.id)
        self._streams.pop(client.id, None)
        self._workloads.pop(client.id, None)

    def _enforced_addresses(self) -> frozenset[str]:
        """The provider addresses `candela enforce host` resolved (its state file, re-read when it
        changes)."""
        try:
            stamp = os.stat(self.enforce_state_path).st_mtime_ns
        except OSError:
            return frozenset()
        if stamp != self._enforced[0]:
            state = host_enforcement.EnforceState.load(self.enforce_state_path)
            addrs = {a for v in (state.providers.values() if state else ()) for a in v}
            self._enforced = (stamp, frozenset(addrs))
        return self._enforced[1]

    def _provider_addresses(self) -> set[str]:
        out: set[str] = set(self._enforced_addresses())
        for record in self.registry.records():
            out |= interception.provider_addresses(record.hosts, self.hosts)
        return out

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = data.context.client
        if not mitm_patches.is_transparent(client):
            return
        sni = data.client_hello.sni
        dst = data.context.server.address
        destination = f"{dst[0]}:{dst[1]}" if dst else None
        if not sni:
            if self._nameless_passes(client, dst):
                data.ignore_connection = True
                return
            # no name to route or check a Host against: refused
            self._refused.add(client.id)
            await self._audit_bypass(client, "no_sni", destination=destination)
        elif self.hosts.route_for(sni) is not None:
            return  # a provider: decrypted and governed
        elif sni in self.edges:
            # a provider's shared front end: decrypted, its requests read as they pass, in
            # HTTP/1.1 both ways (the bytes are relayed as they are)
            self._edge.add(client.id)
            data.context.server.alpn_offers = [b"http/1.1"]
        elif dst is not None and _ip(dst[0]) in self._provider_addresses():
            self._refused.add(client.id)
            await self._audit_bypass(client, "sni_not_provider", sni=sni, destination=destination)
        else:
            data.ignore_connection = True  # not a provider: tunnelled, never decrypted

    def _nameless_passes(self, client: connection.Client, dst: Any) -> bool:
        """TLS without SNI from this machine (host enforcement redirects all of its HTTPS) to an
        address no provider name resolved to: relayed, as any TLS to an address. From a sandbox,
        or to a provider address, a nameless connection is refused (nothing to govern it by)."""
        if dst is None or not client.peername:
            return False
        try:
            peer = _ip(client.peername[0])
            return (
                self.registry.lookup(peer) is None and _ip(dst[0]) not in self._provider_addresses()
            )
        except ValueError:
            return False

    def tls_start_client(self, data: tls.TlsData) -> None:
        client_id = data.context.client.id
        if client_id in self._refused:
            data.ssl_conn = None  # mitmproxy closes a client connection it has no TLS for
        elif client_id in self._edge and data.ssl_conn is not None:
            mitm_patches.client_speaks_http1(data.ssl_conn)

    def next_layer(self, nextlayer: mitm_patches.NextLayer) -> None:
        """Plain HTTP (port 80) to a host that is not a provider passes untouched, like TLS; on a
        shared edge, requests to other hosts are relayed, each of them read as it passes."""
        if nextlayer.context.client.id in self._edge:
            if mitm_patches.proposes_http_in_tls(nextlayer):
                self._edge_layer(nextlayer)
            return
        if not mitm_patches.proposes_plain_http(nextlayer):
            return  # only the first layer of a plain connection: inside TLS the SNI decided
        decision = interception.plaintext_decision(nextlayer.data_client(), self.hosts)
        if decision is None:  # asked again with the rest of the request head
            mitm_patches.withdraw_proposal(nextlayer, tunnel=False)
        elif decision.passthrough:
            # relayed as it is, each later request on the connection read as it passes: a
            # provider's Host behind the first request is refused like fronting on a shared edge
            self._streams[nextlayer.context.client.id] = interception.RequestStream(self.hosts)
            mitm_patches.tunnel_inspected(nextlayer)
        # else Candela's pipeline governs it (or refuses it, and audits that)

    def _edge_layer(self, nextlayer: mitm_patches.NextLayer) -> None:
        decision = interception.plaintext_decision(nextlayer.data_client(), self.hosts)
        if decision is None:
            mitm_patches.withdraw_proposal(nextlayer, tunnel=False)  # the rest of the head first
        elif decision.passthrough:
            self._streams[nextlayer.context.client.id] = interception.RequestStream(self.hosts)
            mitm_patches.tunnel_inspected(nextlayer)
        # else the HTTP layer: requestheaders refuses it (a provider Host: domain fronting)

    async def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """A relayed plain-HTTP or shared-edge connection's bytes: every request head is read;
        from the first that may not pass (a provider's Host, or what cannot be read as
        requests) nothing more is forwarded."""
        stream = self._streams.get(flow.client_conn.id)
        if stream is None or not flow.messages:
            return
        message = flow.messages[-1]
        flow.messages.clear()  # relayed, not kept: a long-lived tunnel holds no history
        if not message.from_client:
            return
        if stream.refused:
            message.content = b""
            return
        heads = stream.feed(message.content)
        if not stream.refused:
            return
        message.content = b""  # nothing of this message reaches the server
        fronted = next((h.host for h in heads if h.host and self.hosts.route_for(h.host)), None)
        reason = "domain_fronting" if fronted else "edge_request_refused"
        denial = interception.misdirected(flow.client_conn.sni or "", fronted)
        raw = (
            f"HTTP/1.1 {denial.status} Misdirected Request\r\ncontent-type: application/json\r\n"
            f"content-length: {len(denial.body())}\r\nconnection: close\r\n\r\n"
        ).encode() + denial.body()
        try:
            ctx.master.commands.call("inject.tcp", flow, True, raw)
            mitm_patches.end_relay(flow, reason)
        except Exception:  # the refusal stands whether or not the client reads why
            log.debug("could not answer the refused edge request", exc_info=True)
        await self._audit_bypass(
            flow.client_conn, reason, sni=flow.client_conn.sni, host=fronted or None
        )

    # requests ---------------------------------------------------------------------------

    @only_when(lambda self, flow: mitm_patches.is_transparent(flow.client_conn))
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
        found = await self._workload(client)  # on every entry of this request, refusals too
        if found is not None:
            ctx.workload = found.fields()
        denial: Denial | None = None
        reason = ""
        if req.method.upper() == "CONNECT" or (
            req.http_version.startswith("HTTP/1") and req.authority
        ):
            denial, reason = interception.proxy_request_denied(req.method, req.url), "proxy_request"
        elif client.id in self._edge and host and self.hosts.route_for(host) is not None:
            # another name's TLS carrying a provider's Host: domain fronting
            deny(flow, interception.misdirected(sni or "", host))
            await self._audit_bypass(client, "domain_fronting", sni=sni, host=host)
            return
        elif interception.host_mismatch(sni, host):
            denial, reason = interception.misdirected(sni or "", host), "host_mismatch"
        elif route is None:
            denial, reason = interception.host_not_intercepted(host), "host_not_intercepted"
        elif sni and route.provider not in self.base_url_configured:
            # no base_url pins the route: the request goes to the host the app asked for
            up = self.rt.upstreams[route.provider]
            at = interception.upstream_at_host(up, route_name or "", sni)
            if at is None:
                denial = interception.region_not_configured(route.provider, sni, up.host)
                reason = "region_not_configured"
            elif at is not up:
                ctx.upstream = at
        if denial is not None:
            deny(flow, denial)
            await self._audit_denied(client, reason, record=record, sni=sni, host=host)
            return
        if not self._check_provider_key(ctx, flow, route.provider if route else ""):
            await self._audit_denied(
                client,
                "foreign_provider_key",
                record=record,
                sni=sni,
                host=host,
                provider=route.provider if route else None,
                key_fingerprint=ctx.provider_key_fingerprint,
            )
            return
        rule = None
        if found is not None:
            ctx.workload_rule = workload.matching_rule(self.rt.config.governance.workloads, found)
            if ctx.workload_rule is not None:
                rule = self.rt.config.governance.workloads[ctx.workload_rule]
        self._attribute(ctx, flow, record, rule)

    def _check_provider_key(self, ctx: RequestContext, flow: http.HTTPFlow, route: str) -> bool:
        """Fingerprint the provider key the app sent (audited, never the key); where Candela
        does not replace it, only one of the organisation's may go on (403 otherwise)."""
        req = flow.request
        key = provider_keys.presented(plain_headers(req.headers), query_of(req))
        if key is None or sha256(key.encode()).hexdigest() in self.candela_keys:
            return True  # no key, or Candela's own credential (Auth reads it)
        check = self.rt.provider_keys.check(key)
        if check is not None:
            ctx.provider_key_fingerprint, ctx.provider_key_ours = (
                check.fingerprint,
                check.organisation,
            )
        if replaces_provider_key(self.rt.config.interception.replace_provider_keys, route):
            return True  # replaced: it never reaches the provider, and is recorded
        if check is not None and check.organisation:
            return True
        deny(flow, errors.foreign_provider_key(route, ctx.provider_key_fingerprint))
        return False

    def _attribute(
        self,
        ctx: RequestContext,
        flow: http.HTTPFlow,
        record: SandboxRecord | None,
        rule: WorkloadRule | None,
    ) -> None:
        """The user and tenant of the executable's rule, else of the sandbox, whatever
        credential the app sent (often a dummy); neither: Auth reads the credential."""
        user = rule.user if rule is not None and rule.user else None
        tenant = rule.tenant if rule is not None and rule.tenant else None
        if user is None and record is not None:
            user, tenant = record.user, tenant or record.tenant
        if user is None:
            return
        via: Via = "workload" if rule is not None and rule.user else "local"
        ctx.principal = Principal(user=user, role="developer", via=via, key_id=None)
        if tenant:
            # Auth checks it against the user's tenants like any requested tenant
            flow.request.headers[TENANT_HEADER] = tenant

    # audit ------------------------------------------------------------------------------

    async def _workload(self, client: connection.Client) -> workload.Workload | None:
        """The process behind a client connection, from the kernel; looked up once per
        connection (a scan of /proc, off the event loop)."""
        if client.id in self._workloads:
            return self._workloads[client.id]
        found: workload.Workload | None = None
        if client.peername:
            ip, port = _ip(client.peername[0]), client.peername[1]
            record, remote = self.registry.lookup(ip), _remote_end(client)
            try:
                if record is not None:
                    found = await self.rt.blocking(peer_workload, record, ip, port, remote)
                else:  # this machine (host enforcement, loopback): this namespace's tables
                    found = await self.rt.blocking(
                        functools.partial(workload.peer, ip, port, remote=remote)
                    )
            except Exception:  # identity is evidence, not a gate: the decision does not wait on it
                log.debug("no process found for %s:%d", ip, port, exc_info=True)
        if len(self._workloads) > 65536:
            self._workloads.clear()
        self._workloads[client.id] = found
        return found

    async def _who(self, client: connection.Client, record: SandboxRecord | None) -> dict[str, Any]:
        address, port = (client.peername[0], client.peername[1]) if client.peername else ("", 0)
        ip = _ip(address) if address else ""
        record = record or self.registry.lookup(ip)
        w = await self._workload(client)
        return {
            "client_address": ip,
            "client_port": port,
            "enforcement": "sandbox" if record else "host",
            "sandbox": record.name if record else None,
            "user_id": record.user if record else None,
            "tenant_id": record.tenant if record else None,
            "pid": w.pid if w else None,
            "comm": w.comm if w else None,
            "exe": w.exe if w else None,
            "exe_sha256": w.exe_sha256 if w else None,
            "uid": w.uid if w else None,
            "cgroup": w.cgroup if w else None,
            "container_id": w.container_id if w else None,
        }

    async def _audit_bypass(self, client: connection.Client, reason: str, **fields: Any) -> None:
        """A connection refused because it would go around governance (`bypass_attempt`)."""
        entry = {"reason": reason, **await self._who(client, None), **fields}
        entry["tgid"] = entry["pid"]  # as the kernel guard's entries name the process
        if not self.rt.audit.record(BYPASS_ATTEMPT, **entry):
            log.error(
                "bypass attempt (%s) from %s not audited: audit queue full",
                reason,
                entry["client_address"],
            )

    async def _audit_denied(
        self,
        client: connection.Client,
        reason: str,
        record: SandboxRecord | None = None,
        **fields: Any,
    ) -> None:
        entry = {"reason": reason, **await self._who(client, record), **fields}
        if not self.rt.audit.record(DENIED, **entry):
            log.error(
                "interception denial (%s) from %s not audited: audit queue full",
                reason,
                entry["client_address"],
            )
