"""Identity: each credential kind, hostile input, configuration limits, local mode, roles, minted
keys."""

from __future__ import annotations

import getpass
import itertools
import logging
from collections.abc import Callable
from typing import Any

import pytest

from candela_mitm.config import AccessTokens, Auth, Oidc
from candela_mitm.errors import Denial
from candela_mitm.governance.credentials import SOURCES
from candela_mitm.governance.identity import Authenticator, KeyScope, Principal
from candela_mitm.governance.tokens import HttpResponse
from candela_mitm.state.ports import KeyRecord
from tests.core.governance.identity_support import ALICE_KEY, ALICE_SHA, make_auth, run, sha, where
from tests.fakes.oidc import FakeOidcProvider, b64url

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
