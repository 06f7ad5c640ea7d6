import asyncio
import json
import os
import ssl

import pytest
from mitmproxy import connection
from mitmproxy.proxy import context, events, layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow
from mitmproxy.tls import ClientHelloData, TlsData

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.router import Router
from candela_mitm.addons.sni import Sni
from candela_mitm.config import parse_config
from candela_mitm.enforcement.registry import SandboxRecord, SandboxRegistry
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
        (
            "/model/m/invoke",
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "bedrock-runtime.eu-west-1.amazonaws.com",
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


def _hello(sni_name, dst):
    client = connection.Client(peername=(SANDBOX_ADDR, 40000), sockname=(PROVIDER_IP, 443))
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
    "sni_name, dst, ignored, refused",
    [
        ("api.openai.com", (PROVIDER_IP, 443), False, False),  # decrypted and governed
        ("other.example", ("198.18.9.9", 443), True, False),  # tunnelled untouched
        (None, ("198.18.9.9", 443), True, False),  # no name, not a provider: untouched
        (None, (PROVIDER_IP, 443), False, True),  # no name to a provider: refused
    ],
)
def test_tls_is_decided_by_its_server_name(sni, audited, sni_name, dst, ignored, refused):
    data = _hello(sni_name, dst)
    asyncio.run(sni.tls_clienthello(data))
    assert data.ignore_connection is ignored
    start = TlsData(data.context.client, data.context)
    start.ssl_conn = object()  # what mitmproxy's TLS addon would have made
    sni.tls_start_client(start)
    assert (start.ssl_conn is None) is refused
    assert [a for a, f in audited] == (["interception_denied"] if refused else [])
    if refused:
        assert audited[0][1]["reason"] == "sni_missing"
        assert audited[0][1]["destination"] == f"{PROVIDER_IP}:443"


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
        assert nl.layer.flow is None  # ignore=True: relayed, not even recorded


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
