"""Identity: who is calling, from a Candela API key, a Google/OIDC ID token or an OAuth2 access token."""

from __future__ import annotations

import asyncio
import base64
import binascii
import getpass
import hashlib
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import google.auth.transport
from google.auth import exceptions as google_exceptions
from google.oauth2 import id_token as google_id_token

from candela_mitm.config import Auth
from candela_mitm.errors import Denial, governance_unavailable, unauthenticated
from candela_mitm.state.ports import KeyRecord

log = logging.getLogger(__name__)

Role = Literal["admin", "tenant_admin", "developer"]
Via = Literal["api_key", "oidc", "access_token", "local", "workload"]

# Credential sources, in precedence order (001: X-Candela-Auth over Authorization; the SDK
# key headers and ?key= carry Candela API keys for clients that cannot send a bearer token).
SOURCE_X_CANDELA_AUTH = "x-candela-auth"
SOURCE_AUTHORIZATION = "authorization"
SOURCE_X_API_KEY = "x-api-key"
SOURCE_X_GOOG_API_KEY = "x-goog-api-key"
SOURCE_QUERY_KEY = "query:key"
BEARER_SOURCES = (SOURCE_X_CANDELA_AUTH, SOURCE_AUTHORIZATION)
KEY_SOURCES = (SOURCE_X_API_KEY, SOURCE_X_GOOG_API_KEY, SOURCE_QUERY_KEY)
SOURCES = BEARER_SOURCES + KEY_SOURCES

# Real credentials are far smaller (Google ID tokens ~1 KB); anything longer is refused before
# any regex, base64 or JSON work so a hostile header cannot buy CPU time.
MAX_TOKEN_CHARS = 8192
# RFC 6750 b64token: every real key and token fits; spaces, quotes, NUL, CR/LF, non-ASCII do not.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_BEARER = re.compile(r"(?i:bearer) ([A-Za-z0-9\-._~+/]+=*)")
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Keys minted through the admin API (POST /admin/v1/keys) start with this; only they are looked
# up in the state store, so a provider key or an ID token never costs a store read.
MINTED_KEY_PREFIX = "cdk_"

# The minted key with this digest while it is valid, or None (unknown, revoked, expired); raises
# when the store cannot say (the request is then refused 503).
MintedKeyLookup = Callable[[str], Awaitable[KeyRecord | None]]

# Google signs ID tokens with RS256; every other alg (none, HS256 alg confusion) is refused
# before google-auth sees the token.
ID_TOKEN_ALGORITHMS = frozenset({"RS256"})
CLOCK_SKEW_S = 10
DEFAULT_CERTS_TTL_S = 300.0  # when the certs endpoint sends no max-age
CERTS_MIN_REFRESH_S = 60.0  # an unknown kid refetches at most this often (rotation, not DoS)
NEGATIVE_TTL_S = 10.0  # a rejected access token is asked about again after this
MAX_CACHE_ENTRIES = 10_000
MAX_CONCURRENT_LOOKUPS = 8  # outbound tokeninfo/certs lookups at once; the rest wait
# Lookups running or waiting at once; past it a request is answered 503 at once instead of
# queueing without limit behind an identity provider that is slow or under a token flood.
MAX_PENDING_LOOKUPS = 256
FETCH_TIMEOUT_S = 5.0
MAX_RESPONSE_BYTES = 1 << 20


@dataclass(frozen=True)
class KeyScope:
    """What a key minted through the admin API narrows its user to."""

    key_id: str  # its public name (k_...)
    models: tuple[str, ...] = ()  # model names or patterns; (): whatever the user may use
    budget_usd: float | None = None  # a part of the user's budget; None: the user's
    budget_id: str = ""  # the key's budget row (its lineage: shared across rotations)


@dataclass(frozen=True)
class Principal:
    user: str
    role: Role
    via: Via
    key_id: str | None  # sha256(credential)[:8]: the only trace of a credential ever logged
    proxy_identity: str | None = None  # the IAP-verified identity from Proxy-Authorization
    key_scope: KeyScope | None = None  # a minted key's own limits


