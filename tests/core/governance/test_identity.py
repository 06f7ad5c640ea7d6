"""Identity: credential precedence, each credential kind, hostile input, caching, local mode, roles."""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from candela_mitm.config import AccessTokens, ApiKey, Auth, Oidc
from candela_mitm.errors import Denial
from candela_mitm.governance.identity import (
    CERTS_MIN_REFRESH_S,
    DEFAULT_CERTS_TTL_S,
    NEGATIVE_TTL_S,
    SOURCES,
    Authenticator,
    HttpResponse,
    KeyScope,
    MalformedCredential,
    Principal,
    extract_credential,
    key_id,
    urllib_fetcher,
)
from candela_mitm.state.ports import KeyRecord
from tests.fakes.oidc import FakeOidcProvider, b64url

ALICE_KEY = "cdl_alice_example_key"  # config.example.yaml stores this key's digest
ALICE_SHA = "1d7ab44a7d52779899b2b6d61230b265b654e07590677891e88d4d18fc07f034"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Clock:
    """The caches' clock, starting at real time (token exp claims are real epoch seconds)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def idp() -> Iterator[FakeOidcProvider]:
    with FakeOidcProvider() as p:
        yield p


@pytest.fixture
def fresh_idp() -> Iterator[FakeOidcProvider]:
    with FakeOidcProvider() as p:
        yield p


def make_auth(
    idp: FakeOidcProvider | None,
    keys: dict[str, str] | None = None,
    admins: list[str] | None = None,
    audiences: list[str] | None = None,
) -> Auth:
    return Auth(
        oidc=idp.oidc_config(audiences=audiences) if idp else None,
        access_tokens=idp.access_tokens_config() if idp else None,
        api_keys=[ApiKey(sha256=sha(k), user=u) for k, u in (keys or {}).items()],
        admins=admins or [],
    )


def where(source: str, token: str, raw: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Headers and query carrying `token` in `source` (raw: the header value as sent)."""
    if source == "query:key":
        return {}, {"key": raw if raw is not None else token}
    value = raw if raw is not None else (f"Bearer {token}" if source in SOURCES[:2] else token)
    return {source: value}, {}


# -- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize("first,second", list(itertools.combinations(SOURCES, 2)))
def test_precedence_of_every_pair(first: str, second: str) -> None:
    h1, q1 = where(first, "tok_first")
    h2, q2 = where(second, "tok_second")
    assert extract_credential({**h2, **h1}, {**q2, **q1}) == (first, "tok_first")


@pytest.mark.parametrize("first,second", list(itertools.combinations(SOURCES, 2)))
def test_malformed_higher_source_does_not_fall_back(first: str, second: str) -> None:
    h1, q1 = where(first, "", raw="Basic dXNlcjpwYXNz" if first in SOURCES[:2] else "a b")
    h2, q2 = where(second, "tok_second")
    with pytest.raises(MalformedCredential) as e:
        extract_credential({**h2, **h1}, {**q2, **q1})
    assert e.value.source == first


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"AUTHORIZATION": "Bearer abc"}, ("authorization", "abc")),
        ({"authorization": "bearer abc"}, ("authorization", "abc")),  # scheme is case-insensitive
        (
            {"X-Candela-Auth": "BEARER abc", "Authorization": "Bearer zzz"},
            ("x-candela-auth", "abc"),
        ),
        ({"X-Api-Key": "k1"}, ("x-api-key", "k1")),
        ({"X-GOOG-API-KEY": "k2"}, ("x-goog-api-key", "k2")),
        ({"Proxy-Authorization": "Bearer p"}, None),  # the IAP token is not the user's
        ({"Content-Type": "application/json"}, None),
        ({"Authorization": "Bearer a.b-c_d~e+f/g=="}, ("authorization", "a.b-c_d~e+f/g==")),
    ],
)
def test_extract_case_insensitive(headers: dict[str, str], expected: Any) -> None:
    assert extract_credential(headers, {}) == expected


def test_query_key_last() -> None:
    assert extract_credential({}, {"key": "k"}) == ("query:key", "k")
    assert extract_credential({}, {"alt": "sse"}) is None


MALFORMED_VALUES = [
    "Basic dXNlcjpwYXNz",
    "Bearer",
    "Bearer ",
    "Bearer  tok",
    "Bearer tok extra",
    " Bearer tok",
    "tok",
    "Bearer tok\x00",
    "Bearer tok\r\nX-Injected: 1",
    "Bearer tøk",
    "Bearer ' OR '1'='1",
    "Bearer " + "a" * 10_000,
    "Bearer " + "a" * 1_000_000,
]


