"""ConnLimits: client connections are bounded in number per address and in how long a request takes to arrive."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import Counter
from dataclasses import dataclass

from mitmproxy import connection, http, tls

from candela_mitm import errors
from candela_mitm.runtime import Runtime

from . import mitm_patches

log = logging.getLogger("candela.connlimits")


def raw_denial(denial: errors.Denial) -> bytes:
    """A denial as a whole HTTP/1 response that closes its connection."""
    headers = {"Content-Type": "application/json", "Connection": "close", **denial.headers}
    return mitm_patches.assemble(
        http.Response.make(denial.status, json.dumps(denial.payload()).encode(), headers)
    )


@dataclass
class Deadline:
    """When a connection is closed if the request it waits for has not arrived, and why."""

    at: float
    what: str  # "head", "next head" (kept alive), "body"
    seconds: float
    flow: http.HTTPFlow | None = None  # whose body is awaited


def arrived(d: Deadline) -> bool:
    """The body a deadline waits for has arrived whole (its flow is past the request hook,
    or in it: decoding is the addons' time, not the client's)."""
    return d.flow is not None and d.flow.request.timestamp_end is not None


def expired(deadlines: dict[str, Deadline], now: float) -> list[str]:
    """The connections whose deadline has passed."""
    return [cid for cid, d in deadlines.items() if d.at <= now]


class ConnLimits:
    """Per client address, at most `limits.max_connections_per_client` connections (the next is
    answered 429 `too_many_connections` and closed). A connection's first request head must be
    whole within `limits.header_timeout_s`, a kept-alive connection's next one within
    `limits.idle_timeout_s` of the previous response, a body within `limits.body_timeout_s` of
    its head: past them 408 `request_timeout` and close (a kept-alive connection that sent
    nothing is closed silently, as servers do). A request being forwarded or streamed has no
    deadline here (`limits.upstream_timeout_s` is Upstream's). Heads over
    `limits.max_header_bytes` are refused before any flow exists (mitm_patches.limit_request_heads,
    installed by the server)."""

    def __init__(self, rt: Runtime) -> None:
        self.limits = rt.config.limits
        self.open: Counter[str] = Counter()  # address -> connections open
        self.address: dict[str, str] = {}  # connection id -> its address
        self.deadlines: dict[str, Deadline] = {}  # connection id -> its deadline, if waiting
        self.clients: dict[str, connection.Client] = {}
        self.active: dict[str, set[str]] = {}  # connection id -> its flows not yet answered (h2: many)
        # every request of this process between its head and its answer (or error), whichever
        # connection it came on; weak: a flow mitmproxy dropped without either hook leaves it
        self.under_way: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.sweeper: asyncio.Task[None] | None = None

    # -- connections ---------------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        addr = client.peername[0] if client.peername else ""
        cap = self.limits.max_connections_per_client
        if self.open[addr] >= cap:
            mitm_patches.close_client(client, raw_denial(errors.too_many_connections(cap)))
            client.error = "too many connections from this address"
            return
        self.open[addr] += 1
        self.address[client.id] = addr
        self.clients[client.id] = client
        self.wait(client.id, "head", self.limits.header_timeout_s)

    def client_disconnected(self, client: connection.Client) -> None:
        self.release(client)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """A connection Sni relays untouched (TLS that is no provider's) is no HTTP client of
        Candela's: no request deadlines (its bytes are its server's business), and it does not
        count against its address (host enforcement relays every HTTPS connection of the
        machine here, all from the machine's own few addresses)."""
        if data.ignore_connection:
            self.release(data.context.client)

    def release(self, client: connection.Client) -> None:
        addr = self.address.pop(client.id, None)
        self.clients.pop(client.id, None)
        self.deadlines.pop(client.id, None)
        self.active.pop(client.id, None)
        if addr is None:
            return
        self.open[addr] -= 1
        if self.open[addr] <= 0:
            del self.open[addr]

    # -- a request's arrival -------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.under_way.add(flow)
        cid = flow.client_conn.id
        if cid in self.address:
            self.active.setdefault(cid, set()).add(flow.id)
        self.wait(cid, "body", self.limits.body_timeout_s, flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self.finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.finished(flow)

    def requests_under_way(self) -> int:
        return len(self.under_way)

    def finished(self, flow: http.HTTPFlow) -> None:
        self.under_way.discard(flow)
        cid = flow.client_conn.id
        active = self.active.get(cid)
        if active is not None:
            active.discard(flow.id)
            if active:
                return  # another request on this connection (HTTP/2) is still under way
        self.wait(cid, "next head", self.limits.idle_timeout_s)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self.deadlines.pop(flow.client_conn.id, None)  # a session, not a request

    def wait(
        self, cid: str, what: str, seconds: float, flow: http.HTTPFlow | None = None
    ) -> None:
        if cid in self.address:
            self.deadlines[cid] = Deadline(time.monotonic() + seconds, what, seconds, flow)

    # -- the sweeper ---------------------------------------------------------------------------

    def running(self) -> None:
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().create_task(self.sweep_forever())

    def done(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None

    async def sweep_forever(self) -> None:
        shortest = min(
            self.limits.header_timeout_s, self.limits.idle_timeout_s, self.limits.body_timeout_s
        )
        interval = min(1.0, max(0.05, shortest / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep(time.monotonic())
            except Exception:  # a sweep that fails must not end the sweeping
                log.exception("connection deadline sweep failed")

    def sweep(self, now: float) -> None:
        for cid in expired(self.deadlines, now):
            d = self.deadlines.pop(cid)
            client = self.clients.get(cid)
            if client is None or arrived(d):
                continue  # gone, or being forwarded: Upstream's timeout is the one that counts
            raw = None if d.what == "next head" else raw_denial(errors.request_timeout(d.what, d.seconds))
            mitm_patches.close_client(client, raw)
