import asyncio
import json
import os
import ssl

import pytest
from mitmproxy import connection, http
from mitmproxy.proxy import context, events, layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow
from mitmproxy.tls import ClientHelloData, TlsData

from candela_mitm.addons.accounting import Accounting
from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.router import Router
from candela_mitm.addons.sni import Sni
from candela_mitm.config import parse_config
from candela_mitm.enforcement.registry import SandboxRecord, SandboxRegistry
from candela_mitm.enforcement.workload import Workload
from candela_mitm.runtime import build_runtime

from .conftest import ALICE_SHA

SANDBOX_ADDR = "10.200.0.6"
PROVIDER_IP = "198.18.0.1"


@pytest.fixture
def rt(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    cfg = {
        "mode": "transparent",
        "providers": {
            "openai": {"base_url": "http://upstream.test:8080"},
            "gemini-oai": {"base_url": "http://upstream.test:8080/v1beta/openai"},
        },
        "auth": {
            "required": True,
            "api_keys": [{"sha256": ALICE_SHA, "user": "alice@example.com"}],
        },
        "users": {"alice@example.com": {"tenants": ["research-team", "b"]}},
        "state": {"sqlite_path": str(tmp_path / "state.db")},
        "audit": {"sqlite_path": str(tmp_path / "audit.db")},
    }
    runtime = build_runtime(parse_config(cfg), "server")
    yield runtime
    runtime.close()


@pytest.fixture
def registry(tmp_path):
    reg = SandboxRegistry(tmp_path / "run")
    reg.claim(
        lambda i: SandboxRecord(
            index=i,
            address=SANDBOX_ADDR,
            user="alice@example.com",
            tenant="b",
            pid=os.getpid(),
            pid_start=None,
            netns=f"candela-{i}",
            host_if=f"cdl{i}h",
            hosts=(("api.openai.com", PROVIDER_IP), ("other.example", "198.18.9.9")),
        )
    )
    return reg


@pytest.fixture
def audited(rt, monkeypatch):
    entries = []

    def record(action, /, **fields):
        entries.append((action, fields))
        return True

    monkeypatch.setattr(rt.audit, "record", record)
    return entries


@pytest.fixture
def sni(rt, registry):
    with taddons.context():
        yield Sni(rt, registry)


def transparent_flow(
    path, host, sni="api.openai.com", client=SANDBOX_ADDR, method="POST", body=None
):
    f = tflow.tflow()
    f.client_conn.proxy_mode = ProxyMode.parse("transparent")
    f.client_conn.peername = (client, 40000)
    f.client_conn.sni = sni
    f.request.method = method
    f.request.scheme = "https"
    f.request.host, f.request.port = PROVIDER_IP, 443
    f.request.path = path
    f.request.headers.clear()
    if host is not None:
        f.request.headers["host"] = host
    f.request.headers["authorization"] = "Bearer sk-dummy"
    f.request.content = json.dumps(body or {"model": "gpt-4o-mini", "messages": []}).encode()
    return f


def run(*hooks):
    for hook in hooks:
        result = hook()
        if asyncio.iscoroutine(result):
            asyncio.run(result)


def test_a_provider_request_keeps_its_path_and_is_attributed_to_the_sandbox(sni, rt):
    f = transparent_flow("/v1/chat/completions", "api.openai.com")
    router, auth = Router(rt), Auth(rt)
    run(
        lambda: sni.requestheaders(f),
        lambda: router.requestheaders(f),
        lambda: auth.requestheaders(f),
    )
    assert f.response is None
    c = ctx_of(f)
    assert (c.kind, c.provider, c.rest) == ("proxy", "openai", "/v1/chat/completions")
    # no API key was needed: the sandbox says who it is; its tenant is checked like any other
    assert (c.principal.user, c.tenant, c.client_address) == (
        "alice@example.com",
        "b",
        SANDBOX_ADDR,
    )
    asyncio.run(router.request(f))
    assert f.response is None and c.plan.upstream.name == "openai"
    assert c.plan.path == "/v1/chat/completions"


def test_the_openai_compatible_gemini_path_goes_to_its_route(sni, rt):
    f = transparent_flow(
        "/v1beta/openai/chat/completions",
        "generativelanguage.googleapis.com",
        sni="generativelanguage.googleapis.com",
        body={"model": "gemini-2.5-flash", "messages": []},
    )
    router = Router(rt)
    run(lambda: sni.requestheaders(f), lambda: router.requestheaders(f))
    asyncio.run(router.request(f))
    c = ctx_of(f)
    assert (c.provider, c.rest) == ("gemini-oai", "/chat/completions")
    assert (
        c.plan.upstream.url(c.plan.path)
        == "http://upstream.test:8080/v1beta/openai/chat/completions"
    )


@pytest.mark.parametrize(
    "route, sni_name, path, body, region",
    [
        ("openai", "eu.api.openai.com", "/v1/chat/completions", None, None),
        ("openai", "jp.api.openai.com", "/v1/chat/completions", None, None),
        (
            "anthropic-bedrock",
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/invoke",
            {"max_tokens": 5, "messages": []},
            "eu-west-1",
        ),
        (
            "bedrock-mantle",
            "bedrock-mantle.eu-central-1.api.aws",
            "/v1/chat/completions",
            {"model": "openai.gpt-oss-120b", "messages": []},
            "eu-central-1",
        ),
    ],
)
def test_a_residency_or_regional_host_is_forwarded_to_itself(
    tmp_path, monkeypatch, registry, route, sni_name, path, body, region
):
    """No base_url pins the route: the request goes to the host the app asked for (not the
    route's default host), with the organisation's credential for it."""
    from candela_mitm.addons.upstream import Upstream as UpstreamAddon

    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    cfg = {
        "mode": "transparent",
        "state": {"sqlite_path": str(tmp_path / "state.db")},
        "audit": {"sqlite_path": str(tmp_path / "audit.db")},
    }
    runtime = build_runtime(parse_config(cfg), "server")
    try:
        with taddons.context():
            f = transparent_flow(path, sni_name, sni=sni_name, body=body)
            router = Router(runtime)
            run(lambda: Sni(runtime, registry).requestheaders(f), lambda: router.requestheaders(f))
            asyncio.run(router.request(f))
            c = ctx_of(f)
            assert f.response is None and c.provider == route
            assert c.plan.upstream.host == sni_name and c.plan.upstream.region == region
            asyncio.run(UpstreamAddon(runtime).request(f))
            req = f.request
            assert f.response is None, f.response and f.response.content
            assert (req.scheme, req.host, req.port) == ("https", sni_name, 443)
            assert req.headers["host"] == sni_name
            if region is None:
                assert req.headers["authorization"] == "Bearer sk-upstream"
            else:  # signed for the region the host is in
                assert f"/{region}/{'bedrock-mantle' if route == 'bedrock-mantle' else 'bedrock'}/aws4_request" in req.headers["authorization"]
    finally:
        runtime.close()


@pytest.mark.parametrize("sni_name", ["api.openai.com", "us.api.openai.com"])
def test_a_base_url_pins_every_host_of_the_route_to_one_residency(
    tmp_path, monkeypatch, registry, sni_name
):
    """`providers.openai.base_url: https://eu.api.openai.com`: reverse-mode calls and every
    intercepted OpenAI host go to the EU host (the operator's residency, not the app's)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    cfg = {
        "mode": "transparent",
        "providers": {"openai": {"base_url": "https://eu.api.openai.com"}},
        "state": {"sqlite_path": str(tmp_path / "state.db")},
        "audit": {"sqlite_path": str(tmp_path / "audit.db")},
    }
    runtime = build_runtime(parse_config(cfg), "server")
    try:
        with taddons.context():
            f = transparent_flow("/v1/chat/completions", sni_name, sni=sni_name)
            router = Router(runtime)
            run(lambda: Sni(runtime, registry).requestheaders(f), lambda: router.requestheaders(f))
            asyncio.run(router.request(f))
            c = ctx_of(f)
            assert f.response is None and c.upstream is None
            assert c.plan.upstream.url(c.plan.path) == "https://eu.api.openai.com/v1/chat/completions"
    finally:
        runtime.close()


def test_a_client_that_is_no_sandbox_authenticates_as_usual(sni, rt):
    f = transparent_flow("/v1/chat/completions", "api.openai.com", client="127.0.0.1")
    run(
        lambda: sni.requestheaders(f),
        lambda: Router(rt).requestheaders(f),
        lambda: Auth(rt).requestheaders(f),
    )
    assert f.response is not None and f.response.status_code == 401  # sk-dummy is no Candela key


@pytest.mark.parametrize(
    "path, host, sni_name, method, status, code, reason",
    [
        (
            "/v1/models",
            "evil.example",
            "api.openai.com",
            "GET",
            421,
            "misdirected_request",
            "host_mismatch",
        ),
        ("/v1/models", None, "api.openai.com", "GET", 421, "misdirected_request", "host_mismatch"),
        (
            "/v1/models",
            "x.example",
            None,
            "GET",
            403,
            "host_not_intercepted",
            "host_not_intercepted",
        ),
        (  # an mTLS endpoint: Candela has no client certificate to go there itself
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/m:rawPredict",
            "us-east5-aiplatform.mtls.googleapis.com",
            "us-east5-aiplatform.mtls.googleapis.com",
            "POST",
            421,
            "misdirected_request",
            "region_not_configured",
        ),
    ],
)
def test_what_would_slip_past_governance_is_refused_and_audited(
    sni, rt, audited, path, host, sni_name, method, status, code, reason
):
    f = transparent_flow(path, host, sni=sni_name, method=method)
    run(lambda: sni.requestheaders(f), lambda: Router(rt).requestheaders(f))
    assert f.response is not None and f.response.status_code == status
    assert json.loads(f.response.content)["error"] == code
    assert ctx_of(f).denial_code == code
    [(action, fields)] = audited
    assert action == "interception_denied" and fields["reason"] == reason
    assert (fields["user_id"], fields["sandbox"]) == ("alice@example.com", "candela-0")


def test_an_absolute_url_is_a_request_for_another_proxy(sni, rt, audited):
    f = transparent_flow("/v1/models", "api.openai.com", sni=None, method="GET")
    f.request.authority = "api.openai.com:80"  # absolute-form: GET http://api.openai.com/...
    run(lambda: sni.requestheaders(f))
    assert f.response.status_code == 403
    assert audited[0][1]["reason"] == "proxy_request"


def test_reverse_mode_flows_are_left_to_the_router(sni):
    f = tflow.tflow()
    run(lambda: sni.requestheaders(f))
    assert ctx_of(f) is None and f.response is None


def _hello(sni_name, dst, peer=SANDBOX_ADDR):
    client = connection.Client(peername=(peer, 40000), sockname=(PROVIDER_IP, 443))
    client.proxy_mode = ProxyMode.parse("transparent")
    ctx = context.Context(client, taddons.context().options)
    ctx.server.address = dst
    # a real ClientHello, as Python's ssl sends it
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=sni_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = parse_client_hello(outgoing.read())
    assert hello is not None and hello.sni == sni_name
    return ClientHelloData(ctx, hello)


@pytest.mark.parametrize(
    "sni_name, dst, ignored, refused, edge",
    [
        ("api.openai.com", (PROVIDER_IP, 443), False, None, False),  # decrypted and governed
        ("eu.api.openai.com", (PROVIDER_IP, 443), False, None, False),  # a residency host
        ("other.example", ("198.18.9.9", 443), True, None, False),  # tunnelled untouched
        # no name from a sandbox: nothing to route or check a Host against, whatever the address
        (None, ("198.18.9.9", 443), False, "no_sni", False),
        (None, (PROVIDER_IP, 443), False, "no_sni", False),
        # a name that is no provider's, to a provider's address: refused, not tunnelled
        ("cdn.other.example", (PROVIDER_IP, 443), False, "sni_not_provider", False),
        # a provider's shared edge: decrypted, its requests read
        ("www.google.com", (PROVIDER_IP, 443), False, None, True),
        ("storage.googleapis.com", ("198.18.9.9", 443), False, None, True),
    ],
)
def test_tls_is_decided_by_its_server_name(sni, audited, sni_name, dst, ignored, refused, edge):
    data = _hello(sni_name, dst)
    asyncio.run(sni.tls_clienthello(data))
    assert data.ignore_connection is ignored
    start = TlsData(data.context.client, data.context)
    start.ssl_conn = _Conn()  # what mitmproxy's TLS addon would have made
    sni.tls_start_client(start)
    assert (start.ssl_conn is None) is bool(refused)
    assert [a for a, f in audited] == (["bypass_attempt"] if refused else [])
    if refused:
        entry = audited[0][1]
        assert entry["reason"] == refused and entry["destination"] == f"{dst[0]}:{dst[1]}"
        assert entry["enforcement"] == "sandbox" and entry["user_id"] == "alice@example.com"
    assert (data.context.client.id in sni._edge) is edge
    if edge:  # HTTP/1.1 both ways: the bytes are relayed as they are
        assert data.context.server.alpn_offers == [b"http/1.1"]
        assert start.ssl_conn.app["client_alpn"] == b"http/1.1"


class _Conn:
    """An SSL.Connection's app data, as mitmproxy's TlsConfig sets it."""

    def __init__(self):
        self.app = {"client_alpn": None, "server_alpn": None, "http2": True}

    def get_app_data(self):
        return self.app


def test_a_provider_address_known_to_host_enforcement_refuses_other_names(sni, audited, tmp_path):
    from candela_mitm.enforcement.host import EnforceState

    state = tmp_path / "enforce.json"
    EnforceState(8443, "/sys/fs/cgroup/x", {"api.openai.com": ["198.18.7.7"]}).save(str(state))
    sni.enforce_state_path = str(state)
    data = _hello("cdn.other.example", ("198.18.7.7", 443))
    asyncio.run(sni.tls_clienthello(data))
    assert audited and audited[0][1]["reason"] == "sni_not_provider"
    data = _hello("cdn.other.example", ("198.18.7.8", 443))
    asyncio.run(sni.tls_clienthello(data))
    assert data.ignore_connection and len(audited) == 1


@pytest.mark.parametrize(
    "dst, refused",
    [
        (("198.18.7.7", 443), True),  # a provider address `enforce host` resolved
        (("198.18.7.8", 443), False),  # any other: TLS to an address, relayed untouched
        (("198.18.0.1", 443), True),  # a provider address a sandbox was given (the registry)
    ],
)
def test_under_host_enforcement_tls_without_sni_is_refused_only_towards_providers(
    sni, audited, tmp_path, dst, refused
):
    from candela_mitm.enforcement.host import EnforceState

    state = tmp_path / "enforce.json"
    EnforceState(8443, "/sys/fs/cgroup/x", {"api.openai.com": ["198.18.7.7"]}).save(str(state))
    sni.enforce_state_path = str(state)
    data = _hello(None, dst, peer="127.0.0.1")
    asyncio.run(sni.tls_clienthello(data))
    assert data.ignore_connection is not refused
    assert [(a, f["reason"], f["enforcement"]) for a, f in audited] == (
        [("bypass_attempt", "no_sni", "host")] if refused else []
    )


@pytest.mark.parametrize(
    "address, allowed",
    [
        ("127.0.0.1", True),
        (SANDBOX_ADDR, True),
        ("::ffff:127.0.0.1", True),
        ("203.0.113.5", False),  # the network: never a client of the transparent listener
        ("10.200.0.10", False),  # a sandbox address nobody registered
    ],
)
def test_only_this_machine_and_its_sandboxes_are_served(sni, audited, address, allowed):
    client = connection.Client(peername=(address, 40000), sockname=("0.0.0.0", 8443))
    client.proxy_mode = ProxyMode.parse("transparent")
    sni.client_connected(client)
    assert (client.error is None) is allowed
    assert bool(audited) is not allowed


def _next_layer(data):
    client = connection.Client(peername=(SANDBOX_ADDR, 40000), sockname=(PROVIDER_IP, 80))
    client.proxy_mode = ProxyMode.parse("transparent")
    ctx = context.Context(client, taddons.context().options)
    modes.TransparentProxy(ctx)
    nl = layer.NextLayer(ctx)
    nl.events.append(events.DataReceived(client, data))
    nl.layer = layers.HttpLayer(ctx, HTTPMode.transparent)  # what mitmproxy proposes
    return nl


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n", layers.TCPLayer),
        (b"GET / HTTP/1.1\r\nHost: api.openai.com\r\n\r\n", layers.HttpLayer),
        (b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: other.example\r\n\r\n", layers.HttpLayer),
        (b"GET / HTTP/1.1\r\nHost: oth", type(None)),  # wait for the rest
    ],
)
def test_plain_http_to_other_hosts_passes_untouched(sni, data, expected):
    nl = _next_layer(data)
    sni.next_layer(nl)
    assert type(nl.layer) is expected
    assert nl.context.layers[-1] is nl.layer or nl.layer is None
    if expected is layers.TCPLayer:
        # relayed as it is, every later request on it read as it passes (tcp_message)
        assert nl.layer.flow is not None and nl.context.client.id in sni._streams


@pytest.mark.parametrize(
    "path, method, body, code",
    [
        ("/v1/files", "GET", None, "endpoint_not_governed"),
        ("/v1/files", "POST", {"model": "gpt-4o-mini", "purpose": "batch"}, "endpoint_not_governed"),
        ("/v1/realtime?model=gpt-4o-realtime-preview", "GET", None, "endpoint_not_governed"),
        ("/v1/x/../files", "GET", None, "invalid_request_target"),
    ],
)
def test_intercepted_requests_go_through_the_same_catalogue(sni, rt, path, method, body, code):
    f = transparent_flow(path, "api.openai.com", method=method, body=body)
    if body is None:
        f.request.content = b""
    router = Router(rt)
    run(lambda: sni.requestheaders(f), lambda: router.requestheaders(f), lambda: Auth(rt).requestheaders(f))
    assert f.response is None  # attributed to the sandbox: the catalogue decides
    asyncio.run(router.request(f))
    assert f.response is not None and json.loads(f.response.content)["error"] == code
    assert ctx_of(f).plan is None


def test_an_intercepted_catalogue_operation_is_planned_with_its_name(sni, rt):
    f = transparent_flow("/v1/models", "api.openai.com", method="GET")
    f.request.content = b""
    router = Router(rt)
    run(lambda: sni.requestheaders(f), lambda: router.requestheaders(f))
    asyncio.run(router.request(f))
    assert f.response is None and ctx_of(f).plan.operation.name == "models.list"


def test_claude_codes_auxiliary_calls_to_the_anthropic_host_never_leave(sni, rt):
    head = transparent_flow("/", "api.anthropic.com", sni="api.anthropic.com", method="HEAD")
    settings = transparent_flow(
        "/api/claude_code/settings", "api.anthropic.com", sni="api.anthropic.com", method="GET"
    )
    for f in (head, settings):
        f.request.content = b""
        router = Router(rt)
        run(lambda f=f: sni.requestheaders(f), lambda f=f, r=router: r.requestheaders(f))
        asyncio.run(router.request(f))
        assert ctx_of(f).provider == "anthropic-direct"
    assert head.response.status_code == 200 and head.response.content == b""
    assert json.loads(settings.response.content)["error"] == "endpoint_not_governed"


@pytest.mark.parametrize(
    "path, host, route, operation, model",
    [
        ("/v1/realtime?model=gpt-realtime", "api.openai.com", "openai", "realtime", "gpt-realtime"),
        ("/v1/responses", "api.openai.com", "openai", "responses.websocket", None),
        ("/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
         "generativelanguage.googleapis.com", "google", "live.bidiGenerateContent", None),
    ],
)
def test_an_intercepted_websocket_upgrade_is_planned_as_a_session(sni, rt, path, host, route, operation, model):
    f = transparent_flow(path, host, sni=host, method="GET")
    f.request.content = b""
    f.request.headers["upgrade"] = "websocket"
    f.request.headers["connection"] = "Upgrade"
    router = Router(rt)
    run(lambda: sni.requestheaders(f), lambda: router.requestheaders(f))
    asyncio.run(router.request(f))
    c = ctx_of(f)
    assert f.response is None, f.response and f.response.content
    assert c.plan.upstream.name == route and c.plan.operation.name == operation
    assert c.plan.session and c.plan.model == model


# -- shared edges: decrypted, every request's Host read ------------------------------------------

EDGE_GET = b"GET / HTTP/1.1\r\nHost: www.google.com\r\n\r\n"
FRONTED = b"GET /v1beta/models HTTP/1.1\r\nHost: generativelanguage.googleapis.com\r\n\r\n"


def _edge_next_layer(sni, data):
    hello = _hello("www.google.com", (PROVIDER_IP, 443))
    asyncio.run(sni.tls_clienthello(hello))
    ctx = hello.context
    modes.TransparentProxy(ctx)
    layers.ClientTLSLayer(ctx)
    nl = layer.NextLayer(ctx)
    nl.events.append(events.DataReceived(ctx.client, data))
    nl.layer = layers.HttpLayer(ctx, HTTPMode.transparent)  # what mitmproxy proposes inside TLS
    return nl


@pytest.mark.parametrize(
    "data, expected",
    [
        (EDGE_GET, layers.TCPLayer),  # relayed re-encrypted, read as it passes
        (FRONTED, layers.HttpLayer),  # left to requestheaders: refused as fronting
        (b"GET / HTTP/1.1\r\nHost: www.goo", type(None)),  # the rest of the head first
    ],
)
def test_an_edge_connection_is_relayed_only_for_other_hosts(sni, data, expected):
    nl = _edge_next_layer(sni, data)
    sni.next_layer(nl)
    assert type(nl.layer) is expected
    if expected is layers.TCPLayer:
        assert nl.layer.flow is not None  # a TCPFlow: each message reaches tcp_message
        assert nl.context.client.id in sni._streams


def test_a_provider_host_behind_an_edge_name_is_domain_fronting(sni, rt, audited):
    nl = _edge_next_layer(sni, FRONTED)
    f = transparent_flow(
        "/v1beta/models", "generativelanguage.googleapis.com", sni="www.google.com"
    )
    f.client_conn = nl.context.client
    f.client_conn.sni = "www.google.com"
    run(lambda: sni.requestheaders(f))
    assert f.response.status_code == 421
    assert json.loads(f.response.content)["error"] == "misdirected_request"
    assert [(a, e["reason"], e["host"]) for a, e in audited] == [
        ("bypass_attempt", "domain_fronting", "generativelanguage.googleapis.com")
    ]


def test_a_relayed_edge_connection_stops_at_the_first_fronted_request(sni, audited, monkeypatch):
    nl = _edge_next_layer(sni, EDGE_GET)
    sni.next_layer(nl)
    f = tflow.ttcpflow(messages=[])
    f.client_conn = nl.context.client
    f.client_conn.sni = "www.google.com"
    injected = []
    from mitmproxy import ctx as mctx

    monkeypatch.setattr(mctx.master.commands, "call", lambda *a: injected.append(a))
    sent = []

    def relay(content, from_client=True):
        from mitmproxy import tcp

        m = tcp.TCPMessage(from_client, content)
        f.messages.append(m)
        asyncio.run(sni.tcp_message(f))
        sent.append(m.content)
        assert f.messages == []  # nothing kept

    relay(EDGE_GET)
    relay(b"HTTP/1.1 200 OK\r\n\r\n", from_client=False)
    relay(EDGE_GET + FRONTED[:20])  # a whole request and a head not yet complete: forwarded
    relay(FRONTED[20:])
    relay(EDGE_GET)  # after a refusal, nothing more
    assert sent == [EDGE_GET, b"HTTP/1.1 200 OK\r\n\r\n", EDGE_GET + FRONTED[:20], b"", b""]
    assert [(a, e["reason"], e["host"]) for a, e in audited] == [
        ("bypass_attempt", "domain_fronting", "generativelanguage.googleapis.com")
    ]
    (call,) = injected
    assert call[0] == "inject.tcp" and call[2] is True
    assert b"421" in call[3] and b"misdirected_request" in call[3]


# -- workload identity ----------------------------------------------------------------------------

AGENT = Workload(4242, "agent", "/opt/tools/agent", "ab" * 32, 1000, "/candela/sandbox-0", None)


@pytest.fixture
def agent_rules():
    return [
        {"exe": "/usr/bin/someone-else", "user": "nobody@example.com"},
        {
            "sha256": "ab" * 32,
            "user": "alice@example.com",
            "tenant": "research-team",
            "models": {"allowed": ["gpt-4o"]},
        },
    ]


def _with_workload(sni, monkeypatch, w):
    async def lookup(client):
        return w

    monkeypatch.setattr(sni, "_workload", lookup)


def test_an_intercepted_request_carries_its_process_to_the_audit_entry_and_span(
    sni, rt, monkeypatch
):
    from candela_mitm.addons.audit import request_entry
    from candela_mitm.addons.spans import span_of

    _with_workload(sni, monkeypatch, AGENT)
    f = transparent_flow("/v1/chat/completions", "api.openai.com")
    run(lambda: sni.requestheaders(f), lambda: Router(rt).requestheaders(f))
    c = ctx_of(f)
    assert c.workload == AGENT.fields() and c.workload_rule is None
    assert c.principal.user == "alice@example.com" and c.principal.via == "local"  # the sandbox's
    entry = request_entry(c, f)
    assert entry["workload_exe_sha256"] == "ab" * 32 and entry["workload_pid"] == 4242
    assert entry["workload_exe"] == "/opt/tools/agent" and entry["workload_uid"] == 1000
    assert span_of(c).attributes["workload_exe_sha256"] == "ab" * 32


def test_a_workload_rule_names_the_user_tenant_and_models(sni, rt, monkeypatch, agent_rules):
    from candela_mitm.addons.modelpolicy import ModelPolicy
    from candela_mitm.config import parse_config
    from candela_mitm.runtime import build_runtime

    # the rt fixture's config, with the rules
    cfg = rt.config.model_dump()
    cfg["governance"]["workloads"] = agent_rules
    rt2 = build_runtime(parse_config(cfg), "server")
    try:
        s2 = Sni(rt2, sni.registry)
        _with_workload(s2, monkeypatch, AGENT)
        f = transparent_flow("/v1/chat/completions", "api.openai.com", client="127.0.0.1")
        run(
            lambda: s2.requestheaders(f),
            lambda: Router(rt2).requestheaders(f),
            lambda: Auth(rt2).requestheaders(f),
        )
        c = ctx_of(f)
        assert f.response is None and c.workload_rule == 1
        # no credential, no sandbox: the executable says who it works for
        assert (c.principal.user, c.principal.via, c.tenant) == (
            "alice@example.com",
            "workload",
            "research-team",
        )
        asyncio.run(Router(rt2).request(f))
        ModelPolicy(rt2).request(f)  # gpt-4o-mini: allowed to alice, not to this binary
        assert f.response.status_code == 403
        assert json.loads(f.response.content)["error"] == "model_not_allowed"
        assert c.policy["policy_scope"] == "workload"
        # another binary at the same path borrows nothing
        other = Workload(1, "agent", "/opt/tools/agent", "cd" * 32, 1000, "/", None)
        _with_workload(s2, monkeypatch, other)
        g = transparent_flow("/v1/chat/completions", "api.openai.com", client="127.0.0.1")
        run(lambda: s2.requestheaders(g))
        assert ctx_of(g).workload_rule is None and ctx_of(g).principal is None
    finally:
        rt2.close()


@pytest.mark.parametrize("role, shown", [("admin", True), ("developer", False)])
def test_admins_see_the_process_in_response_headers(sni, rt, monkeypatch, role, shown):
    import dataclasses

    from candela_mitm.addons.flowstate import deny
    from candela_mitm.errors import forbidden

    _with_workload(sni, monkeypatch, AGENT)
    f = transparent_flow("/v1/chat/completions", "api.openai.com")
    run(lambda: sni.requestheaders(f))
    c = ctx_of(f)
    c.principal = dataclasses.replace(c.principal, role=role)
    f.response = http.Response.make(200, b"{}", {})
    Accounting(rt).responseheaders(f)  # a provider's answer: after Upstream's header allowlist
    g = transparent_flow("/v1/chat/completions", "api.openai.com")
    run(lambda: sni.requestheaders(g))
    ctx_of(g).principal = dataclasses.replace(ctx_of(g).principal, role=role)
    deny(g, forbidden("no"))  # Candela's own answers carry them too
    for resp in (f.response, g.response):
        assert (resp.headers.get("X-Candela-Workload-Exe-SHA256") == "ab" * 32) is shown
        assert (resp.headers.get("X-Candela-Workload-Pid") == "4242") is shown


# -- provider keys the app brings ---------------------------------------------------------------

ORG_KEY, SECRET = "sk-org-key", "fp-secret"


@pytest.mark.parametrize(
    "replace, key, status, ours",
    [
        (False, ORG_KEY, None, True),  # kept, and it is the organisation's
        (False, "sk-personal", 403, False),  # kept, and it is not: refused
        (["google"], "sk-personal", 403, False),  # not replaced on this route
        (True, "sk-personal", None, False),  # replaced: it never leaves, and is recorded
    ],
)
def test_a_key_that_is_not_the_organisations_is_refused_where_it_would_go_upstream(
    rt, registry, audited, monkeypatch, replace, key, status, ours
):
    from candela_mitm.addons.audit import request_entry
    from candela_mitm.config import parse_config
    from candela_mitm.governance.provider_keys import fingerprint
    from candela_mitm.runtime import build_runtime

    cfg = rt.config.model_dump()
    cfg["interception"]["replace_provider_keys"] = replace
    cfg["interception"]["organisation_keys"] = [fingerprint(SECRET.encode(), ORG_KEY)]
    monkeypatch.setenv("CANDELA_KEY_FINGERPRINT_SECRET", SECRET)
    rt2 = build_runtime(parse_config(cfg), "server")
    monkeypatch.setattr(rt2.audit, "record", rt.audit.record)  # the audited fixture's
    try:
        s2 = Sni(rt2, registry)
        _with_workload(s2, monkeypatch, AGENT)
        f = transparent_flow("/v1/chat/completions", "api.openai.com")
        f.request.headers["authorization"] = f"Bearer {key}"
        run(lambda: s2.requestheaders(f))
        c = ctx_of(f)
        fp = fingerprint(SECRET.encode(), key)
        assert (c.provider_key_fingerprint, c.provider_key_ours) == (fp, ours)
        assert key not in json.dumps(request_entry(c, f))  # the fingerprint, never the key
        assert request_entry(c, f)["provider_key_fingerprint"] == fp
        assert request_entry(c, f)["workload_exe_sha256"] == AGENT.exe_sha256  # refused or not
        if status is None:
            assert f.response is None and not audited
            return
        body = json.loads(f.response.content)
        assert f.response.status_code == 403 and body["error"] == "foreign_provider_key"
        assert body["key_fingerprint"] == fp and body["provider"] == "openai"
        ((action, entry),) = audited
        assert (action, entry["reason"], entry["key_fingerprint"]) == (
            "interception_denied",
            "foreign_provider_key",
            fp,
        )
        assert entry["exe_sha256"] == AGENT.exe_sha256 and entry["pid"] == AGENT.pid
        assert key not in json.dumps(entry)
    finally:
        rt2.close()


def test_a_candela_key_is_no_provider_key(sni, rt):
    f = transparent_flow("/v1/chat/completions", "api.openai.com", client="127.0.0.1")
    from .conftest import ALICE_KEY

    f.request.headers["authorization"] = f"Bearer {ALICE_KEY}"
    run(lambda: sni.requestheaders(f))
    assert f.response is None and ctx_of(f).provider_key_fingerprint is None


def test_plain_http_kept_alive_to_another_host_cannot_carry_a_provider_request(
    sni, audited, monkeypatch
):
    nl = _next_layer(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n")
    sni.next_layer(nl)
    f = tflow.ttcpflow(messages=[])
    f.client_conn = nl.context.client
    from mitmproxy import ctx as mctx
    from mitmproxy import tcp

    monkeypatch.setattr(mctx.master.commands, "call", lambda *a: None)
    sent = []
    for data in (
        b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 2\r\n\r\n{}",
    ):
        m = tcp.TCPMessage(True, data)
        f.messages.append(m)
        asyncio.run(sni.tcp_message(f))
        sent.append(m.content)
    assert sent[1] == b"" and sent[0].startswith(b"GET / ")
    assert [(a, e["reason"], e["host"]) for a, e in audited] == [
        ("bypass_attempt", "domain_fronting", "api.openai.com")
    ]