@pytest.mark.parametrize("value", MALFORMED_VALUES, ids=lambda v: repr(v[:24]))
def test_malformed_authorization(value: str) -> None:
    with pytest.raises(MalformedCredential):
        extract_credential({"Authorization": value}, {})


def test_conflicting_spellings_are_malformed() -> None:
    with pytest.raises(MalformedCredential):
        extract_credential({"Authorization": "Bearer a", "authorization": "Bearer b"}, {})
    assert extract_credential({"Authorization": "Bearer a", "authorization": "Bearer a"}, {}) == (
        "authorization",
        "a",
    )


def test_key_id_is_sha256_prefix() -> None:
    assert key_id(ALICE_KEY) == ALICE_SHA[:8]


# -- each credential kind --------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_api_key_from_every_source(source: str) -> None:
    a = Authenticator(make_auth(None, {ALICE_KEY: "alice@example.com"}), required=True)
    headers, query = where(source, ALICE_KEY)
    p = run(a.authenticate(headers, query))
    assert p == Principal("alice@example.com", "developer", "api_key", ALICE_SHA[:8])


def test_api_key_precedence_through_authenticate() -> None:
    keys = {f"key_{s.replace(':', '_')}": f"user-{s}" for s in SOURCES}
    a = Authenticator(make_auth(None, keys), required=True)
    for first, second in itertools.combinations(SOURCES, 2):
        h1, q1 = where(first, f"key_{first.replace(':', '_')}")
        h2, q2 = where(second, f"key_{second.replace(':', '_')}")
        p = run(a.authenticate({**h2, **h1}, {**q2, **q1}))
        assert isinstance(p, Principal) and p.user == f"user-{first}", (first, second)


@pytest.mark.parametrize("source", ["x-candela-auth", "authorization"])
def test_id_token_valid(idp: FakeOidcProvider, source: str) -> None:
    a = Authenticator(make_auth(idp), required=True)
    tok = idp.id_token("dev@example.com")
    p = run(a.authenticate(*where(source, tok)))
    assert p == Principal("dev@example.com", "developer", "oidc", sha(tok)[:8])


@pytest.mark.parametrize("source", ["x-candela-auth", "authorization"])
def test_access_token_valid(idp: FakeOidcProvider, source: str) -> None:
    a = Authenticator(make_auth(idp), required=True)
    tok = idp.access_token("dev@example.com")
    p = run(a.authenticate(*where(source, tok)))
    assert p == Principal("dev@example.com", "developer", "access_token", sha(tok)[:8])


def test_proxy_authorization_is_the_proxy_identity(idp: FakeOidcProvider) -> None:
    a = Authenticator(make_auth(idp), required=True)
    iap = idp.id_token("sa@proj.iam.gserviceaccount.com")
    user = idp.access_token("dev@example.com")
    p = run(
        a.authenticate(
            {"Proxy-Authorization": f"Bearer {iap}", "X-Candela-Auth": f"Bearer {user}"}, {}
        )
    )
    assert isinstance(p, Principal)
    assert (p.user, p.via, p.proxy_identity) == (
        "dev@example.com",
        "access_token",
        "sa@proj.iam.gserviceaccount.com",
    )
    # The IAP identity alone is not a user.
    d = run(a.authenticate({"Proxy-Authorization": f"Bearer {iap}"}, {}))
    assert isinstance(d, Denial) and d.status == 401


@pytest.mark.parametrize(
    "proxy_value",
    ["Basic abc", "Bearer not-a-jwt", "Bearer a.b.c"],
)
def test_invalid_proxy_authorization_is_401(idp: FakeOidcProvider, proxy_value: str) -> None:
    a = Authenticator(make_auth(idp, {ALICE_KEY: "alice@example.com"}), required=True)
    d = run(a.authenticate({"Proxy-Authorization": proxy_value, "x-api-key": ALICE_KEY}, {}))
    assert isinstance(d, Denial) and d.status == 401


# -- hostile input ---------------------------------------------------------------------------


