from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import botocore.auth
import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials

from candela_mitm.config import Config
from candela_mitm.providers.specs import Upstream, resolve_all
from candela_mitm.providers.upstream_auth import (
    AwsCredentialSource,
    CredentialsUnavailable,
    GoogleTokenSource,
    UpstreamCredentials,
    header_names_to_strip,
    sigv4_headers,
)
from tests.fakes.google_oauth import FakeTokenServer

# The AWS SigV4 test suite's credentials and clock (aws-sig-v4-test-suite, 2015-08-30).
SUITE_KEY = "AKIDEXAMPLE"
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_TIME = dt.datetime(2015, 8, 30, 12, 36, 0)

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
BEDROCK_PATH = "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke"


@pytest.fixture
def token_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeTokenServer]:
    # requests would send even loopback traffic to a configured proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with FakeTokenServer() as server:
        path = server.make_service_account_file(tmp_path)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
        yield server


@pytest.fixture
def suite_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: SUITE_TIME)


# -- Google ADC ------------------------------------------------------------------------------


def test_adc_token_comes_from_the_token_endpoint(token_server: FakeTokenServer) -> None:
    token = asyncio.run(GoogleTokenSource().token())
    assert token.startswith("ya29.fake-")
    assert token in token_server.issued
    assert token_server.is_valid(token)
    assert token_server.calls == 1
    assert token_server.rejected == []
    assert token_server.scopes == [CLOUD_PLATFORM]


def test_concurrent_callers_share_one_refresh(token_server: FakeTokenServer) -> None:
    token_server.delay_s = 0.2  # every caller arrives while the refresh is in flight
    source = GoogleTokenSource()

    async def many() -> list[str]:
        return await asyncio.gather(*(source.token() for _ in range(25)))

    tokens = asyncio.run(many())
    assert len(set(tokens)) == 1
    assert token_server.calls == 1
    assert asyncio.run(source.token()) == tokens[0]  # cached afterwards too
    assert token_server.calls == 1


def test_a_cancelled_caller_does_not_cancel_the_refresh(token_server: FakeTokenServer) -> None:
    token_server.delay_s = 0.3
    source = GoogleTokenSource()

    async def scenario() -> tuple[str, bool]:
        first = asyncio.create_task(source.token())
        second = asyncio.create_task(source.token())
        await asyncio.sleep(0.05)
        first.cancel()
        token = await second
        try:
            await first
        except asyncio.CancelledError:
            return token, True
        return token, False

    token, first_cancelled = asyncio.run(scenario())
    assert first_cancelled
    assert token_server.is_valid(token)
    assert token_server.calls == 1


@pytest.mark.parametrize(
    ("elapsed", "refreshed"),
    [
        (dt.timedelta(minutes=0), False),
        (dt.timedelta(minutes=54), False),  # 6 minutes left: still inside the margin
        (dt.timedelta(minutes=56), True),  # 4 minutes left: replaced before it expires
        (dt.timedelta(minutes=61), True),  # expired
    ],
)
def test_token_is_refreshed_five_minutes_before_expiry(
    token_server: FakeTokenServer, elapsed: dt.timedelta, refreshed: bool
) -> None:
    token_server.expires_in = 3600
    now = [dt.datetime.now(dt.UTC).replace(tzinfo=None)]
    source = GoogleTokenSource(clock=lambda: now[0])
    first = asyncio.run(source.token())
    now[0] += elapsed
    second = asyncio.run(source.token())
    assert (second != first) is refreshed
    assert token_server.calls == (2 if refreshed else 1)
    assert token_server.is_valid(second)


def test_short_lived_tokens_are_refreshed_on_every_use(token_server: FakeTokenServer) -> None:
    token_server.expires_in = 240  # shorter than the refresh margin
    source = GoogleTokenSource()
    first = asyncio.run(source.token())
    second = asyncio.run(source.token())
    assert first != second
    assert token_server.calls == 2


def test_the_fake_treats_expired_tokens_as_invalid(token_server: FakeTokenServer) -> None:
    token_server.expires_in = 0
    token = asyncio.run(GoogleTokenSource().token())
    assert token in token_server.issued
    assert not token_server.is_valid(token)
    assert not token_server.is_valid("ya29.fake-never-issued")


def test_invalidate_forces_a_new_token(token_server: FakeTokenServer) -> None:
    source = GoogleTokenSource()
    first = asyncio.run(source.token())
    source.invalidate()
    assert asyncio.run(source.token()) != first
    assert token_server.calls == 2


