from pathlib import Path

import pytest
import yaml

from candela_mitm.config import parse_config
from candela_mitm.enforcement import interception
from candela_mitm.enforcement.interception import HostMap, plaintext_decision, request_route
from candela_mitm.providers.specs import resolve_all

SPEC_CONFIG = Path(__file__).resolve().parents[4] / "shared" / "spec" / "config.example.yaml"


@pytest.mark.parametrize(
    "name, route",
    [
        ("api.openai.com", "openai"),
        ("API.OpenAI.com.", "openai"),
        ("api.openai.com:443", "openai"),
        ("api.anthropic.com", "anthropic-direct"),
        ("generativelanguage.googleapis.com", "google"),
        ("aiplatform.googleapis.com", "anthropic-vertex"),
        ("us-central1-aiplatform.googleapis.com", "anthropic-vertex"),
        ("europe-west4-aiplatform.googleapis.com", "anthropic-vertex"),
        ("bedrock-runtime.us-east-1.amazonaws.com", "anthropic-bedrock"),
        ("bedrock-runtime.eu-central-1.amazonaws.com", "anthropic-bedrock"),
        ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "anthropic-bedrock"),
        # OpenAI's data-residency hosts
        ("us.api.openai.com", "openai"),
        ("eu.api.openai.com", "openai"),
        ("au.api.openai.com", "openai"),
        ("in.api.openai.com", "openai"),
        ("jp.api.openai.com", "openai"),
        ("ae.api.openai.com", "openai"),
        ("EU.API.OPENAI.COM.", "openai"),
        # every Vertex host and region goes to the Vertex route
        ("global-aiplatform.googleapis.com", "anthropic-vertex"),
        ("asia-southeast1-aiplatform.googleapis.com", "anthropic-vertex"),
        ("me-central2-aiplatform.googleapis.com", "anthropic-vertex"),
        ("aiplatform.us-central1.rep.googleapis.com", "anthropic-vertex"),
        ("aiplatform.mtls.googleapis.com", "anthropic-vertex"),
        ("us-central1-aiplatform.mtls.googleapis.com", "anthropic-vertex"),
        # Bedrock: dual-stack, FIPS and mantle in any region
        ("bedrock-runtime.ap-northeast-1.api.aws", "anthropic-bedrock"),
        ("bedrock-runtime-fips.us-east-1.api.aws", "anthropic-bedrock"),
        ("bedrock-mantle.us-east-1.api.aws", "bedrock-mantle"),
        ("bedrock-mantle.eu-west-3.api.aws", "bedrock-mantle"),
        # not providers: other labels, deeper names, look-alike domains
        ("eu.api.openai.com.evil.example", None),
        ("a.b.api.openai.com", None),
        ("bedrock-mantle.api.aws", None),
        ("bedrock-mantle.us-east-1.api.aws.evil.example", None),
        ("aiplatform.us-central1.rep.googleapis.com.evil", None),
        ("www.googleapis.com", None),
        # a wildcard is one label (or part of one), never a dot
        ("evil.us-central1-aiplatform.googleapis.com", None),
        ("us-central1-aiplatform.googleapis.com.evil.example", None),
        ("bedrock-runtime.a.b.amazonaws.com", None),
        ("bedrock-runtime.us-east-1.amazonaws.com.evil.example", None),
        ("bedrock.us-east-1.amazonaws.com", None),
        ("openai.com", None),
        ("xapi.openai.com", None),
        ("example.com", None),
        ("", None),
        (None, None),
    ],
)
def test_default_hosts_route_every_providers_public_host(name, route):
    assert HostMap().route_for(name) == route


def test_configured_hosts_extend_and_override_the_defaults():
    hosts = HostMap({"API.openai.com": "lmstudio", "llm.internal.example": "ollama"})
    assert hosts.route_for("api.openai.com") == "lmstudio"
    assert hosts.route_for("llm.internal.example") == "ollama"
    assert hosts.route_for("api.anthropic.com") == "anthropic-direct"
    only = HostMap({"llm.internal.example": "ollama"}, defaults=False)
    assert only.route_for("api.openai.com") is None