class MalformedCredential(ValueError):
    """A credential header or parameter is present but not a well-formed token (answered 401)."""

    def __init__(self, source: str) -> None:
        super().__init__(f"malformed credential in {source}")
        self.source = source


def key_id(token: str) -> str:
    """The loggable fingerprint of a credential: the first 8 hex chars of its sha256."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        k = name.lower()
        if k in lowered and lowered[k] != value:
            # Two spellings with different values: ambiguous, so refuse rather than pick one.
            lowered[k] = "\x00conflict"
        else:
            lowered[k] = value
    return lowered


def _token_of(source: str, value: str, bearer: bool) -> str:
    if len(value) > MAX_TOKEN_CHARS + len("Bearer "):
        raise MalformedCredential(source)
    m = (_BEARER if bearer else _TOKEN).fullmatch(value)
    if m is None:
        raise MalformedCredential(source)
    return m.group(1) if bearer else m.group(0)


def extract_credential(
    headers: Mapping[str, str], query: Mapping[str, str]
) -> tuple[str, str] | None:
    """The caller's credential as (source, token), by 001's precedence; None when there is none.

    The first source present wins even if malformed (no fallback to a weaker source): a
    malformed one raises MalformedCredential. Proxy-Authorization is not a user credential.
    """
    h = _lower_keys(headers)
    for source in BEARER_SOURCES:
        if source in h:
            return source, _token_of(source, h[source], bearer=True)
    for source in (SOURCE_X_API_KEY, SOURCE_X_GOOG_API_KEY):
        if source in h:
            return source, _token_of(source, h[source], bearer=False)
    if "key" in query:
        return SOURCE_QUERY_KEY, _token_of(SOURCE_QUERY_KEY, query["key"], bearer=False)
    return None


def extract_proxy_credential(headers: Mapping[str, str]) -> str | None:
    """The IAP token from `Proxy-Authorization: Bearer ...`; MalformedCredential if malformed."""
    h = _lower_keys(headers)
    if "proxy-authorization" not in h:
        return None
    return _token_of("proxy-authorization", h["proxy-authorization"], bearer=True)


class _Invalid(Exception):
    """The credential was checked and is not acceptable; the message is safe to show."""


class _Unverifiable(Exception):
    """The credential could not be checked now (identity provider unreachable or broken)."""


class _Saturated(Exception):
    """Too many identity lookups are running or waiting: answered 503, never queued."""


# -- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Fetcher(Protocol):
    """A blocking GET of an absolute URL, or a form POST when `data` is given; always called off
    the event loop. Raises OSError when the server cannot be reached. It must not log what it
    sends: tokeninfo requests carry the token."""

    def __call__(self, url: str, data: bytes | None = None) -> HttpResponse: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is an answer, not somewhere a token should be sent next


def urllib_fetcher(
    timeout_s: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_RESPONSE_BYTES
) -> Fetcher:
    """The default fetcher: urllib (honours HTTPS_PROXY/NO_PROXY, never logs URLs), no redirects."""
    opener = urllib.request.build_opener(_NoRedirect)

    def fetch(url: str, data: bytes | None = None) -> HttpResponse:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if data is not None else {}
        req = urllib.request.Request(url, data=data, headers=headers)
        try:
            with opener.open(req, timeout=timeout_s) as resp:
                return HttpResponse(resp.status, dict(resp.headers.items()), resp.read(max_bytes))
        except urllib.error.HTTPError as e:
            with e:
                return HttpResponse(e.code, dict(e.headers.items()), e.read(max_bytes))

    return fetch


def _max_age(headers: Mapping[str, str]) -> float | None:
    cc = next((v for k, v in headers.items() if k.lower() == "cache-control"), None)
    if cc is None:
        return None
    directives = [d.strip().lower() for d in cc.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for d in directives:
        if d.startswith("max-age="):
            try:
                return max(0.0, float(int(d[len("max-age=") :])))
            except ValueError:
                return None
    return None


class _Response(google.auth.transport.Response):
    def __init__(self, r: HttpResponse) -> None:
        self._r = r

    @property
    def status(self) -> int:
        return self._r.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._r.headers

    @property
    def data(self) -> bytes:
        return self._r.body


class _Pinned(google.auth.transport.Request):
    """The transport handed to verify_token: answers with the certs snapshot already in hand,
    so one verification reads the cache once and never fetches by itself."""

    def __init__(self, url: str, response: HttpResponse) -> None:
        self._url = url
        self._response = response

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> _Response:
        if url != self._url or method != "GET":
            raise google_exceptions.TransportError("only the configured certs URL is read")
        return _Response(self._response)


class _CertsCache:
    """The certs document, kept for its Cache-Control max-age; one fetch at a time (threads
    wait on the lock instead of all fetching)."""

    def __init__(self, url: str, fetch: Fetcher, clock: Callable[[], float]) -> None:
        self.url = url
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._response: HttpResponse | None = None
        self._key_ids: frozenset[str] = frozenset()
        self._fetched_at = 0.0
        self._expires_at = 0.0

    def get(self) -> tuple[HttpResponse, frozenset[str]]:
        """The current document and its key ids; raises _Unverifiable if it cannot be had."""
        with self._lock:
            now = self._clock()
            if self._response is None or now >= self._expires_at:
                try:
                    r = self._fetch(self.url)
                except Exception:  # refused, timed out, truncated: all mean "cannot check now"
                    raise _Unverifiable("the identity provider's keys cannot be fetched") from None
                try:
                    doc = json.loads(r.body) if r.status == 200 else None
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    # Not cached: the next request tries again.
                    raise _Unverifiable("the identity provider's keys cannot be fetched")
                ttl = _max_age(r.headers)
                self._response = r
                self._key_ids = frozenset(doc)
                self._fetched_at = now
                self._expires_at = now + (DEFAULT_CERTS_TTL_S if ttl is None else ttl)
            return self._response, self._key_ids

    def refresh_if_older_than(self, seconds: float) -> None:
        with self._lock:
            if self._response is not None and self._clock() - self._fetched_at >= seconds:
                self._expires_at = 0.0


# -- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verified:
    user: str
    expires_at: float


def _b64url_json(segment: str) -> Any:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return json.loads(raw)


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _role(value: str | None) -> Role | None:
    return cast(Role, value) if value in ("admin", "tenant_admin", "developer") else None


class _BoundedCache:
    """digest -> (expires_at, value); oldest entries go first when full."""

    def __init__(self, clock: Callable[[], float], max_entries: int = MAX_CACHE_ENTRIES) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: dict[str, tuple[float, _Verified | None]] = {}

    def get(self, digest: str) -> tuple[bool, _Verified | None]:
        hit = self._entries.get(digest)
        if hit is None:
            return False, None
        if self._clock() >= hit[0]:
            del self._entries[digest]
            return False, None
        return True, hit[1]

    def put(self, digest: str, expires_at: float, value: _Verified | None) -> None:
        if expires_at <= self._clock():
            return
        self._entries.pop(digest, None)
        if len(self._entries) >= self._max:
            now = self._clock()
            for d in [d for d, (exp, _) in self._entries.items() if exp <= now]:
                del self._entries[d]
            while len(self._entries) >= self._max:
                del self._entries[next(iter(self._entries))]
        self._entries[digest] = (expires_at, value)


class Authenticator:
    """Turns a request's headers and query into a Principal, or a 401 Denial."""

    def __init__(
        self,
        auth: Auth,
        required: bool,
        local_user: str | None = None,
        http: Fetcher | None = None,
        role_override: Callable[[str], str | None] | None = None,
        clock: Callable[[], float] = time.time,
        minted_keys: MintedKeyLookup | None = None,
    ) -> None:
        self._auth = auth
        self._minted_keys = minted_keys
        self.required = required
        self._fetch = http or urllib_fetcher()
        self._role_override = role_override
        self._clock = clock
        self._local_user = local_user or _os_user()
        self._admins = frozenset(auth.admins)
        self._api_keys: dict[str, str] = {}
        for k in auth.api_keys:
            self._api_keys[k.sha256] = k.user
        self._certs = (
            _CertsCache(auth.oidc.certs_url, self._fetch, clock) if auth.oidc is not None else None
        )
        self._id_tokens = _BoundedCache(clock)
        self._access_tokens = _BoundedCache(clock)
        self._inflight: dict[str, asyncio.Future[_Verified]] = {}
        self._lookups: asyncio.Semaphore | None = None
        self._pending = 0  # lookups running or waiting for the semaphore
        tokens = auth.access_tokens
        self._token_prefixes = tuple(tokens.token_prefixes) if tokens is not None else ()

    # API keys may be added and revoked at run time (admin API); only digests are held.
    def add_api_key(self, sha256: str, user: str) -> None:
        if not _SHA256_HEX.fullmatch(sha256):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        self._api_keys[sha256] = user

    def remove_api_key(self, sha256: str) -> bool:
        return self._api_keys.pop(sha256, None) is not None

    async def authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> Principal | Denial:
        try:
            return await self._authenticate(headers, query)
        except Exception as e:  # an auth hook must deny, never raise (mitmproxy would forward)
            # Only the type: messages from token parsers can quote the token.
            log.warning("authentication failed unexpectedly: %s", type(e).__name__)
            return unauthenticated("The credential could not be verified")

    async def _authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> Principal | Denial:
        try:
            proxy_token = extract_proxy_credential(headers)
            cred = extract_credential(headers, query)
        except MalformedCredential as e:
            log.info("401: malformed credential in %s", e.source)
            return unauthenticated(f"The credential in {_display(e.source)} is malformed")

        proxy_identity: str | None = None
        if proxy_token is not None:
            try:
                proxy_identity = (await self._verify_id_token(proxy_token)).user
            except _Saturated:
                return governance_unavailable("too many identity checks are in progress")
            except (_Invalid, _Unverifiable) as e:
                log.info("401: Proxy-Authorization key_id=%s: %s", key_id(proxy_token), e)
                return unauthenticated(f"The Proxy-Authorization token is not accepted: {e}")

        if cred is None:
            if self.required:
                return unauthenticated(
                    "A credential is required: send Authorization: Bearer <token>"
                )
            return self._principal(self._local_user, "local", None, proxy_identity)

        source, token = cred
        kid = key_id(token)
        user = self._match_api_key(token)
        if user is not None:
            return self._principal(user, "api_key", kid, proxy_identity)
        if self._minted_keys is not None and token.startswith(MINTED_KEY_PREFIX):
            # read from the store on every request: a revoked key is refused at once in every
            # process sharing it (no process may remember a key as valid)
            try:
                record = await self._minted_keys(hashlib.sha256(token.encode()).hexdigest())
            except Exception as e:
                log.warning("API key lookup failed: %s", type(e).__name__)
                return governance_unavailable("the key store cannot be read")
            if record is None:
                log.info("401: %s key_id=%s: unknown, revoked or expired key", source, kid)
                return unauthenticated(
                    f"The credential in {_display(source)} is not accepted: "
                    "the key is unknown, revoked or expired"
                )
            scope = KeyScope(record.key_id, record.models, record.budget_usd, record.budget_id)
            return self._principal(record.user_id, "api_key", kid, proxy_identity, scope)
        try:
            if source in KEY_SOURCES:
                raise _Invalid("it is not a known Candela API key")
            if self._auth.oidc is None and self._auth.access_tokens is None:
                raise _Invalid("it is not a known Candela API key")
            if _JWT.fullmatch(token):
                verified = await self._verify_id_token(token)
                via: Via = "oidc"
            elif token.startswith(self._token_prefixes) and self._token_prefixes:
                verified = await self._verify_access_token(token)
                via = "access_token"
            else:
                # Not the issuer's shape (a provider key, a typo'd Candela key): never sent out.
                raise _Invalid("it is not a known Candela API key")
        except _Saturated:
            log.warning("503: identity lookups saturated (%d pending)", self._pending)
            return governance_unavailable("too many identity checks are in progress")
        except (_Invalid, _Unverifiable) as e:
            log.info("401: %s key_id=%s: %s", source, kid, e)
            return unauthenticated(f"The credential in {_display(source)} is not accepted: {e}")
        return self._principal(verified.user, via, kid, proxy_identity)

    def _principal(
        self,
        user: str,
        via: Via,
        kid: str | None,
        proxy_identity: str | None,
        key_scope: KeyScope | None = None,
    ) -> Principal | Denial:
        role: Role | None = None
        if self._role_override is not None:
            try:
                role = _role(self._role_override(user))
            except Exception as e:  # the user store is down: fail closed
                log.warning("role lookup failed: %s", type(e).__name__)
                return governance_unavailable("the user store cannot be read")
        if role is None:
            role = "admin" if user in self._admins else "developer"
        return Principal(user, role, via, kid, proxy_identity, key_scope)

    def _match_api_key(self, token: str) -> str | None:
        # Looked up by its SHA-256: one dict probe whatever the number of keys (comparing every
        # stored digest cost 64 compare_digest calls per request with 64 users, and would cost
        # 10,000 with 10,000). The probe's timing can only tell about digests, and learning a
        # stored digest, even whole, does not give the key it was made from.
        return self._api_keys.get(hashlib.sha256(token.encode()).hexdigest())

    # -- OIDC ID tokens --

    async def _verify_id_token(self, token: str) -> _Verified:
        oidc = self._auth.oidc
        if oidc is None or self._certs is None:
            raise _Invalid("ID tokens are not accepted here")
        if not oidc.audiences:
            # Never let an empty list become audience=None: verify_token then skips the check
            # and a token minted for any other service would pass.
            raise _Invalid("ID tokens are not accepted here (no audience configured)")
        if not _JWT.fullmatch(token):
            raise _Invalid("it is not an ID token")
        try:
            header = _b64url_json(token.split(".", 1)[0])
        except (binascii.Error, ValueError, RecursionError):  # RecursionError: [[[[... headers
            raise _Invalid("the ID token is malformed") from None
        if not isinstance(header, dict) or header.get("alg") not in ID_TOKEN_ALGORITHMS:
            raise _Invalid("the ID token's algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Invalid("the ID token is malformed")

        digest = hashlib.sha256(token.encode()).hexdigest()
        hit, cached = self._id_tokens.get(digest)
        if hit and cached is not None:
            return cached
        claims = await self._bounded(lambda: self._verify_id_token_blocking(token, kid))
        verified = self._id_claims(claims, oidc.issuers)
        self._id_tokens.put(digest, verified.expires_at, verified)
        return verified

    def _verify_id_token_blocking(self, token: str, kid: str | None) -> Mapping[str, Any]:
        assert self._certs is not None and self._auth.oidc is not None
        certs, key_ids = self._certs.get()
        if kid is not None and kid not in key_ids:
            # Possibly a newly rotated key: refetch, but not more than once a minute.
            self._certs.refresh_if_older_than(CERTS_MIN_REFRESH_S)
            certs, key_ids = self._certs.get()
        try:
            return google_id_token.verify_token(
                token,
                _Pinned(self._certs.url, certs),
                audience=list(self._auth.oidc.audiences),
                certs_url=self._certs.url,
                clock_skew_in_seconds=CLOCK_SKEW_S,
            )
        except Exception:
            # Signature, expiry, audience, base64, JSON, claim types: google-auth's messages
            # quote the token, so they are dropped.
            raise _Invalid("the ID token is invalid, expired or for another audience") from None

    def _id_claims(self, claims: Mapping[str, Any], issuers: list[str]) -> _Verified:
        if claims.get("iss") not in issuers:
            raise _Invalid("the ID token's issuer is not trusted")
        email = claims.get("email")
        if not isinstance(email, str) or not email:
            raise _Invalid("the ID token carries no email")
        if not _is_true(claims.get("email_verified")):
            raise _Invalid("the ID token's email is not verified")
        domains = self._auth.oidc.allowed_domains if self._auth.oidc is not None else []
        if domains and not _in_domains(email, claims.get("hd"), domains):
            raise _Invalid("the ID token's domain is not accepted here")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise _Invalid("the ID token has no expiry")
        return _Verified(email, float(exp))

    # -- OAuth2 access tokens --

    async def _verify_access_token(self, token: str) -> _Verified:
        if self._auth.access_tokens is None:
            raise _Invalid("access tokens are not accepted here")
        if not self._auth.access_tokens.audiences:
            # Without a client id to check, a token any OAuth client obtained would pass.
            raise _Invalid("access tokens are not accepted here (no audience configured)")
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit, cached = self._access_tokens.get(digest)
        if hit:
            if cached is None:
                raise _Invalid("the access token is invalid or expired")
            return cached
        # Concurrent requests with one token share a single tokeninfo call.
        fut = self._inflight.get(digest)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup_access_token(token, digest))
            self._inflight[digest] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(digest, None))
        return await asyncio.shield(fut)

    async def _lookup_access_token(self, token: str, digest: str) -> _Verified:
        assert self._auth.access_tokens is not None
        url = self._auth.access_tokens.tokeninfo_url
        # POSTed, not in the URL: URLs end up in access logs on the way.
        form = urllib.parse.urlencode({"access_token": token}).encode()
        try:
            r = await self._bounded(lambda: self._fetch(url, form))
        except _Saturated:
            raise
        except Exception:  # refused, timed out, truncated: all mean "cannot check now"
            raise _Unverifiable("the token service cannot be reached") from None
        if r.status != 200:
            if 400 <= r.status < 500:
                self._access_tokens.put(digest, self._clock() + NEGATIVE_TTL_S, None)
                raise _Invalid("the access token is invalid or expired")
            raise _Unverifiable("the token service failed")
        try:
            verified = self._tokeninfo_claims(json.loads(r.body))
        except _Invalid:
            self._access_tokens.put(digest, self._clock() + NEGATIVE_TTL_S, None)
            raise
        except ValueError:
            raise _Unverifiable("the token service answered garbage") from None
        self._access_tokens.put(digest, verified.expires_at, verified)
        return verified

    def _tokeninfo_claims(self, info: Any) -> _Verified:
        if not isinstance(info, dict):
            raise ValueError("tokeninfo is not an object")
        now = self._clock()
        deadlines = []
        for field, base in (("exp", 0.0), ("expires_in", now)):
            if field in info:
                try:
                    deadlines.append(base + float(int(info[field])))
                except (TypeError, ValueError):
                    raise _Invalid("the access token has no valid expiry") from None
        if not deadlines:
            raise _Invalid("the access token has no expiry")
        expires_at = min(deadlines)
        if expires_at <= now:
            raise _Invalid("the access token is invalid or expired")
        assert self._auth.access_tokens is not None
        audiences = self._auth.access_tokens.audiences
        if info.get("aud") not in audiences and info.get("azp") not in audiences:
            raise _Invalid("the access token was issued to another OAuth client")
        email = info.get("email")
        if not isinstance(email, str) or not email:
            raise _Invalid("the access token carries no email (needs the email scope)")
        if not _is_true(info.get("email_verified")):
            raise _Invalid("the access token's email is not verified")
        return _Verified(email, expires_at)

    async def _bounded(self, work: Callable[[], Any]) -> Any:
        # Created lazily so the semaphore belongs to the loop that runs the hooks.
        if self._lookups is None:
            self._lookups = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)
        if self._pending >= MAX_PENDING_LOOKUPS:
            raise _Saturated()
        self._pending += 1
        try:
            async with self._lookups:
                return await asyncio.to_thread(work)
        finally:
            self._pending -= 1


def _in_domains(email: str, hd: Any, domains: list[str]) -> bool:
    """The email's domain, or the Workspace domain (`hd`) the token names, is one of `domains`."""
    wanted = {d.lower() for d in domains}
    domain = email.rpartition("@")[2].lower()
    return domain in wanted or (isinstance(hd, str) and hd.lower() in wanted)


def _display(source: str) -> str:
    return {
        SOURCE_X_CANDELA_AUTH: "X-Candela-Auth",
        SOURCE_AUTHORIZATION: "Authorization",
        SOURCE_X_API_KEY: "x-api-key",
        SOURCE_X_GOOG_API_KEY: "x-goog-api-key",
        SOURCE_QUERY_KEY: "the key query parameter",
        "proxy-authorization": "Proxy-Authorization",
    }.get(source, source)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        return "local"
