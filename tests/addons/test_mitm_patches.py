"""addons/mitm_patches.py: the mitmproxy internals Candela relies on still have the shape it was
verified on (run this first after a mitmproxy upgrade), the patches do what they say, and no other
addon reaches into mitmproxy's internals."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import json
import logging
import socket
from pathlib import Path

import pytest
from mitmproxy import addonmanager, connection, hooks, http, options
from mitmproxy.addons import proxyserver
from mitmproxy.proxy import context, layer, layers, mode_servers, server
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode, _http1
from mitmproxy.proxy.mode_specs import ProxyMode, TransparentMode
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.version import VERSION

from candela_mitm.addons import mitm_patches
from tests.core.providers.test_spares import Accepting, settle

ADDONS = Path(mitm_patches.__file__).resolve().parent


def params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


# -- the version --------------------------------------------------------------------------------


def test_the_running_mitmproxy_is_a_verified_one():
    """A new mitmproxy: run this module, then add it to VERIFIED_VERSIONS."""
    assert mitm_patches.verified(), (
        f"mitmproxy {VERSION} is not in {mitm_patches.VERIFIED_VERSIONS}"
    )


def test_an_unverified_version_is_logged(caplog):
    with caplog.at_level(logging.WARNING, "candela.mitm_patches"):
        assert mitm_patches.warn_if_unverified("99.0") is False
        assert mitm_patches.warn_if_unverified(mitm_patches.VERIFIED_VERSIONS[0]) is True
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["mitmproxy 99.0"]


# -- the addon manager --------------------------------------------------------------------------


def master() -> DumpMaster:
    return DumpMaster(options.Options(), with_termlog=False, with_dumper=False)


def test_the_addon_manager_keeps_its_chain_and_lookup_as_plain_containers():
    async def check() -> None:
        m = master()
        assert type(m.addons) is addonmanager.AddonManager  # what use_table swaps from
        assert isinstance(m.addons.chain, list) and m.addons.chain
        assert isinstance(m.addons.lookup, dict)
        assert all(a in m.addons.chain for a in m.addons.lookup.values())
        assert list(addonmanager.traverse(m.addons.chain))  # walks addons and their children

    asyncio.run(check())


def test_the_manager_dispatch_methods_are_the_ones_hooktable_overrides():
    for name in ("trigger_event", "handle_lifecycle"):
        method = getattr(addonmanager.AddonManager, name)
        assert inspect.iscoroutinefunction(method) and params(method) == ["self", "event"]
        assert name in vars(mitm_patches.HookTable)
    assert isinstance(addonmanager.logger, logging.Logger)
    # the class swap needs the same instance layout: nothing declares slots
    assert "__slots__" not in vars(addonmanager.AddonManager)
    assert "__slots__" not in vars(mitm_patches.HookTable)


def test_every_hook_is_a_dataclass_whose_args_are_its_fields():
    f = tflow.tflow()
    for hook in (hooks.UpdateHook([f]), *(cls(f) for cls in _flow_hooks())):
        assert dataclasses.is_dataclass(hook)
        assert mitm_patches.hook_args(hook) == hook.args()


def _flow_hooks() -> list[type[hooks.Hook]]:
    from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook

    return [HttpRequestHook, HttpResponseHook]


def test_remove_addons_and_use_table_on_a_real_master():
    async def check() -> tuple[list[str], type]:
        m = master()
        dropped = mitm_patches.remove_addons(m, lambda a: type(a).__name__ == "Save")
        mitm_patches.use_table(m)
        assert "save" not in m.addons.lookup and not any(a in m.addons.chain for a in dropped)
        return [type(a).__name__ for a in dropped], type(m.addons)

    dropped, manager = asyncio.run(check())
    assert dropped == ["Save"] and manager is mitm_patches.HookTable


# -- error pages --------------------------------------------------------------------------------


def test_the_http1_layer_calls_its_module_level_error_page_function():
    assert params(_http1.make_error_response)[:2] == ["status_code", "message"]
    source = inspect.getsource(_http1)
    assert source.count("make_error_response(") >= 3  # the definition and the layer's calls


def test_installed_error_pages_are_rendered_by_candela(monkeypatch):
    monkeypatch.setattr(_http1, "make_error_response", _http1.make_error_response)  # restored

    def render(status: int, message: str) -> http.Response:
        return http.Response.make(status, json.dumps({"error": "x", "message": message}))

    mitm_patches.install_error_pages(render)
    raw = _http1.make_error_response(502, "no route")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and json.loads(body) == {
        "error": "x",
        "message": "no route",
    }


# -- listeners ----------------------------------------------------------------------------------


def test_asyncio_servers_bind_through_listen():
    cls = mode_servers.AsyncioServerInstance
    assert inspect.iscoroutinefunction(cls.listen) and params(cls.listen) == [
        "self",
        "host",
        "port",
    ]
    assert "await self.listen(host, port)" in inspect.getsource(cls)
    assert params(cls.handle_stream)[:3] == ["self", "reader", "writer"]
    assert ProxyMode.parse("reverse:http://127.0.0.1:9@8080").transport_protocol == "tcp"


def test_listen_with_reuse_port_is_idempotent(monkeypatch):
    cls = mode_servers.AsyncioServerInstance
    monkeypatch.setattr(cls, "listen", cls.listen)  # restored after the test
    original = cls.listen
    mitm_patches.listen_with_reuse_port()
    patched = cls.listen
    mitm_patches.listen_with_reuse_port()
    assert patched is not original and cls.listen is patched
    assert getattr(patched, "candela_reuse_port", False)


def test_a_patched_listener_shares_its_port():
    """Two servers on one port: what `workers: N` needs (the kernel spreads connections)."""

    class Instance:
        mode = ProxyMode.parse("reverse:http://127.0.0.1:9@0")

        async def handle_stream(self, reader, writer) -> None:
            writer.close()

    async def check() -> None:
        cls = mode_servers.AsyncioServerInstance
        saved = cls.listen
        try:
            mitm_patches.listen_with_reuse_port()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            first = await cls.listen(Instance(), "127.0.0.1", port)
            second = await cls.listen(Instance(), "127.0.0.1", port)  # refused without the patch
            assert first[0].sockets[0].getsockname() == second[0].sockets[0].getsockname()
            for s in (*first, *second):
                s.close()
        finally:
            cls.listen = saved  # type: ignore[method-assign]

    asyncio.run(check())


# -- a flow's connections -----------------------------------------------------------------------


def test_the_proxy_server_keeps_handlers_and_their_transports():
    ps = proxyserver.Proxyserver()
    assert ps.connections == {}
    fields = {f.name for f in dataclasses.fields(server.ConnectionIO)}
    assert {"handler", "reader", "writer"} <= fields
    assert "transports" in inspect.get_annotations(server.ConnectionHandler)


class FakeWriter:
    def __init__(self) -> None:
        self.data, self.closed = b"", False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True


class FakeTask:
    cancelled: str | None = None

    def cancel(self, msg: str | None = None) -> bool:
        self.cancelled = msg
        return True


def test_abort_flow_writes_to_the_client_and_cancels_the_server(monkeypatch):
    f = tflow.tflow()
    client_io = server.ConnectionIO(writer=FakeWriter())  # type: ignore[arg-type]
    server_io = server.ConnectionIO(handler=FakeTask())  # type: ignore[arg-type]

    class Handler:
        transports = {f.client_conn: client_io, f.server_conn: server_io}

    class Master:
        class addons:
            @staticmethod
            def get(name: str) -> object:
                assert name == "proxyserver"
                return type("PS", (), {"connections": {f.client_conn.id: Handler()}})()

    monkeypatch.setattr(mitm_patches.ctx, "master", Master(), raising=False)
    assert mitm_patches.abort_flow(f, b"HTTP/1.1 504 x\r\n\r\n", "upstream timeout")
    assert client_io.writer.data == b"HTTP/1.1 504 x\r\n\r\n" and client_io.writer.closed
    assert server_io.handler.cancelled == "upstream timeout"
    other = tflow.tflow()
    assert not mitm_patches.abort_flow(other, b"x", "gone")  # its connection is not there


# -- layers -------------------------------------------------------------------------------------


def transparent_context() -> context.Context:
    client = connection.Client(
        peername=("10.200.0.2", 40000),
        sockname=("10.200.0.1", 8080),
        timestamp_start=0,
        proxy_mode=ProxyMode.parse("transparent"),
    )
    return context.Context(client, options.Options())


def test_a_layer_appends_itself_to_its_context():
    ctx = transparent_context()
    modes.TransparentProxy(ctx)
    nl = layer.NextLayer(ctx)
    assert ctx.layers == [ctx.layers[0]] and isinstance(ctx.layers[0], modes.TransparentProxy)
    proposed = layers.HttpLayer(ctx, HTTPMode.transparent)
    assert ctx.layers[-1] is proposed
    nl.layer = proposed
    assert params(layers.TCPLayer)[:2] == ["context", "ignore"]
    assert isinstance(ctx.client.proxy_mode, TransparentMode)
    assert callable(nl.data_client)


@pytest.mark.parametrize("tunnel", [True, False])
def test_withdrawing_mitmproxys_proposal(tunnel):
    ctx = transparent_context()
    modes.TransparentProxy(ctx)
    nl = layer.NextLayer(ctx)
    nl.layer = layers.HttpLayer(ctx, HTTPMode.transparent)
    assert mitm_patches.is_transparent(ctx.client) and mitm_patches.proposes_plain_http(nl)
    mitm_patches.withdraw_proposal(nl, tunnel=tunnel)
    if tunnel:
        assert isinstance(nl.layer, layers.TCPLayer) and ctx.layers[-1] is nl.layer
    else:
        assert nl.layer is None
    assert not any(isinstance(x, layers.HttpLayer) for x in ctx.layers)
    assert len(ctx.layers) == (2 if tunnel else 1)


def test_inside_tls_nothing_is_proposed_as_plain_http():
    ctx = transparent_context()
    modes.TransparentProxy(ctx)
    layers.ServerTLSLayer(ctx)
    nl = layer.NextLayer(ctx)
    nl.layer = layers.HttpLayer(ctx, HTTPMode.transparent)
    assert not mitm_patches.proposes_plain_http(nl)


def test_http_inside_decrypted_tls_is_proposed_and_can_be_relayed_inspected():
    ctx = transparent_context()
    modes.TransparentProxy(ctx)
    layers.ClientTLSLayer(ctx)
    nl = layer.NextLayer(ctx)
    nl.layer = layers.HttpLayer(ctx, HTTPMode.transparent)
    assert mitm_patches.proposes_http_in_tls(nl) and not mitm_patches.proposes_plain_http(nl)
    mitm_patches.tunnel_inspected(nl)
    assert isinstance(nl.layer, layers.TCPLayer) and nl.layer.flow is not None
    assert ctx.layers[-1] is nl.layer
    assert not any(isinstance(x, layers.HttpLayer) for x in ctx.layers)
    plain = transparent_context()
    modes.TransparentProxy(plain)
    nl = layer.NextLayer(plain)
    nl.layer = layers.HttpLayer(plain, HTTPMode.transparent)
    assert not mitm_patches.proposes_http_in_tls(nl)


def test_the_client_alpn_in_the_app_data_is_what_tlsconfig_chooses():
    from mitmproxy.addons import tlsconfig

    assert set(tlsconfig.AppData.__annotations__) >= {"client_alpn", "server_alpn", "http2"}

    class Conn:
        app = tlsconfig.AppData(client_alpn=None, server_alpn=None, http2=True)

        def get_app_data(self):
            return self.app

    conn = Conn()
    assert tlsconfig.alpn_select_callback(conn, [b"h2", b"http/1.1"]) == b"h2"
    mitm_patches.client_speaks_http1(conn)
    assert tlsconfig.alpn_select_callback(conn, [b"h2", b"http/1.1"]) == b"http/1.1"


# -- the fence ----------------------------------------------------------------------------------

INTERNAL_MODULES = (
    "mitmproxy.proxy",
    "mitmproxy.addons",
    "mitmproxy.net",
    "mitmproxy.addonmanager",
)


def internal_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found += [n for n in names if n.startswith(INTERNAL_MODULES)]
        if isinstance(node, ast.Assign):  # x.__class__ = ..., module.attr = ... (monkeypatching)
            for t in node.targets:
                if isinstance(t, ast.Attribute) and t.attr == "__class__":
                    found.append(f"line {node.lineno}: __class__ assignment")
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("mctx", "ctx", "master", "_http1"):
                found.append(f"line {node.lineno}: {base.id}.{node.attr}")
    return found


@pytest.mark.parametrize(
    "module", sorted(p.name for p in ADDONS.glob("*.py") if p.name != "mitm_patches.py")
)
def test_no_other_addon_uses_mitmproxy_internals(module):
    assert internal_uses(ADDONS / module) == []


def test_the_fence_sees_what_it_fences(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "from mitmproxy.proxy.layers.http import _http1\n"
        "import mitmproxy.addons.proxyserver\n"
        "def g(m):\n    m.addons.__class__ = object\n"
    )
    assert len(internal_uses(f)) == 4
    assert internal_uses(ADDONS / "mitm_patches.py")  # where they live


def test_the_websocket_layer_dispatches_through_relay_messages():
    """install_websocket_close wraps relay_messages: the layer must still reach it through
    `_handle_event`, end a session through `done`, and read the sides it closes by these names."""
    from mitmproxy.proxy.layers import websocket as wsl

    start = inspect.getsource(wsl.WebsocketLayer.start)
    assert "self._handle_event = self.relay_messages" in start
    assert "self.client_ws = WebsocketConnection" in start and "self.server_ws" in start
    assert callable(wsl.WebsocketLayer.done)
    relay = inspect.getsource(wsl.WebsocketLayer.relay_messages)
    assert "WebSocketMessageInjected" in relay and "WebsocketEndHook(self.flow)" in relay
    assert [f.name for f in dataclasses.fields(wsl.WebsocketEndHook)] == ["flow"]
    assert "send2" in wsl.WebsocketConnection.__dict__
    inject = inspect.signature(proxyserver.Proxyserver.inject_event)
    assert list(inject.parameters) == ["self", "event"]


def test_install_websocket_close_wraps_once(monkeypatch):
    from mitmproxy.proxy.layers import websocket as wsl

    current = wsl.WebsocketLayer.relay_messages  # wrapped already if a pipeline was built
    original = getattr(current, "candela_original", current)
    monkeypatch.setattr(wsl.WebsocketLayer, "relay_messages", original)
    mitm_patches.install_websocket_close()
    wrapped = wsl.WebsocketLayer.relay_messages
    assert wrapped is not original and wrapped.candela_close
    mitm_patches.install_websocket_close()
    assert wsl.WebsocketLayer.relay_messages is wrapped


def test_close_websocket_refuses_a_flow_that_is_not_a_live_session():
    f = tflow.tflow()
    assert not mitm_patches.close_websocket(f, 1008, "x")  # no WebSocket
    w = tflow.twebsocketflow()
    w.live = False
    assert not mitm_patches.close_websocket(w, 1008, "x")
    assert not mitm_patches.send_to_client(w, b"{}")


# -- request heads and client connections -------------------------------------------------------


def test_the_http1_server_buffers_heads_in_read_headers():
    """What limit_request_heads wraps: a generator method fed every event while a head is read,
    whose buffer (`.buf`) already holds the new bytes, with a `done` state to end in."""
    cls = _http1.Http1Server
    original = getattr(cls.read_headers, "candela_original", cls.read_headers)
    assert inspect.isgeneratorfunction(original) and params(original) == ["self", "event"]
    assert "self.buf.maybe_extract_lines()" in inspect.getsource(original)
    assert "self.buf += event.data" in inspect.getsource(_http1.Http1Connection._handle_event)
    assert callable(cls.done)
    buf = _http1.ReceiveBuffer()
    buf += b"abc"
    assert len(buf) == 3 and bytes(buf) == b"abc"


@pytest.mark.parametrize(
    ("buffered", "overflows"),
    [
        (b"a" * 100, False),  # under the limit, whatever it holds
        (b"a" * 101, True),  # over it with no end of head
        (b"GET / HTTP/1.1\r\n\r\n" + b"body" * 100, False),  # the head ended in time
        (b"GET / HTTP/1.1\n\n" + b"body" * 100, False),  # bare newlines, as h11 accepts
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 200 + b"\r\n\r\n", True),  # ended, but too late
    ],
)
def test_head_overflows(buffered, overflows):
    assert mitm_patches.head_overflows(buffered, 100) is overflows


def test_limit_request_heads_refuses_a_long_head_and_passes_a_short_one(monkeypatch):
    from mitmproxy.proxy import commands, events

    cls = _http1.Http1Server
    monkeypatch.setattr(cls, "read_headers", cls.read_headers)  # restored after the test
    mitm_patches.limit_request_heads(64, lambda: b"REFUSED")
    first = cls.read_headers.candela_original
    mitm_patches.limit_request_heads(64, lambda: b"REFUSED")  # again: wraps the original once
    assert cls.read_headers.candela_original is first
    assert not hasattr(first, "candela_original")
    ctx = context.Context(
        connection.Client(peername=("1.2.3.4", 5), sockname=("0.0.0.0", 8), timestamp_start=0),
        options.Options(),
    )
    server_layer = cls(ctx)
    server_layer.state = server_layer.read_headers
    server_layer.buf += b"GET / HTTP/1.1\r\nX: " + b"a" * 100
    out = list(server_layer.read_headers(events.DataReceived(ctx.client, b"")))
    assert [type(c) for c in out] == [commands.SendData, commands.CloseConnection]
    assert out[0].data == b"REFUSED" and server_layer.state == server_layer.done

    short = cls(ctx)
    short.buf += b"GET / HTTP/1.1\r\nX: "
    assert list(short.read_headers(events.DataReceived(ctx.client, b""))) == []  # waits for more


def test_a_client_error_set_in_client_connected_closes_the_connection():
    """What ConnLimits relies on: after the client_connected hook, `client.error` ends it, and
    the handler is registered with the proxy server before that hook runs."""
    source = inspect.getsource(server.ConnectionHandler.handle_client)
    assert source.index("ClientConnectedHook") < source.index("if self.client.error")
    assert "ClientDisconnectedHook" in source
    serve = inspect.getsource(mode_servers.AsyncioServerInstance.handle_stream)
    assert serve.index("register_connection") < serve.index("handle_client")


def test_close_client_writes_and_closes(monkeypatch):
    f = tflow.tflow()
    client_io = server.ConnectionIO(writer=FakeWriter())  # type: ignore[arg-type]

    class Handler:
        transports = {f.client_conn: client_io}

    class Master:
        class addons:
            @staticmethod
            def get(name: str) -> object:
                assert name == "proxyserver"
                return type("PS", (), {"connections": {f.client_conn.id: Handler()}})()

    monkeypatch.setattr(mitm_patches.ctx, "master", Master(), raising=False)
    assert mitm_patches.close_client(f.client_conn, b"BYE") is True
    assert client_io.writer.data == b"BYE" and client_io.writer.closed
    assert mitm_patches.close_client(tflow.tflow().client_conn, b"BYE") is False


def test_assemble_makes_a_whole_response():
    raw = mitm_patches.assemble(http.Response.make(429, b"{}", {"Content-Type": "application/json"}))
    assert raw.startswith(b"HTTP/1.1 429 ") and raw.endswith(b"\r\n\r\n{}")


# -- finished HTTP streams ----------------------------------------------------------------------


def test_a_dropped_stream_is_let_go_of_at_the_next_drop_and_freed_without_the_collector(
    monkeypatch,
):
    import gc
    import weakref

    from mitmproxy.proxy.layers.http import HttpStream

    monkeypatch.setattr(layers.HttpLayer, "__init__", layers.HttpLayer.__init__)
    monkeypatch.setattr(layers.HttpLayer, "_candela_streams", False, raising=False)
    ctx = transparent_context()
    plain = layers.HttpLayer(ctx, HTTPMode.regular)
    assert type(plain.streams) is dict  # mitmproxy's own, before the patch
    mitm_patches.free_finished_streams()
    mitm_patches.free_finished_streams()  # idempotent: wrapped once
    http_layer = layers.HttpLayer(ctx, HTTPMode.regular)
    assert isinstance(http_layer.streams, mitm_patches._Streams)

    def stream(stream_id: int) -> HttpStream:
        s = HttpStream(http_layer.context.fork(), stream_id)
        assert s.context.layers[-1] is s  # a layer appends itself to its (forked) context
        s.flow = tflow.tflow(resp=True)
        http_layer.streams[stream_id] = s
        return s

    kept = weakref.ref(stream(1))
    first_flow = weakref.ref(kept().flow)  # type: ignore[union-attr]
    second = weakref.ref(stream(3))
    upgraded = stream(5)
    upgraded.child_layer = layer.NextLayer(upgraded.context)
    gc.collect()  # whatever else made them left no garbage holding them
    gc.disable()
    try:
        # mitmproxy's shape: a stream holds itself (bound states, its context's layers)
        assert http_layer.streams.pop(1) is not None
        assert kept() is not None  # dropped, but the last one: not let go of yet
        assert http_layer.streams.pop(3) is not None  # the first is let go of, and freed
        assert kept() is None and first_flow() is None
        s3 = second()
        assert s3 is not None and s3.client_state.__self__ is s3  # untouched until the next
        del s3
        http_layer.streams.pop(5)
        http_layer.streams.pop(7, None)  # a stream mitmproxy no longer has: nothing popped
        assert second() is None
        assert upgraded.client_state.__self__ is upgraded  # an upgraded stream lives on
        assert list(mitm_patches._consumed(object())) == []
    finally:
        gc.enable()


# -- option reads -------------------------------------------------------------------------------


def test_option_reads_give_what_mitmproxy_gave_without_copying_plain_values(monkeypatch):
    from mitmproxy import optmanager

    original = optmanager._Option.current
    assert "deepcopy" in inspect.getsource(original)  # mitmproxy copies every read
    opts = options.Options()
    opts.update(listen_port=8181, ssl_insecure=True, ignore_hosts=["a"])
    names = ["listen_port", "ssl_insecure", "ignore_hosts", "mode", "listen_host",
             "upstream_cert", "showhost"]  # fmt: skip
    assert set(names) <= set(opts._options)
    before = {n: getattr(opts, n) for n in names}
    monkeypatch.setattr(optmanager._Option, "current", original)
    mitm_patches.fast_option_reads()
    mitm_patches.fast_option_reads()  # idempotent
    assert optmanager._Option.current is mitm_patches._current
    for n in names:
        got = getattr(opts, n)
        assert got == before[n] and type(got) is type(before[n]), n
        if type(got) in mitm_patches._ATOMS:
            assert got is opts._options[n].current()  # no copy made
    hosts = opts.ignore_hosts
    hosts.append("b")  # a list is still the reader's own copy
    assert opts.ignore_hosts == ["a"]
    mode = opts.mode  # unset: a copy of the default
    mode.append("x")
    assert "x" not in opts.mode


# -- a streamed response's chunks ---------------------------------------------------------------


def test_the_http1_server_frames_each_chunk_from_the_response_headers():
    """What frame_chunks_once replaces in `Http1Server.send`: a body chunk is framed from the
    response's `transfer-encoding`, looked up again at every chunk, into one SendData."""
    cls = _http1.Http1Server
    original = getattr(cls.send, "candela_original", cls.send)
    assert inspect.isgeneratorfunction(original) and params(original) == ["self", "event"]
    src = inspect.getsource(original)
    assert "self.response = response = event.response" in src
    assert 'if "chunked" in self.response.headers.get("transfer-encoding", "").lower():' in src
    assert 'raw = b"%x\\r\\n%s\\r\\n" % (len(event.data), event.data)' in src
    assert "yield commands.SendData(self.conn, raw)" in src