def _break(case: str, server: FakeTokenServer, tmp_path: Path, mp: pytest.MonkeyPatch) -> None:
    if case == "no credentials file":
        mp.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    elif case == "endpoint refuses":
        server.fail_status = 401
    elif case == "key the endpoint does not know":
        path = server.make_service_account_file(tmp_path, foreign_key=True)
        mp.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    elif case == "endpoint down":
        server.stop()


@pytest.mark.parametrize(
    "case",
    ["no credentials file", "endpoint refuses", "key the endpoint does not know", "endpoint down"],
)
def test_adc_failure_raises_credentials_unavailable_without_secrets(
    token_server: FakeTokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    _break(case, token_server, tmp_path, monkeypatch)
    with pytest.raises(CredentialsUnavailable) as caught:
        asyncio.run(GoogleTokenSource().token())
    message = str(caught.value)
    assert "Google Application Default Credentials" in message
    for secret in ("PRIVATE KEY", "ya29.", "eyJ"):  # key, token, JWT assertion
        assert secret not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    if case == "key the endpoint does not know":
        assert token_server.rejected == ["Invalid JWT Signature."]
        assert token_server.issued == set()


def test_a_failed_refresh_is_retried_by_the_next_caller(token_server: FakeTokenServer) -> None:
    source = GoogleTokenSource()
    token_server.fail_status = 401
    with pytest.raises(CredentialsUnavailable):
        asyncio.run(source.token())
    token_server.fail_status = None
    assert token_server.is_valid(asyncio.run(source.token()))
    assert token_server.calls == 2


# -- SigV4 -----------------------------------------------------------------------------------


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def reference_authorization(
    *,
    access_key: str,
    secret: str,
    token: str | None,
    region: str,
    service: str,
    method: str,
    url: str,
    signed: Mapping[str, str],
    body: bytes,
    amz_date: str,
) -> str:
    """SigV4 written from AWS's description, sharing no code with botocore."""
    parts = urlsplit(url)
    assert parts.hostname and not parts.query
    default_port = {"http": 80, "https": 443}[parts.scheme]
    host = (
        parts.hostname if parts.port in (None, default_port) else f"{parts.hostname}:{parts.port}"
    )
    values = {k.lower(): " ".join(v.split()) for k, v in signed.items()}
    values |= {"host": host, "x-amz-date": amz_date}
    if token:
        values["x-amz-security-token"] = token
    names = sorted(values)
    # Non-S3 services encode each path segment twice: once on the wire, once here.
    canonical = "\n".join(
        [
            method,
            quote(parts.path or "/", safe="/~"),
            "",
            "".join(f"{n}:{values[n]}\n" for n in names),
            ";".join(names),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + secret).encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )


def botocore_signature(
    creds: Credentials,
    region: str,
    service: str,
    method: str,
    url: str,
    signed: Mapping[str, str],
    body: bytes,
    amz_date: str,
) -> str:
    """botocore's signature for the request as it will be sent, computed step by step."""
    headers = {**signed, "X-Amz-Date": amz_date}
    if creds.token:
        headers["X-Amz-Security-Token"] = creds.token
    request = AWSRequest(method=method, url=url, headers=headers, data=body)
    request.context["timestamp"] = amz_date
    auth = SigV4Auth(creds, service, region)
    return str(
        auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    )


def _signature(authorization: str) -> str:
    match = re.search(r"Signature=([0-9a-f]{64})$", authorization)
    assert match, authorization
    return match.group(1)


# Two vectors of the AWS SigV4 test suite: get-vanilla and post-x-www-form-urlencoded.
SUITE_VECTORS = [
    (
        "GET",
        {},
        b"",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    (
        "POST",
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"Param1=value1",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
    ),
]


@pytest.mark.parametrize(("method", "headers", "body", "expected"), SUITE_VECTORS)
def test_sigv4_matches_the_aws_test_suite(
    suite_clock: None, method: str, headers: dict[str, str], body: bytes, expected: str
) -> None:
    creds = ReadOnlyCredentials(SUITE_KEY, SUITE_SECRET, None)
    url = "https://example.amazonaws.com/"
    got = sigv4_headers(creds, "us-east-1", method, url, headers, body, service="service")
    assert got == {"authorization": expected, "x-amz-date": "20150830T123600Z"}
    # The reference implementation is checked against the same vectors.
    assert expected == reference_authorization(
        access_key=SUITE_KEY, secret=SUITE_SECRET, token=None, region="us-east-1",
        service="service", method=method, url=url, signed=headers, body=body,
        amz_date="20150830T123600Z",
    )  # fmt: skip


SIGN_CASES = [
    # (url, client headers, the subset that must be signed, session token)
    (
        "https://bedrock-runtime.us-east-1.amazonaws.com" + BEDROCK_PATH,
        {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "sdk/1"},
        {"content-type": "application/json"},
        None,
    ),
    (
        "https://bedrock-runtime.eu-west-3.amazonaws.com" + BEDROCK_PATH,
        {
            "content-type": "application/json",
            "X-Amz-Target": "t",
            "x-amzn-bedrock-trace": "ENABLED",
        },
        {"content-type": "application/json", "x-amz-target": "t"},
        "FwoGZXIvYXdzEXAMPLE-session-token",
    ),
    (
        # A client's own signature pieces are never signed: Candela's replace them.
        "http://127.0.0.1:8443/model/m/invoke-with-response-stream",
        {
            "Content-Type": "application/json",
            "Authorization": "AWS4-HMAC-SHA256 Credential=CLIENT/...",
            "X-Amz-Date": "20200101T000000Z",
            "X-Amz-Security-Token": "client-token",
            "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
        },
        {"content-type": "application/json"},
        "candela-session-token",
    ),
]


@pytest.mark.parametrize(("url", "headers", "signed", "token"), SIGN_CASES)
def test_sigv4_signature_verifies_independently(
    url: str, headers: dict[str, str], signed: dict[str, str], token: str | None
) -> None:
    region = url.split(".")[1] if "amazonaws" in url else "us-east-1"
    creds = Credentials("AKIATESTCANDELA", "test/secret+key", token)
    body = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}'
    got = sigv4_headers(creds, region, "post", url, headers, body)

    expected_names = {"authorization", "x-amz-date"} | (
        {"x-amz-security-token"} if token else set()
    )
    assert set(got) == expected_names
    if token:
        assert got["x-amz-security-token"] == token
    amz_date = got["x-amz-date"]
    assert re.fullmatch(r"\d{8}T\d{6}Z", amz_date)
    assert got["authorization"] == reference_authorization(
        access_key="AKIATESTCANDELA", secret="test/secret+key", token=token, region=region,
        service="bedrock", method="POST", url=url, signed=signed, body=body, amz_date=amz_date,
    )  # fmt: skip
    assert _signature(got["authorization"]) == botocore_signature(
        creds, region, "bedrock", "POST", url, signed, body, amz_date
    )


def test_sigv4_signs_the_exact_body_bytes(suite_clock: None) -> None:
    creds = ReadOnlyCredentials("AKIATESTCANDELA", "test/secret+key", None)
    url = "https://bedrock-runtime.us-east-1.amazonaws.com" + BEDROCK_PATH
    headers = {"content-type": "application/json"}
    body = b'{"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}'
    signature = _signature(
        sigv4_headers(creds, "us-east-1", "POST", url, headers, body)["authorization"]
    )
    for i in (0, len(body) // 2, len(body) - 1):
        flipped = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        got = sigv4_headers(creds, "us-east-1", "POST", url, headers, flipped)["authorization"]
        assert _signature(got) != signature
        assert got == reference_authorization(
            access_key="AKIATESTCANDELA", secret="test/secret+key", token=None,
            region="us-east-1", service="bedrock", method="POST", url=url, signed=headers,
            body=flipped, amz_date="20150830T123600Z",
        )  # fmt: skip


# -- AWS credentials -------------------------------------------------------------------------


def test_aws_credentials_from_the_env_mapping() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAENV",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_SESSION_TOKEN": "envtok",
    }
    frozen = asyncio.run(AwsCredentialSource(env).frozen())
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (
        "AKIAENV",
        "envsecret",
        "envtok",
    )


def test_refreshable_aws_credentials_refresh_off_the_loop() -> None:
    loop_thread = threading.get_ident()
    refreshed_on: list[int] = []

    def metadata(key: str, minutes: int) -> dict[str, str]:
        expiry = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)
        return {
            "access_key": key,
            "secret_key": key + "-secret",
            "token": key + "-token",
            "expiry_time": expiry.isoformat(),
        }

    def refresh() -> dict[str, str]:
        refreshed_on.append(threading.get_ident())
        return metadata("AKIANEW", 60)

    creds = RefreshableCredentials.create_from_metadata(metadata("AKIAOLD", 2), refresh, "test")
    source = AwsCredentialSource({}, credentials=creds)
    first = asyncio.run(source.frozen())
    second = asyncio.run(source.frozen())
    assert first.access_key == second.access_key == "AKIANEW"
    assert len(refreshed_on) == 1 and refreshed_on[0] != loop_thread