def test_a_configured_family_extends_and_overrides_the_defaults():
    hosts = HostMap({"*.llm.internal.example": "ollama", "eu.api.openai.com": "lmstudio"})
    assert hosts.route_for("gpu-1.llm.internal.example") == "ollama"
    assert hosts.route_for("llm.internal.example") is None
    assert hosts.route_for("eu.api.openai.com") == "lmstudio"  # the exact name wins
    assert hosts.route_for("us.api.openai.com") == "openai"
    over = HostMap({"*-aiplatform.googleapis.com": "anthropic"})
    assert over.route_for("us-east5-aiplatform.googleapis.com") == "anthropic"


@pytest.mark.parametrize(
    "bad", ["*", "*.com", "api.*", "https://api.x.com", "api.x.com:443", "a..b.com", "a/b.com"]
)
def test_a_bad_host_pattern_is_refused(bad):
    with pytest.raises(ValueError, match="host"):
        HostMap({bad: "openai"})


@pytest.mark.parametrize(
    "names, inside, outside",
    [
        (
            ["*.googleapis.com"],
            ["www.googleapis.com", "storage.googleapis.com"],
            ["googleapis.com", "a.b.googleapis.com"],
        ),
        (
            ["other.test", "*.edge.test"],
            ["other.test", "a.edge.test"],
            ["edge.test", "x.other.test"],
        ),
        ([], [], ["www.google.com"]),
    ],
)
def test_host_sets_match_names_and_families(names, inside, outside):
    edge = interception.HostSet(names)
    assert all(n in edge for n in inside)
    assert not any(n in edge for n in [*outside, "", None])


def test_the_default_shared_edges_are_googles_front_end_not_the_providers_own_hosts():
    from candela_mitm.config import Interception

    edge = interception.HostSet(Interception().shared_edges)
    assert "www.google.com" in edge and "storage.googleapis.com" in edge
    assert "generativelanguage.googleapis.com" in edge  # the same edge: a provider is decided first
    assert "api.openai.com" not in edge


def test_an_unknown_route_is_refused():
    with pytest.raises(ValueError, match="nowhere"):
        HostMap({"x.example": "nowhere"})


def test_the_spec_example_config_maps_its_hosts():
    config = parse_config(yaml.safe_load(SPEC_CONFIG.read_text()))
    hosts = HostMap(config.interception.hosts)
    assert hosts.route_for("api.anthropic.com") == "anthropic-direct"
    assert hosts.route_for("generativelanguage.googleapis.com") == "google"


def test_exact_names_are_those_a_sandbox_can_resolve_ahead():
    names = HostMap({"llm.internal.example": "ollama"}).exact_names()
    assert "api.openai.com" in names and "llm.internal.example" in names
    assert not any("*" in n for n in names)


@pytest.mark.parametrize(
    "provider, path, route, rest",
    [
        ("openai", "/v1/chat/completions", "openai", "/v1/chat/completions"),
        ("openai", "/v1/responses?x=1", "openai", "/v1/responses?x=1"),
        ("anthropic-direct", "/v1/messages", "anthropic-direct", "/v1/messages"),
        (
            "google",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            "google",
            "/v1beta/models/gemini-2.5-flash:generateContent",
        ),
        # Gemini's OpenAI-compatible endpoint shares the host: its route's base path comes off
        ("google", "/v1beta/openai/chat/completions", "gemini-oai", "/chat/completions"),
        ("google", "/v1beta/openai/models?x=1", "gemini-oai", "/models?x=1"),
        (
            "anthropic-vertex",
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude:rawPredict",
            "anthropic-vertex",
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude:rawPredict",
        ),
    ],
)
def test_intercepted_requests_keep_their_original_path(provider, path, route, rest):
    r = request_route(provider, path)
    assert (r.provider, r.rest) == (route, rest)


def test_the_rest_joins_the_configured_base_to_the_apps_own_url():
    ups = resolve_all(
        parse_config({"providers": {"gemini-oai": {"base_url": "http://fake:1/v1beta/openai"}}})
    )
    r = request_route("google", "/v1beta/openai/chat/completions")
    assert ups[r.provider].url(r.rest) == "http://fake:1/v1beta/openai/chat/completions"