class CountingHeaders(http.Headers):
    gets = 0

    def get(self, key, default=None):  # type: ignore[override]
        CountingHeaders.gets += 1
        return super().get(key, default)


@pytest.mark.parametrize("te", ["chunked", "", "gzip, Chunked"])
def test_frame_chunks_once_sends_what_mitmproxy_sends_reading_the_framing_once(monkeypatch, te):
    from mitmproxy.proxy.layers.http import ResponseData, ResponseEndOfMessage, ResponseHeaders

    cls = _http1.Http1Server
    # mitmproxy's own send, whatever ran before in this process; restored after the test
    monkeypatch.setattr(cls, "send", getattr(cls.send, "candela_original", cls.send))
    ctx = context.Context(
        connection.Client(peername=("1.2.3.4", 5), sockname=("0.0.0.0", 8), timestamp_start=0),
        options.Options(),
    )

    def relay(chunks: int) -> tuple[list[tuple[str, bytes | None]], int]:
        resp = tflow.tresp()
        resp.headers = CountingHeaders([(b"transfer-encoding", te.encode())] if te else [])
        server_layer = cls(ctx)
        server_layer.request = tflow.treq()
        events = [ResponseHeaders(1, resp), *(ResponseData(1, b"x" * k) for k in range(chunks))]
        CountingHeaders.gets = 0
        out = [c for e in [*events, ResponseEndOfMessage(1)] for c in server_layer.send(e)]
        return [(type(c).__name__, getattr(c, "data", None)) for c in out], CountingHeaders.gets

    want, gets_each_chunk = relay(30)
    mitm_patches.frame_chunks_once()
    patched = cls.send
    mitm_patches.frame_chunks_once()  # idempotent: wrapped once
    assert cls.send is patched and not hasattr(patched.candela_original, "candela_original")
    got, gets = relay(30)
    assert got == want
    framed = b"%x\r\n%s\r\n" % (3, b"xxx") if "chunked" in te.lower() else b"xxx"
    assert ("SendData", framed) in got
    assert gets_each_chunk >= 30 and gets == relay(3)[1] <= 3  # with the head and the end only