def _hostile(idp: FakeOidcProvider) -> list[tuple[str, str | None, dict[str, str], dict[str, str]]]:
    """(name, token, headers, query); every one must be a 401."""
    jwt_header = b64url(b'{"alg":"RS256","kid":"fake-key-1"}')
    valid = idp.id_token("dev@example.com")
    acc = idp.access_token("dev@example.com")
    cases: dict[str, str | tuple[dict[str, str], dict[str, str], str | None]] = {
        "sql": "' OR '1'='1",
        "nul": "abc\x00def",
        "crlf": "abc\r\nX-Admin: 1",
        "non-ascii": "clé",
        "10KB": "a" * 10_240,
        "1MB": "a" * 1_048_576,
        "10KB-jwt": f"{jwt_header}.{'a' * 10_240}.sig",
        "alg-none": idp.id_token("dev@example.com", alg="none"),
        "alg-none-lower": idp.id_token("dev@example.com", alg="None"),
        "hs256-alg-confusion": idp.id_token("dev@example.com", alg="HS256"),
        "foreign-key": idp.id_token("dev@example.com", foreign=True),
        "unknown-kid": idp.id_token("dev@example.com", kid="nope"),
        "expired": idp.id_token("dev@example.com", exp_delta=-120),
        "issued-in-future": idp.id_token("dev@example.com", iat_delta=600),
        "wrong-audience": idp.id_token("dev@example.com", aud="someone-else"),
        "wrong-issuer": idp.id_token("dev@example.com", iss="https://evil.example"),
        "no-email": idp.id_token(None),
        "email-unverified": idp.id_token("dev@example.com", extra={"email_verified": False}),
        "exp-as-string": idp.id_token("dev@example.com", extra={"exp": "9999999999"}),
        "tampered-payload": valid.split(".")[0]
        + "."
        + b64url(b'{"email":"admin@example.com","aud":"candela"}')
        + "."
        + valid.split(".")[2],
        "stripped-signature": valid.rsplit(".", 1)[0] + ".",
        "bad-base64-header": "e." + valid.split(".", 1)[1],
        "bad-base64-chars": "eyJ!!!.eyJ.sig",
        "header-not-json": b64url(b"not json") + ".e30.c2ln",
        "header-a-list": b64url(b"[1,2]") + ".e30.c2ln",
        "header-deeply-nested": b64url(b"[" * 6000) + ".e30.c2ln",
        "payload-deeply-nested": jwt_header + "." + b64url(b"[" * 6000) + ".c2ln",
        "abc.def.ghi": "abc.def.ghi",
        "four-segments": valid + ".x",
        "unknown-opaque": "ya29.never-issued",
        "unknown-api-key": "cdl_nobody",
        "access-expired": idp.access_token("dev@example.com", ttl=-5),
        "access-no-email": idp.access_token(None),
        "access-email-unverified": idp.access_token("dev@example.com", email_verified=False),
        "id-token-in-x-api-key": ({"x-api-key": valid}, {}, valid),
        "id-token-in-query": ({}, {"key": valid}, valid),
        "access-token-in-goog-key": ({"x-goog-api-key": acc}, {}, acc),
        "basic": ({"Authorization": "Basic YWxpY2U6cHc="}, {}, "YWxpY2U6cHc="),
        "no-token": ({"Authorization": "Bearer"}, {}, None),
        "several-spaces": ({"Authorization": "Bearer   " + ALICE_KEY}, {}, ALICE_KEY),
        "empty-x-api-key": ({"x-api-key": ""}, {}, None),
        "empty-query-key": ({}, {"key": ""}, None),
    }
    out: list[tuple[str, str | None, dict[str, str], dict[str, str]]] = []
    for name, c in cases.items():
        if isinstance(c, tuple):
            out.append((name, c[2], c[0], c[1]))
        else:
            out.append((name, c, {"Authorization": f"Bearer {c}"}, {}))
    return out