@pytest.mark.parametrize(
    "sni, host, mismatch",
    [
        ("api.openai.com", "api.openai.com", False),
        ("api.openai.com", "api.openai.com:443", False),
        ("api.openai.com", "API.OPENAI.COM.", False),
        ("api.openai.com", "api.anthropic.com", True),
        ("api.openai.com", "evil.example", True),
        ("api.openai.com", None, True),
        ("api.openai.com", "", True),
        (None, "anything.example", False),  # plain HTTP: no SNI to compare with
    ],
)
def test_host_mismatch(sni, host, mismatch):
    assert interception.host_mismatch(sni, host) is mismatch


@pytest.mark.parametrize(
    "value, host",
    [
        ("Example.COM.", "example.com"),
        ("example.com:8443", "example.com"),
        ("[::1]:443", "::1"),
        ("[fd00::1]", "fd00::1"),
        ("fd00::1", "fd00::1"),
    ],
)
def test_normalize_host(value, host):
    assert interception.normalize_host(value) == host


GET = b"GET /x HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n\r\n"


@pytest.mark.parametrize(
    "head, passthrough, proxy_request",
    [
        (GET % b"other.example", True, False),
        (GET % b"other.example:80", True, False),
        (GET % b"api.openai.com", False, False),
        (b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", False, True),
        (b"GET http://api.openai.com/v1/models HTTP/1.1\r\nHost: x.example\r\n\r\n", False, True),
        (b"GET https://api.openai.com/v1/models HTTP/1.1\r\n\r\n", False, True),
        (b"GET / HTTP/1.1\r\n\r\n", False, False),  # no Host: nothing to pass through by
        (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: api.openai.com\r\n\r\n", False, False),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False, False),  # h2c: governed or refused
        (b"SSH-2.0-OpenSSH\r\n\r\n", False, False),
        (b"x" * (interception.MAX_PLAINTEXT_HEAD + 1), False, False),
    ],
)
def test_plaintext_decision(head, passthrough, proxy_request):
    d = plaintext_decision(head, HostMap())
    assert d is not None
    assert (d.passthrough, d.proxy_request) == (passthrough, proxy_request)


@pytest.mark.parametrize("head", [b"", b"GET / HTTP/1.1\r\nHost: other.example\r\n"])
def test_plaintext_decision_waits_for_the_whole_head(head):
    assert plaintext_decision(head, HostMap()) is None


def test_provider_addresses_are_those_of_provider_names():
    pairs = [
        ("api.openai.com", "198.18.0.1"),
        ("us-east5-aiplatform.googleapis.com", "198.18.0.2"),
        ("other.example", "198.18.0.3"),
        ("api.anthropic.com", "not-an-address"),
    ]
    assert interception.provider_addresses(pairs, HostMap()) == {"198.18.0.1", "198.18.0.2"}


@pytest.mark.parametrize(
    "route, sni, host, region",
    [
        ("openai", "api.openai.com", "api.openai.com", None),  # its own host: unchanged
        ("openai", "eu.api.openai.com", "eu.api.openai.com", None),  # data residency
        ("openai", "ae.api.openai.com", "ae.api.openai.com", None),
        ("anthropic-vertex", "europe-west4-aiplatform.googleapis.com",
         "europe-west4-aiplatform.googleapis.com", "us-east5"),
        ("anthropic-bedrock", "bedrock-runtime.eu-west-1.amazonaws.com",
         "bedrock-runtime.eu-west-1.amazonaws.com", "eu-west-1"),  # signed for its region
        ("anthropic-bedrock", "bedrock-runtime-fips.us-gov-west-1.amazonaws.com",
         "bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        ("bedrock-mantle", "bedrock-mantle.ap-south-1.api.aws", "bedrock-mantle.ap-south-1.api.aws",
         "ap-south-1"),
        # not where Candela goes by itself: an mTLS endpoint, a name the operator added
        ("anthropic-vertex", "us-east5-aiplatform.mtls.googleapis.com", None, None),
        ("openai", "llm.internal", None, None),
    ],
)  # fmt: skip
def test_an_intercepted_request_goes_to_the_host_the_app_asked_for(route, sni, host, region):
    up = resolve_all(parse_config({}))[route]
    at = interception.upstream_at_host(up, route, sni)
    if host is None:
        assert at is None
    else:
        assert at is not None and (at.scheme, at.host, at.port) == ("https", host, 443)
        assert at.region == region and at.base_path == up.base_path
        assert (at is up) is (sni == up.host)


@pytest.mark.parametrize(
    "denial, status, code",
    [
        (interception.misdirected("api.openai.com", "evil.example"), 421, "misdirected_request"),
        (
            interception.region_not_configured("anthropic-bedrock", "a", "b"),
            421,
            "misdirected_request",
        ),
        (
            interception.proxy_request_denied("CONNECT", "api.openai.com:443"),
            403,
            "proxy_not_allowed",
        ),
        (interception.host_not_intercepted("x.example"), 403, "host_not_intercepted"),
    ],
)
def test_denials_are_json_with_a_code(denial, status, code):
    assert (denial.status, denial.error) == (status, code)
    assert denial.payload()["message"]


# -- a shared edge's requests, read as their bytes pass -------------------------------------------

GET_OTHER = b"GET / HTTP/1.1\r\nHost: www.google.com\r\n\r\n"
FRONTED = b"GET /v1beta/models HTTP/1.1\r\nHost: generativelanguage.googleapis.com\r\n\r\n"


def _post(body: bytes, host: bytes = b"www.google.com") -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        host,
        len(body),
        body,
    )


def _chunked(*chunks: bytes) -> bytes:
    out = b"POST /x HTTP/1.1\r\nHost: www.google.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    for c in chunks:
        out += b"%x\r\n%s\r\n" % (len(c), c)
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


@pytest.mark.parametrize(
    "stream, hosts, refused",
    [
        (GET_OTHER, ["www.google.com"], False),
        (GET_OTHER + GET_OTHER, ["www.google.com"] * 2, False),  # keep-alive, pipelined
        (GET_OTHER + FRONTED, ["www.google.com", "generativelanguage.googleapis.com"], True),
        # a body that looks like a request is a body: skipped by its length, not read as a head
        (_post(FRONTED) + GET_OTHER, ["www.google.com", "www.google.com"], False),
        (_post(FRONTED) + FRONTED, ["www.google.com", "generativelanguage.googleapis.com"], True),
        (
            _chunked(FRONTED, b"x" * 20) + FRONTED,
            ["www.google.com", "generativelanguage.googleapis.com"],
            True,
        ),
        (_chunked(FRONTED) + GET_OTHER, ["www.google.com", "www.google.com"], False),
        # what cannot be framed refuses the rest of the connection
        (
            b"POST / HTTP/1.1\r\nHost: www.google.com\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            ["www.google.com"],
            True,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: www.google.com\r\nTransfer-Encoding: gzip\r\n\r\n",
            ["www.google.com"],
            True,
        ),
        (
            b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: www.google.com\r\n\r\n",
            ["www.google.com"],
            True,
        ),
        (
            b"GET http://api.openai.com/ HTTP/1.1\r\nHost: www.google.com\r\n\r\n",
            ["www.google.com"],
            True,
        ),
        (b"GET / HTTP/1.1\r\n\r\n", [None], True),  # no Host
        (b"x" * (interception.MAX_PLAINTEXT_HEAD + 1), [], True),
        (
            b"POST / HTTP/1.1\r\nHost: www.google.com\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n",
            ["www.google.com"],
            True,
        ),
    ],
)
def test_every_request_on_a_connection_is_read_however_the_bytes_arrive(stream, hosts, refused):
    for size in (len(stream) or 1, 1, 7):  # whole, byte by byte, in odd pieces
        reader = interception.RequestStream(HostMap())
        seen = []
        for i in range(0, len(stream), size):
            seen += reader.feed(stream[i : i + size])
            if reader.refused:
                break
        assert [d.host for d in seen] == hosts
        assert reader.refused is refused


def test_after_an_upgrade_the_bytes_are_not_http():
    reader = interception.RequestStream(HostMap())
    ws = b"GET /ws HTTP/1.1\r\nHost: www.google.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    assert [d.host for d in reader.feed(ws)] == ["www.google.com"]
    assert reader.upgraded and reader.feed(FRONTED) == [] and not reader.refused
