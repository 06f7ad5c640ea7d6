"""Every use of mitmproxy internals, in one module, each with the versions it was verified on.

Candela's addons otherwise use mitmproxy's addon API only: hooks, flows, options, `ctx`,
`taddons`/`tflow`. What is here reaches past it, for reasons measured or required (each says
which), and would break silently if mitmproxy changed the piece it relies on. So nothing
outside this module touches them (tests/addons/test_mitm_patches.py checks the other addons'
imports), and that test module also fails when an internal changes shape: run it first when
mitmproxy is upgraded.

Verified on mitmproxy 11.0.2 (the newest for Python 3.11; pyproject admits >=11.0.2,<13):

| What                       | mitmproxy internal                                       | Why                 |
|----------------------------|----------------------------------------------------------|---------------------|
| `HookTable`, `use_table`   | AddonManager subclassed, instance `__class__` swapped,   | CPU per request     |
|                            | `.chain`, `traverse`, `logger`, `trigger_event`,         | (addons/chain.py)   |
|                            | `handle_lifecycle`                                       |                     |
| `remove_addons`            | AddonManager `.chain` and `.lookup` edited               | CPU per request     |
| `install_error_pages`      | `proxy.layers.http._http1.make_error_response` replaced, | JSON errors         |
|                            | `net.http.http1.assemble_response`                       |                     |
| `listen_with_reuse_port`   | `proxy.mode_servers.AsyncioServerInstance.listen`        | `workers: N`        |
|                            | replaced (`.mode`, `.handle_stream`)                     |                     |
| `abort_flow`, `end_relay`  | Proxyserver `.connections`, ConnectionHandler            | upstream timeout    |
|                            | `.transports`, ConnectionIO `.writer`/`.handler`         | 504; a refused edge |
| `close_websocket`,         | `proxy.layers.websocket.WebsocketLayer.relay_messages`   | a session cut with  |
| `install_websocket_close`  | wrapped (`client_ws`/`server_ws` `.state`, `.send2`,     | its own close code  |
|                            | `.conn`, `done`); `WebSocketMessageInjected`, Proxyserver| (addons/websocket)  |
|                            | `.inject_event`                                          |                     |
| `fast_option_reads`        | `optmanager._Option.current` replaced (`.value`,         | CPU per request     |
|                            | `._default`, `optmanager.unset`)                         |                     |
| `free_finished_streams`    | `proxy.layers.HttpLayer.__init__` wrapped, `.streams`    | CPU per request     |
|                            | (popped at DropStream), HttpStream `client_state`,       | (cycle collector)   |
|                            | `server_state`, `child_layer`, `Context.layers`          |                     |
| `frame_chunks_once`        | `proxy.layers.http._http1.Http1Server.send` wrapped      | CPU per streamed    |
|                            | (`ResponseHeaders`/`ResponseData`, `.conn`): the chunked | chunk               |
|                            | framing read with the head, not at every chunk           |                     |
| `install_spare_connections`| `proxy.server`'s module global `asyncio` replaced by a   | time to first byte  |
|                            | copy whose `open_connection` (the one call               | (a connect's five   |
|                            | `ConnectionHandler.open_connection` makes to connect)    | loop wake-ups;      |
|                            | hands out a spare first (providers/spares.py)            | providers/spares.py)|
| `limit_request_heads`      | `proxy.layers.http._http1.Http1Server.read_headers`      | 431 on head bombs   |
|                            | wrapped (`.buf`, `.conn`, `.state`, `.done`)             | (its FIXME)         |
| `close_client`, `assemble` | Proxyserver `.connections`, ConnectionHandler            | 408/429 and close   |
|                            | `.transports`; `net.http.http1.assemble_response`        | (addons/connlimits) |
| `is_transparent`,          | `proxy.mode_specs.TransparentMode`, `proxy.layers`       | plain HTTP of other |
| `proposes_plain_http`,     | (`HttpLayer`, `TCPLayer`, `modes.TransparentProxy`),     | hosts tunnelled     |
| `withdraw_proposal`        | `Context.layers` (a Layer appends itself when made)      | (addons/sni.py)     |
| `proposes_http_in_tls`,    | `layers.ClientTLSLayer`, `TCPLayer(context, ignore)`     | shared edges:       |
| `tunnel_inspected`         | (a TCPFlow per connection, `tcp_message` hooks)          | Host checked,       |
| `client_speaks_http1`      | tlsconfig's `AppData` on the client's SSL.Connection     | forwarded as bytes  |
|                            | (`client_alpn`, read by its ALPN select callback)        | (addons/sni.py)     |
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import logging
import re
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, connection, ctx, exceptions, flow, hooks, http, optmanager
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.mode_specs import TransparentMode
from mitmproxy.version import VERSION

from candela_mitm.providers.spares import Address, Connected, Spares

from .flowstate import KEY as CTX_KEY

log = logging.getLogger("candela.mitm_patches")

VERIFIED_VERSIONS = ("11.0.2",)  # every patch below was verified on these

NextLayer = layer.NextLayer  # the next_layer hook's argument (public; its layers are not)


def verified(version: str = VERSION) -> bool:
    """Whether the running mitmproxy is one this module was verified on."""
    return version in VERIFIED_VERSIONS


def warn_if_unverified(version: str = VERSION) -> bool:
    """Log (once, at start) when the running mitmproxy is not a verified one; True if it is."""
    if verified(version):
        return True
    log.warning(
        "mitmproxy %s: Candela's uses of its internals were verified on %s only "
        "(run tests/addons/test_mitm_patches.py against this version)",
        version,
        ", ".join(VERIFIED_VERSIONS),
    )
    return False


# -- the addon manager (verified 11.0.2) ------------------------------------------------------


def remove_addons(master: Any, drop: Callable[[Any], bool]) -> list[Any]:
    """Take the addons `drop` picks out of a master's chain and lookup, before the master runs.

    AddonManager.remove() would call their `done` hooks synchronously, which some define as
    coroutines; never started, they have nothing to finish. Their options stay registered.
    """
    manager = master.addons
    dropped = [a for a in manager.chain if drop(a)]
    manager.chain = [a for a in manager.chain if a not in dropped]
    for name, addon in list(manager.lookup.items()):
        if addon in dropped:
            del manager.lookup[name]
    return dropped


_ARG_NAMES: dict[type[hooks.Hook], tuple[str, ...]] = {}


def hook_args(event: hooks.Hook) -> list[Any]:
    """`event.args()`: the values of the hook's dataclass fields, in order.

    mitmproxy's `Hook.args` asks `dataclasses.fields` each time (a generator over the class's
    fields: 3% of Candela's CPU under load); the names are looked up once per hook class here.
    """
    names = _ARG_NAMES.get(type(event))
    if names is None:
        fields = dataclasses.fields(event)  # type: ignore[arg-type]  # every Hook is a dataclass
        names = _ARG_NAMES[type(event)] = tuple(f.name for f in fields)
    return [getattr(event, name) for name in names]


Hook = Callable[..., Any]
# A hook table's entry: the hook, and the route kinds it does anything for (None: every flow)
Entry = tuple[Hook, frozenset[str] | None]


class HookTable(addonmanager.AddonManager):
    """mitmproxy's AddonManager that offers an event only to the addons that have its hook.

    mitmproxy walks its whole chain for every event (a generator, a getattr, a context manager
    and a coroutine per addon) and, after each flow event, again for `update`, which no addon of
    Candela's chain has: 8 walks of 10 addons per proxied request. This one looks the hooks up
    once per chain (the list is rebuilt when the chain changes) and calls them in the same
    order, each guarded as mitmproxy guards it: an exception is logged and the next addon runs,
    AddonHalt ends the event, OptionsError propagates. Installed on a master by `use_table`.

    Left out as well (issue 21: each call of a hook that returns at once costs 2-10 µs with the
    caches cold, a coroutine more for an async one): the hooks an addon names in its
    `idle_hooks` (those that do nothing in this process, fixed when the addon is made: the
    local UI's in candela-server), and, for a flow whose context says its route kind, a hook
    marked for other route kinds only (flowstate.for_routes: the admin API's on a proxied
    request).
    """

    def _hooks_for(self, name: str) -> list[Entry] | None:
        """The hooks of `name`, in chain order; None if mitmproxy's walk must decide."""
        d = self.__dict__
        if d.get("_candela_chain") != self.chain:  # identity per addon: add, remove, reassign
            d["_candela_chain"] = list(self.chain)
            d["_candela_hooks"] = {}
        table: dict[str, list[Entry] | None] = d["_candela_hooks"]
        if name in table:
            return table[name]
        fns: list[Entry] | None = []
        for a in addonmanager.traverse(self.chain):
            fn = getattr(a, name, None)
            if not fn or isinstance(fn, types.ModuleType):  # a module named like a hook: skipped
                continue
            if not callable(fn):  # mitmproxy raises AddonManagerError: let it
                fns = None
                break
            if name in getattr(a, "idle_hooks", ()):
                continue
            fns.append((fn, getattr(fn, "candela_routes", None)))  # type: ignore[union-attr]
        table[name] = fns
        return fns

    async def trigger_event(self, event: hooks.Hook) -> None:
        fns = self._hooks_for(event.name)
        if fns is None:
            await super().trigger_event(event)
            return
        if not fns:
            return
        args = hook_args(event)
        meta = getattr(args[0], "metadata", None) if args else None  # a flow's
        for fn, routes in fns:
            if routes is not None and type(meta) is dict:
                c = meta.get(CTX_KEY)
                if c is None or c.kind not in routes:
                    continue
            try:
                res = fn(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                addonmanager.logger.error(f"Addon error: {e}", exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self._hooks_for("update") != []:
            message = hook_args(event)[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


def use_table(master: Any) -> None:
    """Make a master's AddonManager a HookTable: same state, same chain, faster dispatch."""
    master.addons.__class__ = HookTable


# -- error pages (verified 11.0.2) ------------------------------------------------------------


def install_error_pages(render: Callable[[int, str], http.Response]) -> None:
    """mitmproxy's own HTTP/1 error pages (bad request, unreachable upstream) rendered by
    `render(status_code, message)`. mitmproxy has no option for them: the HTTP/1 layer calls a
    module function, which is replaced."""
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http import _http1

    def make_error_response(status_code: int, message: str = "") -> bytes:
        return http1.assemble_response(render(status_code, message))

    _http1.make_error_response = make_error_response


# -- listeners (verified 11.0.2) --------------------------------------------------------------


def listen_with_reuse_port() -> None:
    """Make mitmproxy's TCP listeners bind with SO_REUSEPORT, so that `workers: N` processes
    listen on one port and the kernel spreads new connections across them. mitmproxy 11 binds
    its listeners itself (AsyncioServerInstance.listen) and has no option for it. Idempotent."""
    from mitmproxy.proxy import mode_servers

    cls = mode_servers.AsyncioServerInstance
    original = cls.listen
    if getattr(original, "candela_reuse_port", False):
        return

    async def listen(self: Any, host: str, port: int) -> list[Any]:
        if self.mode.transport_protocol != "tcp" or not port:
            return await original(self, host, port)
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]

    listen.candela_reuse_port = True  # type: ignore[attr-defined]
    cls.listen = listen  # type: ignore[method-assign]


# -- a flow's connections (verified 11.0.2) ---------------------------------------------------


def abort_flow(f: http.HTTPFlow, raw_response: bytes | None, reason: str) -> bool:
    """Write `raw_response` (a whole HTTP/1 response; None: nothing) straight into the client's
    connection and close it, and cancel the server connection's handler.

    For an answer mitmproxy cannot give: while it waits for the upstream's response headers, no
    hook runs that could set `flow.response`. False when the flow's connection is gone.
    """
    try:
        handler = ctx.master.addons.get("proxyserver").connections.get(f.client_conn.id)
    except Exception:
        handler = None
    if handler is None:
        return False
    client_io = handler.transports.get(f.client_conn)
    server_io = handler.transports.get(f.server_conn)
    if raw_response is not None and client_io is not None and client_io.writer is not None:
        try:
            client_io.writer.write(raw_response)
            client_io.writer.close()
        except Exception:
            log.debug("client gone before the response could be written")
    if server_io is not None and server_io.handler is not None:
        server_io.handler.cancel(reason)
    return True


def end_relay(f: flow.Flow, reason: str) -> bool:
    """Close the server side of a relayed (TCP) flow: the relay then closes the client's side
    once it has sent what it holds, an injected answer included (the `inject.tcp` command).
    False when the flow's connection is gone."""
    try:
        handler = ctx.master.addons.get("proxyserver").connections.get(f.client_conn.id)
    except Exception:
        handler = None
    server_io = handler.transports.get(f.server_conn) if handler is not None else None
    if server_io is None or server_io.handler is None:
        return False
    server_io.handler.cancel(reason)
    return True


# -- WebSocket sessions (verified 11.0.2) -----------------------------------------------------


class _CloseRequest:
    """The message of an injected close: the WebSocket layer reads it as "close both sides"."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        self.from_client = False  # Candela closes: neither the client nor the upstream did


def install_websocket_close() -> None:
    """Let `close_websocket` close a live session with a code of Candela's choosing.

    mitmproxy 11 relays a close frame one side sends (WebsocketLayer.relay_messages) but has no
    way for an addon to send one: killing the flow does nothing once the WebSocket layer runs,
    and `inject.websocket` carries only messages. The layer's event handler is wrapped: an
    injected `_CloseRequest` sends a close frame with its code to both sides, closes both
    connections and ends the flow exactly as a close frame received would (websocket_end
    runs). Idempotent."""
    import time

    import wsproto.events
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers import websocket as wsl
    from mitmproxy.proxy.utils import expect
    from wsproto.connection import ConnectionState

    cls = wsl.WebsocketLayer
    original = cls.relay_messages
    if getattr(original, "candela_close", False):
        return

    @expect(events.DataReceived, events.ConnectionClosed, wsl.WebSocketMessageInjected)
    def relay_messages(self: Any, event: Any) -> layer.CommandGenerator[None]:
        msg = getattr(event, "message", None)
        if not isinstance(event, wsl.WebSocketMessageInjected) or not isinstance(
            msg, _CloseRequest
        ):
            return (yield from original(self, event))
        ws = self.flow.websocket
        ws.timestamp_end = time.time()
        ws.closed_by_client = False
        ws.close_code = msg.code
        ws.close_reason = msg.reason
        close = wsproto.events.CloseConnection(code=msg.code, reason=msg.reason)
        for side in (self.server_ws, self.client_ws):
            if side.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                yield side.send2(close)
            yield commands.CloseConnection(side.conn)
        yield wsl.WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done

    relay_messages.candela_close = True
    relay_messages.candela_original = original
    cls.relay_messages = relay_messages  # type: ignore[method-assign]


def close_websocket(f: http.HTTPFlow, code: int, reason: str) -> bool:
    """Close a live WebSocket session on both sides with `code` (install_websocket_close must
    have run). Queued after anything injected before it. False when the flow is not live."""
    from mitmproxy.proxy.layers import websocket as wsl

    if f.websocket is None or not f.live:
        return False
    event = wsl.WebSocketMessageInjected(f, _CloseRequest(code, reason))  # type: ignore[arg-type]
    try:
        ctx.master.addons.get("proxyserver").inject_event(event)
    except ValueError:  # the connection is gone
        return False
    return True


def send_to_client(f: http.HTTPFlow, content: bytes) -> bool:
    """Inject a text message to the client of a live session (mitmproxy's inject.websocket)."""
    if f.websocket is None or not f.live:
        return False
    ctx.master.commands.call("inject.websocket", f, True, content, True)
    return True


# -- request heads and client connections (verified 11.0.2) -----------------------------------

_HEAD_END = re.compile(rb"\r?\n\r?\n")


def head_overflows(buffered: bytes, limit: int) -> bool:
    """Whether a request head still being read is over `limit` bytes: more than that is
    buffered and no blank line ends a head within the first `limit` bytes."""
    if len(buffered) <= limit:
        return False
    return _HEAD_END.search(buffered, 0, limit + 4) is None


def limit_request_heads(limit: int, refusal: Callable[[], bytes]) -> None:
    """Refuse HTTP/1 request heads over `limit` bytes: the whole `refusal()` response is sent
    and the connection closed, before any hook sees a flow (nothing is audited or counted).

    mitmproxy 11 appends every received byte to the connection's buffer and looks for the end
    of the head again (`# FIXME: protect against header size DoS` in `Http1Server.read_headers`):
    a client sending an endless head grows the buffer without bound. The limit is process-wide;
    calling this again replaces it."""
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers.http import _http1

    cls = _http1.Http1Server
    original = getattr(cls.read_headers, "candela_original", cls.read_headers)

    def read_headers(self: Any, event: Any) -> Any:
        if isinstance(event, events.DataReceived) and len(self.buf) > limit:
            if head_overflows(bytes(self.buf), limit):
                yield commands.SendData(self.conn, refusal())
                yield commands.CloseConnection(self.conn)
                self.state = self.done
                return
        yield from original(self, event)

    read_headers.candela_original = original  # type: ignore[attr-defined]
    cls.read_headers = read_headers  # type: ignore[method-assign]


def assemble(response: http.Response) -> bytes:
    """A whole HTTP/1 response as bytes, for writing straight into a connection."""
    from mitmproxy.net.http import http1

    return http1.assemble_response(response)


def close_client(client: connection.Client, raw_response: bytes | None) -> bool:
    """Write `raw_response` (None: nothing) into a client connection and close it, whatever its
    layers are doing (reading a head, a body, or idle). False when the connection is gone."""
    try:
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
    except Exception:
        handler = None
    io = handler.transports.get(client) if handler is not None else None
    if io is None or io.writer is None:
        return False
    try:
        if raw_response is not None:
            io.writer.write(raw_response)
        io.writer.close()
    except Exception:
        log.debug("client gone before it could be closed")
    return True


# -- option reads (verified 11.0.2) -----------------------------------------------------------

# Values deepcopy returns as they are (copy._deepcopy_atomic): an option holding one is read
# without the copy.
_ATOMS = frozenset({type(None), bool, int, float, str, bytes})


def _current(self: Any) -> Any:
    """optmanager._Option.current without a deepcopy for an immutable value: the same value
    (deepcopy returns such a value itself), read without the copy machinery."""
    v = self._default if self.value is optmanager.unset else self.value
    if type(v) in _ATOMS:
        return v
    return copy.deepcopy(v)  # what current() returned: a copy the reader may change


def fast_option_reads() -> None:
    """Read an option holding a plain value without `copy.deepcopy` (twice while it is
    unset: `default` copies too). mitmproxy's HTTP layers read options per request
    (`body_size_limit`, `stream_large_bodies` in check_body_size, `proxy_debug` in every
    Layer's __init__, `validate_inbound_headers`, ...): ~100 py-spy samples in 8,000 at c1,
    ~15 µs of a request's CPU. Idempotent."""
    optmanager._Option.current = _current  # type: ignore[method-assign]


# -- finished HTTP streams (verified 11.0.2) --------------------------------------------------


def _consumed(_event: Any) -> Any:
    """A let-go stream's state: every event consumed silently, as `state_errored` does."""
    yield from ()


class _Streams(dict):  # HttpLayer.streams: dict[int, HttpStream]
    """HttpLayer.streams, letting go of each stream it drops once the next one is dropped.

    An HttpStream keeps its states as bound methods of itself (`client_state`,
    `server_state`) and sits in its own context's `layers`: two reference cycles, so every
    finished request's stream, flow, request, response, their headers and Candela's
    RequestContext (about 50 objects) were left to the cycle collector, not freed when the
    connection's layer dropped the stream. A dropped stream is let go of at the next drop on
    the connection, when its generator has long returned (the drop is its last command but a
    non-blocking send; no blocking command or wakeup of its own is pending): its states
    become `_consumed`, and it leaves its context's layers (its own fork's list). Upgraded
    streams (WebSocket, TCP) are never dropped, so never let go of."""

    __slots__ = ("_dropped",)

    def pop(self, key: Any, *default: Any) -> Any:
        stream = dict.pop(self, key, *default)
        dropped = getattr(self, "_dropped", None)
        if dropped is not None and dropped is not stream:
            _let_go(dropped)
        self._dropped = stream
        return stream


def _let_go(stream: Any) -> None:
    if getattr(stream, "child_layer", None) is not None:
        return  # upgraded: its child layer still runs in it
    stream.client_state = stream.server_state = _consumed
    layers = stream.context.layers
    for i in range(len(layers) - 1, -1, -1):
        if layers[i] is stream:
            del layers[i]
            break


def free_finished_streams() -> None:
    """Make every HttpLayer made from now on keep its streams in a `_Streams` (idempotent)."""
    cls = layers.HttpLayer
    if getattr(cls, "_candela_streams", False):
        return
    init = cls.__init__

    def __init__(self: Any, context: Any, mode: Any) -> None:
        init(self, context, mode)
        self.streams = _Streams()

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls._candela_streams = True  # type: ignore[attr-defined]


# -- a streamed response's chunks (verified 11.0.2) -------------------------------------------


def frame_chunks_once() -> None:
    """Decide how an HTTP/1 response's body is framed to the client once, with its head.

    `Http1Server.send` looks `transfer-encoding` up in the response's headers for every body
    chunk it sends (a MultiDict walk, each name lower-cased): relaying 512-token streams, a
    chunk a token, that lookup was ~10% of the event loop's py-spy samples in bare mitmproxy
    and in Candela alike (bench/README.md, issue 21). The head is on the wire before the first
    chunk, so the framing it announced cannot change: it is read from the same headers as the
    head is sent and kept on the layer; each chunk is then framed as mitmproxy frames it.
    Everything else (the head, the end, errors) is mitmproxy's own. Idempotent."""
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http import ResponseData, ResponseHeaders, _http1

    cls = _http1.Http1Server
    if getattr(cls.send, "candela_original", None) is not None:
        return
    original = cls.send

    def send(self: Any, event: Any) -> layer.CommandGenerator[None]:
        if type(event) is ResponseData:
            chunked = self.__dict__.get("candela_chunked")
            if chunked is not None:
                data = event.data
                raw = b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
                if raw:
                    yield commands.SendData(self.conn, raw)
                return
        elif type(event) is ResponseHeaders:
            te = event.response.headers.get("transfer-encoding", "")
            self.candela_chunked = "chunked" in te.lower()
        yield from original(self, event)

    send.candela_original = original  # type: ignore[attr-defined]
    cls.send = send  # type: ignore[method-assign]


# -- spare upstream connections (verified 11.0.2) -------------------------------------------

_spares: Spares | None = None


def install_spare_connections(wanted: Callable[[Address], bool]) -> Spares:
    """mitmproxy's server connections to the addresses `wanted` names take a spare (Spares)
    when there is one: the one call `ConnectionHandler.open_connection` makes to connect,
    `asyncio.open_connection(host, port, local_addr=...)`, is given its own module view of
    asyncio in which that function looks in the spares first (no `local_addr` asked: one is
    never set by Candela). Every other connection (a tunnel relayed to a host that is no
    provider, in transparent mode) connects as mitmproxy connects, with no spare beside it.
    Everything else in `open_connection` (its hooks, its cap on connections per address, its
    errors, what it does with the connection) is mitmproxy's own. Idempotent; called again, it
    keeps the spares and takes the new `wanted`."""
    global _spares
    from mitmproxy.proxy import server

    if _spares is not None:
        _spares.wanted = wanted
        return _spares
    connect = asyncio.open_connection
    spares = Spares(connect, wanted)

    async def open_connection(host: str, port: int, **kw: Any) -> Connected:
        if kw.get("local_addr") is None and spares.wanted((host, port)):
            got = spares.take((host, port))
            if got is not None:
                return got
        return await connect(host, port, **kw)

    shim = types.ModuleType(asyncio.__name__)  # server.py's own view of asyncio
    shim.__dict__.update(asyncio.__dict__)
    shim.open_connection = open_connection  # type: ignore[attr-defined]
    server.asyncio = shim
    _spares = spares
    return spares


# -- layers (verified 11.0.2) -----------------------------------------------------------------


def is_transparent(conn: connection.Client) -> bool:
    """Whether a client connection came in on a transparent listener."""
    return isinstance(conn.proxy_mode, TransparentMode)


def proposes_plain_http(nextlayer: NextLayer) -> bool:
    """Whether mitmproxy proposes HTTP as the first layer of a transparent connection, outside
    TLS (inside TLS, the SNI has decided)."""
    context = nextlayer.context
    proposed = nextlayer.layer
    return (
        is_transparent(context.client)
        and isinstance(proposed, layers.HttpLayer)
        and len(context.layers) == 2
        and isinstance(context.layers[0], modes.TransparentProxy)
        and context.layers[-1] is proposed
    )


def withdraw_proposal(nextlayer: NextLayer, *, tunnel: bool) -> None:
    """Undo mitmproxy's proposed layer (a Layer appends itself to the context's stack when it is
    made) and instead tunnel the connection untouched, or, `tunnel=False`, ask again once more
    of the request head has arrived."""
    context = nextlayer.context
    if nextlayer.layer is not None and nextlayer.layer in context.layers:
        context.layers.remove(nextlayer.layer)
    nextlayer.layer = layers.TCPLayer(context, ignore=True) if tunnel else None


def proposes_http_in_tls(nextlayer: NextLayer) -> bool:
    """Whether mitmproxy proposes HTTP as the layer right inside a transparent connection's
    decrypted TLS (the client's TLS terminated by Candela)."""
    context = nextlayer.context
    proposed = nextlayer.layer
    return (
        is_transparent(context.client)
        and isinstance(proposed, layers.HttpLayer)
        and context.layers[-1] is proposed
        and any(isinstance(x, layers.ClientTLSLayer) for x in context.layers[:-1])
    )


def tunnel_inspected(nextlayer: NextLayer) -> None:
    """Replace mitmproxy's proposed layer by a byte relay that still reports each message
    (`tcp_message`, a TCPFlow), so that an addon can read and drop what passes: inside
    TLS, the bytes are re-encrypted towards the server."""
    context = nextlayer.context
    if nextlayer.layer is not None and nextlayer.layer in context.layers:
        context.layers.remove(nextlayer.layer)
    nextlayer.layer = layers.TCPLayer(context, ignore=False)


def client_speaks_http1(ssl_conn: Any) -> None:
    """Make the client's TLS negotiate HTTP/1.1 (ALPN), whatever it offers besides: mitmproxy's
    TlsConfig stores the protocol to choose in the connection's app data, read by its ALPN
    select callback during the handshake. A client that offers no HTTP/1.1 fails the handshake."""
    app = ssl_conn.get_app_data()
    if isinstance(app, dict):
        app["client_alpn"] = b"http/1.1"