HOSTILE_NAMES = [
    "sql", "nul", "crlf", "non-ascii", "10KB", "1MB", "10KB-jwt", "alg-none", "alg-none-lower",
    "hs256-alg-confusion", "foreign-key", "unknown-kid", "expired", "issued-in-future",
    "wrong-audience", "wrong-issuer", "no-email", "email-unverified", "exp-as-string",
    "tampered-payload", "stripped-signature", "bad-base64-header", "bad-base64-chars",
    "header-not-json", "header-a-list", "header-deeply-nested", "payload-deeply-nested", "abc.def.ghi", "four-segments", "unknown-opaque",
    "unknown-api-key", "access-expired", "access-no-email", "access-email-unverified",
    "id-token-in-x-api-key", "id-token-in-query", "access-token-in-goog-key", "basic",
    "no-token", "several-spaces", "empty-x-api-key", "empty-query-key",
]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("required", [True, False])
def test_hostile_input_is_401(
    idp: FakeOidcProvider, caplog: pytest.LogCaptureFixture, name: str, required: bool
) -> None:
    cases = {c[0]: c for c in _hostile(idp)}
    assert set(cases) == set(HOSTILE_NAMES)
    _, token, headers, query = cases[name]
    a = Authenticator(
        make_auth(idp, {ALICE_KEY: "alice@example.com"}, admins=["admin@example.com"]),
        required=required,
    )
    with caplog.at_level(logging.DEBUG):
        d = run(a.authenticate(headers, query))
    assert isinstance(d, Denial), d
    assert (d.status, d.error) == (401, "unauthenticated")
    assert d.headers.get("WWW-Authenticate") == "Bearer"
    if token:
        assert token not in d.body().decode(errors="replace")
        assert all(token not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("size", [10_240, 1_048_576])
@pytest.mark.parametrize("source", SOURCES)
def test_oversized_tokens_never_reach_the_network(size: int, source: str) -> None:
    calls: list[str] = []

    def fetch(url: str, data: bytes | None = None) -> HttpResponse:
        calls.append(url)
        return HttpResponse(500, {}, b"")

    auth = Auth(oidc=Oidc(audiences=["candela"]), access_tokens=AccessTokens())
    a = Authenticator(auth, required=True, http=fetch)
    d = run(a.authenticate(*where(source, "eyJ" + "a" * size)))
    assert isinstance(d, Denial) and d.status == 401
    assert calls == []


# -- caching ---------------------------------------------------------------------------------


def test_certs_fetched_once_for_many_verifications(fresh_idp: FakeOidcProvider) -> None:
    a = Authenticator(make_auth(fresh_idp), required=True)

    async def many() -> list[Any]:
        toks = [fresh_idp.id_token(f"u{i}@example.com") for i in range(20)]
        first = [await a.authenticate(*where("authorization", t)) for t in toks[:10]]
        rest = await asyncio.gather(
            *(a.authenticate(*where("authorization", t)) for t in toks[10:])
        )
        return first + list(rest)

    results = run(many())
    assert [r.user for r in results] == [f"u{i}@example.com" for i in range(20)]
    assert fresh_idp.certs_fetches == 1


@pytest.mark.parametrize(
    "max_age,advance,fetches",
    [
        (3600, 3599, 1),
        (3600, 3601, 2),
        (0, 1, 2),
        (None, DEFAULT_CERTS_TTL_S - 1, 1),
        (None, DEFAULT_CERTS_TTL_S + 1, 2),
    ],
)
def test_certs_cache_honours_max_age(max_age: int | None, advance: float, fetches: int) -> None:
    clock = Clock()
    with FakeOidcProvider(certs_max_age=max_age) as p:
        a = Authenticator(make_auth(p), required=True, clock=clock)
        assert isinstance(
            run(a.authenticate(*where("authorization", p.id_token("a@x.io")))), Principal
        )
        clock.now += advance
        assert isinstance(
            run(a.authenticate(*where("authorization", p.id_token("b@x.io")))), Principal
        )
        assert p.certs_fetches == fetches


def test_unknown_kid_refetches_certs_at_most_once_a_minute(fresh_idp: FakeOidcProvider) -> None:
    clock = Clock()
    a = Authenticator(make_auth(fresh_idp), required=True, clock=clock)
    assert isinstance(
        run(a.authenticate(*where("authorization", fresh_idp.id_token("a@x.io")))), Principal
    )
    for _ in range(5):
        d = run(a.authenticate(*where("authorization", fresh_idp.id_token("a@x.io", kid="k2"))))
        assert isinstance(d, Denial) and d.status == 401
    assert fresh_idp.certs_fetches == 1  # still inside the minute: no refetch for unknown kids

    # Google publishes the next key before signing with it; after a minute it is picked up.
    fresh_idp.rotate_key("k2")
    clock.now += CERTS_MIN_REFRESH_S
    tok = fresh_idp.id_token("a@x.io", kid="k2", foreign=True)
    p = run(a.authenticate(*where("authorization", tok)))
    assert isinstance(p, Principal) and p.user == "a@x.io"
    assert fresh_idp.certs_fetches == 2


def test_tokeninfo_once_per_token_until_expiry(fresh_idp: FakeOidcProvider) -> None:
    clock = Clock()
    a = Authenticator(make_auth(fresh_idp), required=True, clock=clock)
    t1 = fresh_idp.access_token("one@x.io", ttl=600)
    t2 = fresh_idp.access_token("two@x.io", ttl=600)

    async def burst() -> list[Any]:
        return await asyncio.gather(
            *(a.authenticate(*where("authorization", t)) for t in [t1, t2] * 10)
        )

    results = run(burst())
    assert [r.user for r in results] == ["one@x.io", "two@x.io"] * 10
    for _ in range(5):
        assert run(a.authenticate(*where("x-candela-auth", t1))).user == "one@x.io"
    assert fresh_idp.tokeninfo_by_token == {t1: 1, t2: 1}

    # Past the token's own expiry the cache is dropped and the token is asked about again;
    # tokeninfo's exp is now in the past for this clock, so it is refused.
    clock.now += 601
    d = run(a.authenticate(*where("authorization", t1)))
    assert isinstance(d, Denial) and d.status == 401
    assert fresh_idp.tokeninfo_by_token[t1] == 2


def test_rejected_access_token_is_cached_briefly(fresh_idp: FakeOidcProvider) -> None:
    clock = Clock()
    a = Authenticator(make_auth(fresh_idp), required=True, clock=clock)
    for _ in range(3):
        assert run(a.authenticate(*where("authorization", "ya29.unknown"))).status == 401
    assert fresh_idp.tokeninfo_by_token["ya29.unknown"] == 1
    clock.now += NEGATIVE_TTL_S + 1
    assert run(a.authenticate(*where("authorization", "ya29.unknown"))).status == 401
    assert fresh_idp.tokeninfo_by_token["ya29.unknown"] == 2


def test_id_token_verified_once_then_cached() -> None:
    clock = Clock()
    with FakeOidcProvider(certs_max_age=60) as p:
        a = Authenticator(make_auth(p), required=True, clock=clock)
        tok = p.id_token("a@x.io")
        for _ in range(3):
            assert run(a.authenticate(*where("authorization", tok))).user == "a@x.io"
        # The certs are stale and now unobtainable, but a verified token needs no certs.
        p.certs_status = 500
        clock.now += 61
        assert run(a.authenticate(*where("authorization", tok))).user == "a@x.io"
        assert p.certs_fetches == 1
        # A new token does need them: unverifiable is 401, and the failure is not cached.
        for _ in range(2):
            d = run(a.authenticate(*where("authorization", p.id_token("b@x.io"))))
            assert isinstance(d, Denial) and d.status == 401
        assert p.certs_fetches == 3


# -- identity provider down: unverifiable is 401 and not cached ------------------------------


def test_unreachable_identity_provider_is_401_and_not_cached() -> None:
    calls: list[str] = []

    def down(url: str, data: bytes | None = None) -> HttpResponse:
        calls.append(url)
        raise ConnectionRefusedError("down")

    with FakeOidcProvider() as p:
        tok = p.id_token("a@x.io")
        acc = p.access_token("a@x.io")
        auth = make_auth(p)
    a = Authenticator(auth, required=True, http=down)
    for t in (tok, tok, acc, acc):
        d = run(a.authenticate(*where("authorization", t)))
        assert isinstance(d, Denial) and d.status == 401
        assert "cannot be" in d.message
    assert len(calls) == 4


def test_tokeninfo_server_error_is_401_not_cached() -> None:
    calls: list[str] = []

    def failing(url: str, data: bytes | None = None) -> HttpResponse:
        calls.append(url)
        return HttpResponse(503, {}, b"")

    auth = Auth(access_tokens=AccessTokens(audiences=["client"]))
    a = Authenticator(auth, required=True, http=failing)
    for _ in range(2):
        assert run(a.authenticate(*where("authorization", "ya29.x"))).status == 401
    assert len(calls) == 2


def test_default_fetcher_against_loopback(idp: FakeOidcProvider) -> None:
    fetch = urllib_fetcher(timeout_s=2)
    ok = fetch(idp.certs_url)
    assert ok.status == 200 and idp.kid.encode() in ok.body
    assert "max-age=3600" in ok.headers["Cache-Control"]
    assert fetch(idp.tokeninfo_url + "?access_token=nope").status == 400


# -- configuration limits --------------------------------------------------------------------


@pytest.mark.parametrize("with_oidc", [False, True])
def test_id_tokens_refused_without_oidc_or_audience(idp: FakeOidcProvider, with_oidc: bool) -> None:
    # With oidc but no audience, verify_token would skip the audience check: refused too.
    auth = Auth(oidc=idp.oidc_config(audiences=[])) if with_oidc else Auth()
    a = Authenticator(auth, required=True)
    d = run(a.authenticate(*where("authorization", idp.id_token("a@x.io"))))
    assert isinstance(d, Denial) and d.status == 401


def test_access_tokens_refused_without_tokeninfo(idp: FakeOidcProvider) -> None:
    a = Authenticator(Auth(oidc=idp.oidc_config()), required=True)
    d = run(a.authenticate(*where("authorization", idp.access_token("a@x.io"))))
    assert isinstance(d, Denial) and d.status == 401


def test_api_keys_added_and_removed_at_run_time() -> None:
    a = Authenticator(Auth(), required=True)
    assert run(a.authenticate({"x-api-key": "cdl_new"}, {})).status == 401
    a.add_api_key(sha("cdl_new"), "new@example.com")
    assert run(a.authenticate({"x-api-key": "cdl_new"}, {})).user == "new@example.com"
    assert a.remove_api_key(sha("cdl_new")) is True
    assert a.remove_api_key(sha("cdl_new")) is False
    assert run(a.authenticate({"x-api-key": "cdl_new"}, {})).status == 401


def test_each_of_many_keys_finds_its_own_user() -> None:
    a = Authenticator(Auth(), required=True)
    for i in range(2000):
        a.add_api_key(sha(f"cdl_key{i}"), f"user{i}@example.com")
    for i in (0, 1, 999, 1999):
        assert run(a.authenticate({"x-api-key": f"cdl_key{i}"}, {})).user == f"user{i}@example.com"
    for other in ("cdl_key2000", "cdl_key1 ", "CDL_KEY1", ""):
        assert run(a.authenticate({"x-api-key": other}, {})).status == 401


@pytest.mark.parametrize("digest", ["", "ABC", ALICE_SHA.upper(), ALICE_SHA[:-1], ALICE_SHA + "0"])
def test_add_api_key_rejects_bad_digest(digest: str) -> None:
    with pytest.raises(ValueError):
        Authenticator(Auth(), required=True).add_api_key(digest, "x")


# -- local mode ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "required,local_user,expected",
    [
        (False, "laptop-user", Principal("laptop-user", "developer", "local", None)),
        (False, None, Principal(getpass.getuser(), "developer", "local", None)),
        (True, "laptop-user", None),
    ],
)
def test_no_credential(required: bool, local_user: str | None, expected: Principal | None) -> None:
    a = Authenticator(Auth(), required=required, local_user=local_user)
    r = run(a.authenticate({"Accept": "application/json"}, {}))
    if expected is None:
        assert isinstance(r, Denial) and r.status == 401
    else:
        assert r == expected


