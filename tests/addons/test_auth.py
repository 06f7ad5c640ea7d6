import asyncio
import getpass

import pytest

from candela_mitm.addons.auth import Auth, foreign_credential
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.router import Router

from .conftest import ALICE_KEY, make_flow

JWT_SHAPED = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"


def authenticate(rt, headers, path="/v1/models"):
    flow = make_flow(path, method="GET", headers=headers)
    Router(rt).requestheaders(flow)
    asyncio.run(Auth(rt).requestheaders(flow))
    return flow


@pytest.mark.parametrize(
    "headers, user, via",
    [
        ({}, None, "local"),
        ({"Authorization": "Bearer lm-studio"}, None, "local"),  # the openai SDK's dummy key
        ({"Authorization": "Bearer ollama"}, None, "local"),
        ({"x-api-key": "anything"}, None, "local"),
        ({"x-goog-api-key": "AIzaSomething"}, None, "local"),
        ({"Authorization": f"Bearer {ALICE_KEY}"}, "alice@example.com", "api_key"),
        ({"x-api-key": ALICE_KEY}, "alice@example.com", "api_key"),
    ],
)
def test_local_mode_ignores_a_key_that_is_not_candelas(make_runtime, headers, user, via):
    rt = make_runtime("local")
    flow = authenticate(rt, headers)
    assert flow.response is None
    p = ctx_of(flow).principal
    assert p.user == (user or getpass.getuser()) and p.via == via


@pytest.mark.parametrize(
    "command, auth, headers",
    [
        ("local", {}, {"X-Candela-Auth": "Bearer not-a-key"}),  # Candela's own header: meant for us
        ("local", {}, {"Authorization": f"Bearer {JWT_SHAPED}"}),  # an ID token that failed
        ("local", {}, {"Authorization": "Basic dXNlcjpwYXNz"}),  # malformed
        ("local", {"required": True}, {"Authorization": "Bearer lm-studio"}),
        ("server", {}, {"Authorization": "Bearer lm-studio"}),
        ("server", {}, {}),
    ],
)
def test_other_bad_credentials_stay_401(make_runtime, command, auth, headers):
    rt = make_runtime(command, **auth)
    flow = authenticate(rt, headers)
    assert flow.response is not None and flow.response.status_code == 401
    assert ctx_of(flow).principal is None


@pytest.mark.parametrize(
    "headers, query, expected",
    [
        ({}, {}, False),
        ({"Authorization": "Bearer lm-studio"}, {}, True),
        ({"authorization": "Bearer sk-1234"}, {}, True),
        ({}, {"key": "dummy"}, True),
        ({"X-Candela-Auth": "Bearer x"}, {}, False),
        ({"Authorization": f"Bearer {JWT_SHAPED}"}, {}, False),
        ({"Authorization": "Bearer two words"}, {}, False),
    ],
)
def test_foreign_credential(headers, query, expected):
    assert foreign_credential(headers, query) is expected


# issue 7: the headers read in one pass, as dict(headers.items()) would have them
@pytest.mark.parametrize(
    "fields",
    [
        [(b"Authorization", b"Bearer k"), (b"Content-Type", b"application/json")],
        [(b"X-Dup", b"a"), (b"x-dup", b"b"), (b"X-DUP", b"c")],
        [(b"K", "\u00e9".encode()), (b"Bad", b"\xff\xfe")],
        [],
    ],
)
def test_plain_headers_equal_headers_items(fields: list[tuple[bytes, bytes]]) -> None:
    from mitmproxy.test import tflow

    from candela_mitm.addons.auth import plain_headers

    f = tflow.tflow()
    f.request.headers.fields = tuple(fields)
    assert plain_headers(f.request.headers) == dict(f.request.headers.items())


@pytest.mark.parametrize(
    "user, allow_unknown, enrolled",
    [
        ("stranger@example.com", False, False),  # verified, but nobody made it a user
        ("stranger@example.com", True, True),  # the operator opted in
        ("alice@example.com", False, True),  # configured under users:
        ("boss@example.com", False, True),  # configured under auth.admins
        ("created@example.com", False, True),  # created through the admin API (the store)
    ],
)
def test_verified_identities_must_be_enrolled(make_runtime, user, allow_unknown, enrolled):
    import json

    from candela_mitm.state import UserRecord
    from tests.fakes.oidc import FakeOidcProvider

    with FakeOidcProvider() as idp:
        rt = make_runtime(
            "server",
            oidc=idp.oidc_config().model_dump(),
            admins=["boss@example.com"],
            allow_unknown_users=allow_unknown,
        )
        rt.store.put_user(UserRecord(user_id="created@example.com", tenants=("t",)))
        flow = authenticate(rt, {"Authorization": f"Bearer {idp.id_token(user)}"})
    if enrolled:
        assert flow.response is None
        assert ctx_of(flow).principal.user == user
    else:
        assert flow.response is not None and flow.response.status_code == 403
        body = json.loads(flow.response.content)
        assert body["error"] == "user_not_enrolled" and body["user_id"] == user



@pytest.mark.parametrize(
    "fields",
    [
        [],
        [(b"Authorization", b"Bearer k"), (b"Content-Type", b"application/json")],
        [(b"X-Candela-Tenant-Id", b"acme")],
        [(b"x-candela-tenant-id", b"  ")],
        [(b"X-CANDELA-TENANT-ID", b"acme"), (b"baggage", b"candela.tenant_id=other")],
        [(b"Baggage", b"candela.tenant_id=acme")],
        [(b"BAGGAGE", b"other=1, candela.tenant_id=acme")],
        [(b"baggage", b"other=1")],
        [(b"X-Candela-Tenant", b"acme")],  # not the header: no tenant named
    ],
)
def test_names_tenant_is_exact_where_requested_tenant_finds_one(fields) -> None:
    """The fast path skips requested_tenant only where it would find nothing."""
    from mitmproxy.test import tflow

    from candela_mitm.addons.auth import names_tenant
    from candela_mitm.governance.tenancy import requested_tenant

    f = tflow.tflow()
    f.request.headers.fields = tuple(fields)
    if not names_tenant(f.request.headers):
        assert requested_tenant(f.request.headers) is None
    assert names_tenant(f.request.headers) == any(
        k.lower() in (b"x-candela-tenant-id", b"baggage") for k, _ in fields
    )


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/proxy/gemini/v1beta/models/m:generateContent?key=cdl_x&alt=sse", {"key": "cdl_x", "alt": "sse"}),
        ("/proxy/gemini/v1beta/models/m:generateContent?key=a%2Fb", {"key": "a/b"}),
        ("/proxy/openai/v1/chat/completions", {}),  # no query: none parsed
        ("/proxy/openai/v1/chat/completions?", {}),
    ],
)
def test_the_query_a_credential_can_be_in(path, expected) -> None:
    from mitmproxy.test import tflow

    from candela_mitm.addons.auth import query_of

    f = tflow.tflow()
    f.request.path = path
    assert dict(query_of(f.request)) == expected