def test_no_aws_credentials_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CredentialsUnavailable, match="no AWS credentials"):
        asyncio.run(AwsCredentialSource({}).frozen())


# -- UpstreamCredentials ---------------------------------------------------------------------

KEYS = {"OPENAI_API_KEY": "sk-test-openai", "ANTHROPIC_API_KEY": "sk-ant-test"}


def _upstreams(providers: dict[str, Any] | None = None) -> dict[str, Upstream]:
    return resolve_all(Config.model_validate({"providers": providers or {}}))


def _credentials(env: Mapping[str, str], token: str | None = "aws-session") -> UpstreamCredentials:
    aws = AwsCredentialSource(
        {}, credentials=Credentials("AKIATESTCANDELA", "test/secret+key", token)
    )
    return UpstreamCredentials(_upstreams(), env, aws=aws)


@pytest.mark.parametrize(
    ("route", "client_headers", "expected"),
    [
        (
            "openai",
            {"Authorization": "Bearer candela-user-token"},
            {"authorization": "Bearer sk-test-openai"},
        ),
        ("anthropic-direct", {}, {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}),
        (
            "anthropic-direct",
            {"Anthropic-Version": "2026-10-21"},  # the client's version is kept
            {"x-api-key": "sk-ant-test", "anthropic-version": "2026-10-21"},
        ),
        ("ollama", {"Authorization": "Bearer x"}, {}),
        ("lmstudio", {}, {}),
    ],
)
def test_headers_for_keys_and_local_routes(
    route: str, client_headers: dict[str, str], expected: dict[str, str]
) -> None:
    creds = _credentials(KEYS)
    up = _upstreams()[route]
    got = asyncio.run(creds.headers_for(up, "POST", up.url("/v1/x"), client_headers, b"{}"))
    assert got == expected