def test_local_mode_uses_a_present_valid_credential() -> None:
    a = Authenticator(
        make_auth(None, {ALICE_KEY: "alice@example.com"}), required=False, local_user="me"
    )
    p = run(a.authenticate({"Authorization": f"Bearer {ALICE_KEY}"}, {}))
    assert isinstance(p, Principal) and (p.user, p.via) == ("alice@example.com", "api_key")


def test_local_admin_from_config() -> None:
    a = Authenticator(Auth(admins=["me"]), required=False, local_user="me")
    assert run(a.authenticate({}, {})).role == "admin"


# -- roles -----------------------------------------------------------------------------------


def _override(result: str | None | Exception) -> Callable[[str], str | None]:
    def hook(user: str) -> str | None:
        if isinstance(result, Exception):
            raise result
        return result

    return hook


@pytest.mark.parametrize(
    "user,admins,override,expected",
    [
        ("alice@example.com", [], None, "developer"),
        ("alice@example.com", ["alice@example.com"], None, "admin"),
        ("alice@example.com", ["Alice@Example.com"], None, "developer"),  # exact match only
        ("alice@example.com", [], _override("admin"), "admin"),
        ("alice@example.com", ["alice@example.com"], _override("developer"), "developer"),
        ("alice@example.com", ["alice@example.com"], _override(None), "admin"),
        ("alice@example.com", [], _override("root"), "developer"),  # unknown role: ignored
    ],
)
def test_roles(user: str, admins: list[str], override: Any, expected: str) -> None:
    a = Authenticator(
        make_auth(None, {ALICE_KEY: user}, admins=admins), required=True, role_override=override
    )
    p = run(a.authenticate({"x-api-key": ALICE_KEY}, {}))
    assert isinstance(p, Principal) and p.role == expected


