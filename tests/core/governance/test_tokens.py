"""Identity provider tokens (governance/tokens.py): caching, an unreachable provider, audiences,
verified emails, domains, saturation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from candela_mitm.config import AccessTokens, Auth
from candela_mitm.errors import Denial
from candela_mitm.governance.identity import Authenticator, Principal
from candela_mitm.governance.tokens import (
    CERTS_MIN_REFRESH_S,
    DEFAULT_CERTS_TTL_S,
    NEGATIVE_TTL_S,
    HttpResponse,
    urllib_fetcher,
)
from tests.core.governance.identity_support import Clock, make_auth, run, where
from tests.fakes.oidc import FakeOidcProvider

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

    from candela_mitm.governance import tokens

    monkeypatch.setattr(tokens, "MAX_PENDING_LOOKUPS", 3)
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