def test_headers_for_google_routes_share_one_token(token_server: FakeTokenServer) -> None:
    creds = _credentials(KEYS)
    ups = _upstreams()

    async def all_google() -> list[dict[str, str]]:
        return [
            await creds.headers_for(ups[r], "POST", ups[r].url("/v1/x"), {}, b"{}")
            for r in ("google", "gemini-oai", "anthropic", "anthropic-vertex")
        ]

    got = asyncio.run(all_google())
    assert {frozenset(h) for h in got} == {frozenset({"authorization"})}
    values = {h["authorization"] for h in got}
    assert len(values) == 1
    token = values.pop().removeprefix("Bearer ")
    assert token_server.is_valid(token)
    assert token_server.calls == 1


@pytest.mark.parametrize("session_token", [None, "aws-session"])
def test_headers_for_bedrock_signs_the_request(session_token: str | None) -> None:
    creds = _credentials(KEYS, session_token)
    up = _upstreams({"anthropic-bedrock": {"region": "eu-central-1"}})["anthropic-bedrock"]
    url = up.url(BEDROCK_PATH)
    body = b'{"anthropic_version":"bedrock-2023-05-31"}'
    client = {
        "Content-Type": "application/json",
        "Authorization": "Bearer candela-user",
        "User-Agent": "u",
    }
    got = asyncio.run(creds.headers_for(up, "POST", url, client, body))
    assert got["authorization"] == reference_authorization(
        access_key="AKIATESTCANDELA", secret="test/secret+key", token=session_token,
        region="eu-central-1", service="bedrock", method="POST", url=url,
        signed={"content-type": "application/json"}, body=body, amz_date=got["x-amz-date"],
    )  # fmt: skip
    assert ("x-amz-security-token" in got) is (session_token is not None)


def test_headers_for_bedrock_mantle_sign_for_its_own_service() -> None:
    creds = _credentials(KEYS, None)
    up = _upstreams({"bedrock-mantle": {"region": "eu-west-1"}})["bedrock-mantle"]
    url = up.url("/v1/chat/completions")
    assert url == "https://bedrock-mantle.eu-west-1.api.aws/v1/chat/completions"
    body = b'{"model":"openai.gpt-oss-120b","messages":[]}'
    client = {"Content-Type": "application/json", "Authorization": "Bearer candela-user"}
    got = asyncio.run(creds.headers_for(up, "POST", url, client, body))
    assert "/eu-west-1/bedrock-mantle/aws4_request" in got["authorization"]
    assert got["authorization"] == reference_authorization(
        access_key="AKIATESTCANDELA", secret="test/secret+key", token=None,
        region="eu-west-1", service="bedrock-mantle", method="POST", url=url,
        signed={"content-type": "application/json"}, body=body, amz_date=got["x-amz-date"],
    )  # fmt: skip