def test_role_store_failure_fails_closed() -> None:
    a = Authenticator(
        make_auth(None, {ALICE_KEY: "alice@example.com"}),
        required=True,
        role_override=_override(RuntimeError("store down")),
    )
    d = run(a.authenticate({"x-api-key": ALICE_KEY}, {}))
    assert isinstance(d, Denial) and (d.status, d.error) == (503, "governance_unavailable")


def test_oidc_and_access_token_users_get_roles(idp: FakeOidcProvider) -> None:
    a = Authenticator(make_auth(idp, admins=["boss@example.com"]), required=True)
    for tok in (idp.id_token("boss@example.com"), idp.access_token("boss@example.com")):
        assert run(a.authenticate(*where("authorization", tok))).role == "admin"
    for tok in (idp.id_token("dev@example.com"), idp.access_token("dev@example.com")):
        assert run(a.authenticate(*where("authorization", tok))).role == "developer"


# -- whose tokens: audiences, shapes, verified emails, domains, saturation --------------------


def test_access_token_for_another_oauth_client_is_401(fresh_idp: FakeOidcProvider) -> None:
    a = Authenticator(make_auth(fresh_idp), required=True)
    other = fresh_idp.access_token("a@x.io", aud="someone-else.apps.googleusercontent.com")
    d = run(a.authenticate(*where("authorization", other)))
    assert isinstance(d, Denial) and d.status == 401
    assert "another OAuth client" in d.message