# -- spare upstream connections -----------------------------------------------------------------


def test_the_server_connection_is_opened_by_the_one_asyncio_call_spares_stand_in_for():
    src = inspect.getsource(server.ConnectionHandler.open_connection)
    assert src.count("asyncio.open_connection(") == 1
    assert "*command.connection.address" in src
    assert "local_addr=command.connection.sockname" in src
    assert server.asyncio is asyncio or server.asyncio.__name__ == "asyncio"  # a module global


def test_mitmproxys_server_connections_take_the_spares(monkeypatch):
    monkeypatch.setattr(server, "asyncio", server.asyncio)
    monkeypatch.setattr(mitm_patches, "_spares", None)
    spares = mitm_patches.install_spare_connections(lambda a: False)
    assert server.asyncio is not asyncio  # server.py's own view of it
    assert asyncio.open_connection is spares.connect  # everyone else's as it was
    assert server.asyncio.Lock is asyncio.Lock  # the rest of asyncio as it is

    async def main() -> None:
        async with Accepting() as srv, Accepting() as other:
            # called again (a proxy served again): the same spares, for the addresses named now
            again = mitm_patches.install_spare_connections(lambda a: a == srv.address)
            assert again is spares
            host, port = srv.address
            r, w = await server.asyncio.open_connection(host, port, local_addr=None)
            await settle(lambda: spares.ready == 1)
            assert srv.accepted == 2  # its own connection, and a spare beside it
            r2, w2 = await server.asyncio.open_connection(host, port, local_addr=None)
            assert srv.accepted == 2  # the spare: no connect of its own
            # a connection from a chosen local address is never a spare
            r3, w3 = await server.asyncio.open_connection(host, port, local_addr=("127.0.0.1", 0))
            await settle(lambda: srv.accepted == 4)
            # an address no spare is wanted for (a tunnel relayed to a host that is no
            # provider): connected as mitmproxy connects, nothing beside it
            r4, w4 = await server.asyncio.open_connection(*other.address, local_addr=None)
            await asyncio.sleep(0.05)
            assert other.accepted == 1
            for x in (w, w2, w3, w4):
                x.close()
            spares.close()

    asyncio.run(main())