@pytest.mark.parametrize("route", ["bedrock-mantle", "anthropic-bedrock"])
def test_a_bedrock_api_key_is_sent_as_a_bearer_token_instead_of_signing(route: str) -> None:
    ups = _upstreams({route: {"api_key_env": "AWS_BEARER_TOKEN_BEDROCK"}})
    creds = UpstreamCredentials(ups, {"AWS_BEARER_TOKEN_BEDROCK": "ABSKbedrockkey"})
    got = asyncio.run(creds.headers_for(ups[route], "POST", ups[route].url("/v1/x"), {}, b"{}"))
    assert got == {"authorization": "Bearer ABSKbedrockkey"}
    creds = UpstreamCredentials(ups, {})
    with pytest.raises(CredentialsUnavailable, match="AWS_BEARER_TOKEN_BEDROCK"):
        asyncio.run(creds.headers_for(ups[route], "POST", ups[route].url("/v1/x"), {}, b"{}"))


@pytest.mark.parametrize(
    ("providers", "route", "env", "variable"),
    [
        ({}, "openai", {}, "OPENAI_API_KEY"),
        ({}, "openai", {"OPENAI_API_KEY": ""}, "OPENAI_API_KEY"),
        ({}, "anthropic-direct", {"OPENAI_API_KEY": "sk-x"}, "ANTHROPIC_API_KEY"),
        ({"openai": {"api_key_env": "TEAM_OPENAI_KEY"}}, "openai", KEYS, "TEAM_OPENAI_KEY"),
    ],
)
def test_missing_api_key_names_the_variable(
    providers: dict[str, Any], route: str, env: dict[str, str], variable: str
) -> None:
    ups = _upstreams(providers)
    creds = UpstreamCredentials(ups, env)
    with pytest.raises(CredentialsUnavailable) as caught:
        asyncio.run(creds.headers_for(ups[route], "POST", ups[route].url("/v1/x"), {}, b""))
    assert variable in str(caught.value)
    for value in env.values():
        if value:
            assert value not in str(caught.value)
    assert creds.missing_api_keys()[route] == variable


def test_configured_key_variable_is_used() -> None:
    ups = _upstreams({"openai": {"api_key_env": "TEAM_OPENAI_KEY"}})
    creds = UpstreamCredentials(ups, {"TEAM_OPENAI_KEY": "sk-team", "OPENAI_API_KEY": "sk-default"})
    got = asyncio.run(
        creds.headers_for(ups["openai"], "GET", ups["openai"].url("/v1/models"), {}, b"")
    )
    assert got == {"authorization": "Bearer sk-team"}
    assert creds.missing_api_keys() == {"anthropic-direct": "ANTHROPIC_API_KEY"}


# -- the strip list --------------------------------------------------------------------------


def test_strip_list_covers_every_client_credential_header() -> None:
    names = header_names_to_strip()
    required = {
        "authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "api-key",
        "x-candela-auth", "x-candela-tenant-id",
        "x-amz-security-token", "x-amz-date", "x-amz-content-sha256",
    }  # fmt: skip
    assert required <= set(names)
    assert all(n == n.lower().strip() for n in names)
    assert len(names) == len(set(names))
    # Headers the upstream needs from the client must survive.
    assert not {"content-type", "anthropic-version", "anthropic-beta", "traceparent"} & set(names)


def test_every_header_candela_sets_is_stripped_from_the_client_first(
    token_server: FakeTokenServer,
) -> None:
    # Otherwise a client's value could travel beside Candela's. anthropic-version is the one
    # header Candela deliberately takes from the client.
    creds = _credentials(KEYS)
    set_by_candela: set[str] = set()
    for up in _upstreams().values():
        got = asyncio.run(creds.headers_for(up, "POST", up.url("/v1/x"), {}, b"{}"))
        set_by_candela |= set(got)
    assert set_by_candela - {"anthropic-version"} <= set(header_names_to_strip())
    assert {"authorization", "x-api-key", "x-amz-date", "x-amz-security-token"} <= set_by_candela


def test_aws_chain_is_resolved_once_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    resolved_on: list[int] = []

    class Session:
        def get_credentials(self) -> Credentials:
            resolved_on.append(threading.get_ident())
            time.sleep(0.1)  # a slow chain (IMDS, SSO): every caller arrives meanwhile
            return Credentials("AKIACHAIN", "chain-secret", None)

    monkeypatch.setattr(botocore.session, "get_session", Session)
    source = AwsCredentialSource({})  # nothing in the env mapping: the chain runs

    async def many() -> list[ReadOnlyCredentials]:
        return await asyncio.gather(*(source.frozen() for _ in range(10)))

    frozen = asyncio.run(many()) + [asyncio.run(source.frozen())]
    assert {f.access_key for f in frozen} == {"AKIACHAIN"}
    assert len(resolved_on) == 1 and resolved_on[0] != loop_thread