def test_access_tokens_refused_without_audiences(fresh_idp: FakeOidcProvider) -> None:
    auth = Auth(access_tokens=fresh_idp.access_tokens_config(audiences=[]))
    a = Authenticator(auth, required=True)
    d = run(a.authenticate(*where("authorization", fresh_idp.access_token("a@x.io"))))
    assert isinstance(d, Denial) and d.status == 401
    assert fresh_idp.tokeninfo_fetches == 0


@pytest.mark.parametrize(
    "bearer",
    [
        "sk-proj-" + "A" * 48,  # OpenAI
        "sk-ant-api03-" + "B" * 80,  # Anthropic
        "AIzaSy" + "C" * 33,  # Google API key
        "AKIAIOSFODNN7EXAMPLE",  # AWS access key id
        "cdl_typo_of_a_candela_key",
    ],
)
def test_a_bearer_not_shaped_like_the_issuers_tokens_never_leaves(
    fresh_idp: FakeOidcProvider, bearer: str
) -> None:
    a = Authenticator(make_auth(fresh_idp), required=True)
    d = run(a.authenticate(*where("authorization", bearer)))
    assert isinstance(d, Denial) and d.status == 401
    assert fresh_idp.tokeninfo_fetches == 0 and fresh_idp.certs_fetches == 0


def test_tokeninfo_is_asked_by_post_with_the_token_in_the_body(fresh_idp: FakeOidcProvider) -> None:
    seen: list[tuple[str, bytes | None]] = []
    real = urllib_fetcher(timeout_s=2)

    def spy(url: str, data: bytes | None = None) -> HttpResponse:
        seen.append((url, data))
        return real(url, data)

    a = Authenticator(make_auth(fresh_idp), required=True, http=spy)
    token = fresh_idp.access_token("a@x.io")
    p = run(a.authenticate(*where("authorization", token)))
    assert isinstance(p, Principal) and p.user == "a@x.io"
    assert fresh_idp.tokeninfo_methods == ["POST"]
    [(url, data)] = seen
    assert token not in url and data is not None and token.encode() in data


@pytest.mark.parametrize("verified", [False, None])
def test_id_token_email_must_be_verified(idp: FakeOidcProvider, verified: bool | None) -> None:
    a = Authenticator(make_auth(idp), required=True)
    tok = idp.id_token("a@x.io", extra={"email_verified": verified})  # None: no such claim
    d = run(a.authenticate(*where("authorization", tok)))
    assert isinstance(d, Denial) and d.status == 401
    assert "not verified" in d.message


def test_access_token_email_must_be_verified(fresh_idp: FakeOidcProvider) -> None:
    a = Authenticator(make_auth(fresh_idp), required=True)
    tok = fresh_idp.access_token("a@x.io", email_verified=False)
    d = run(a.authenticate(*where("authorization", tok)))
    assert isinstance(d, Denial) and d.status == 401


@pytest.mark.parametrize(
    "email,hd,ok",
    [
        ("a@example.com", None, True),
        ("a@EXAMPLE.com", None, True),
        ("a@gmail.com", None, False),
        ("svc@project.iam.gserviceaccount.com", None, False),
        ("a@sub.example.com", None, False),
        ("a@contractor.io", "example.com", True),  # a Workspace account of the domain
    ],
)
def test_oidc_allowed_domains(idp: FakeOidcProvider, email: str, hd: str | None, ok: bool) -> None:
    oidc = idp.oidc_config().model_copy(update={"allowed_domains": ["example.com"]})
    a = Authenticator(Auth(oidc=oidc), required=True)
    tok = idp.id_token(email, extra={"hd": hd} if hd else None)
    result = run(a.authenticate(*where("authorization", tok)))
    if ok:
        assert isinstance(result, Principal) and result.user == email
    else:
        assert isinstance(result, Denial) and result.status == 401
        assert "domain" in result.message


def test_saturated_lookups_are_503_not_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from candela_mitm.governance import identity

    monkeypatch.setattr(identity, "MAX_PENDING_LOOKUPS", 3)
    release = threading.Event()
    calls: list[str] = []

    def slow(url: str, data: bytes | None = None) -> HttpResponse:
        calls.append(url)
        release.wait(5)
        return HttpResponse(400, {}, b'{"error": "invalid_token"}')

    auth = Auth(access_tokens=AccessTokens(audiences=["client"]))
    a = Authenticator(auth, required=True, http=slow)

    async def flood() -> list[Any]:
        tasks = [
            asyncio.ensure_future(a.authenticate(*where("authorization", f"ya29.t{i}")))
            for i in range(5)
        ]
        await asyncio.sleep(0.2)
        release.set()
        return await asyncio.gather(*tasks)

    results = run(flood())
    statuses = sorted(r.status for r in results)
    assert statuses == [401, 401, 401, 503, 503]
    assert {r.error for r in results if r.status == 503} == {"governance_unavailable"}
    assert len(calls) == 3


# -- keys minted through the admin API ------------------------------------------------------------

MINTED = "cdk_minted_example_key_0123456789abcdef"


def minted_lookup(
    table: dict[str, str | None], calls: list[str], models: tuple[str, ...] = (),
    budget_usd: float | None = None, lineage: str = "",
) -> Any:
    """The store's view of minted keys: digest -> user (its record as the runtime answers it)."""

    async def lookup(digest: str) -> KeyRecord | None:
        calls.append(digest)
        user = table.get(digest)
        if user == "boom":
            raise RuntimeError("store down")
        if user is None:
            return None
        return KeyRecord("k_0123456789abcdef", digest, user, "", "admin", 0, models=models,
                         budget_usd=budget_usd, lineage=lineage)

    return lookup


@pytest.mark.parametrize("source", ["authorization", "x-api-key", "x-goog-api-key", "query:key"])
def test_minted_key_is_read_from_the_store_on_every_request(source: str) -> None:
    calls: list[str] = []
    a = Authenticator(make_auth(None, {}), required=True,
                      minted_keys=minted_lookup({sha(MINTED): "bob@example.com"}, calls))
    for _ in range(2):
        p = run(a.authenticate(*where(source, MINTED)))
        assert isinstance(p, Principal) and (p.user, p.via) == ("bob@example.com", "api_key")
        assert p.key_id == sha(MINTED)[:8]
    assert calls == [sha(MINTED)] * 2  # never remembered: a revocation holds at once


def test_a_minted_key_carries_its_own_scope() -> None:
    a = Authenticator(make_auth(None, {}), required=True,
                      minted_keys=minted_lookup({sha(MINTED): "bob@example.com"}, [],
                                                models=("gpt-4o-mini", "claude-*")))
    p = run(a.authenticate(*where("authorization", MINTED)))
    assert isinstance(p, Principal)
    # no budget of its own; its budget row would be its own (it is the first of its chain)
    assert p.key_scope == KeyScope(
        "k_0123456789abcdef", ("gpt-4o-mini", "claude-*"), None, "k_0123456789abcdef"
    )
    rotated = Authenticator(make_auth(None, {}), required=True,
                            minted_keys=minted_lookup({sha(MINTED): "bob@example.com"}, [],
                                                      budget_usd=2.5, lineage="k_first"))
    r = run(rotated.authenticate(*where("authorization", MINTED)))
    assert isinstance(r, Principal)
    assert r.key_scope == KeyScope("k_0123456789abcdef", (), 2.5, "k_first")
    static = Authenticator(make_auth(None, {ALICE_KEY: "alice@example.com"}), required=True)
    q = run(static.authenticate(*where("authorization", ALICE_KEY)))
    assert isinstance(q, Principal) and q.key_scope is None  # config keys have no scope


def test_unknown_revoked_or_expired_minted_key_is_401() -> None:
    a = Authenticator(make_auth(None, {}), required=True, minted_keys=minted_lookup({}, []))
    d = run(a.authenticate(*where("authorization", MINTED)))
    assert isinstance(d, Denial) and (d.status, d.error) == (401, "unauthenticated")
    assert "revoked" in d.message


def test_minted_key_lookup_failure_fails_closed() -> None:
    a = Authenticator(make_auth(None, {}), required=True,
                      minted_keys=minted_lookup({sha(MINTED): "boom"}, []))
    d = run(a.authenticate(*where("authorization", MINTED)))
    assert isinstance(d, Denial) and (d.status, d.error) == (503, "governance_unavailable")


def test_only_minted_shaped_keys_cost_a_store_read() -> None:
    calls: list[str] = []
    a = Authenticator(make_auth(None, {ALICE_KEY: "alice@example.com"}), required=True,
                      minted_keys=minted_lookup({}, calls))
    assert isinstance(run(a.authenticate(*where("authorization", ALICE_KEY))), Principal)
    assert isinstance(run(a.authenticate(*where("authorization", "sk-provider-key"))), Denial)
    assert calls == []
