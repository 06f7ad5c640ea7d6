"""Identity provider tokens: Google ID tokens (OIDC, verified against the provider's certs) and
OAuth2 access tokens (tokeninfo), each asked about once while valid, the lookups bounded."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import google.auth.transport
from google.auth import exceptions as google_exceptions
from google.oauth2 import id_token as google_id_token

from candela_mitm.config import Auth

# An ID token's shape (a JWT: three base64url segments); other bearers never reach the network
JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

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


class Invalid(Exception):
    """The credential was checked and is not acceptable; the message is safe to show."""


class Unverifiable(Exception):
    """The credential could not be checked now (identity provider unreachable or broken)."""


class Saturated(Exception):
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


class CertsCache:
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
        """The current document and its key ids; raises Unverifiable if it cannot be had."""
        with self._lock:
            now = self._clock()
            if self._response is None or now >= self._expires_at:
                try:
                    r = self._fetch(self.url)
                except Exception:  # refused, timed out, truncated: all mean "cannot check now"
                    raise Unverifiable("the identity provider's keys cannot be fetched") from None
                try:
                    doc = json.loads(r.body) if r.status == 200 else None
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    # Not cached: the next request tries again.
                    raise Unverifiable("the identity provider's keys cannot be fetched")
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
class Verified:
    user: str
    expires_at: float


def _b64url_json(segment: str) -> Any:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return json.loads(raw)


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


class BoundedCache:
    """digest -> (expires_at, value); oldest entries go first when full."""

    def __init__(self, clock: Callable[[], float], max_entries: int = MAX_CACHE_ENTRIES) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: dict[str, tuple[float, Verified | None]] = {}

    def get(self, digest: str) -> tuple[bool, Verified | None]:
        hit = self._entries.get(digest)
        if hit is None:
            return False, None
        if self._clock() >= hit[0]:
            del self._entries[digest]
            return False, None
        return True, hit[1]

    def put(self, digest: str, expires_at: float, value: Verified | None) -> None:
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


def _in_domains(email: str, hd: Any, domains: list[str]) -> bool:
    """The email's domain, or the Workspace domain (`hd`) the token names, is one of `domains`."""
    wanted = {d.lower() for d in domains}
    domain = email.rpartition("@")[2].lower()
    return domain in wanted or (isinstance(hd, str) and hd.lower() in wanted)


class TokenVerifier:
    """Who an ID token or an access token says the caller is, asked of the identity provider at
    most once per token while it is valid, with the lookups bounded."""

    def __init__(self, auth: Auth, fetch: Fetcher, clock: Callable[[], float]) -> None:
        self._auth = auth
        self._fetch = fetch
        self._clock = clock
        self._certs = (
            CertsCache(auth.oidc.certs_url, fetch, clock) if auth.oidc is not None else None
        )
        self._id_tokens = BoundedCache(clock)
        self._access_tokens = BoundedCache(clock)
        self._inflight: dict[str, asyncio.Future[Verified]] = {}
        self._lookups: asyncio.Semaphore | None = None
        self._pending = 0  # lookups running or waiting for the semaphore

    @property
    def pending(self) -> int:
        return self._pending

    # -- OIDC ID tokens --

    async def verify_id_token(self, token: str) -> Verified:
        oidc = self._auth.oidc
        if oidc is None or self._certs is None:
            raise Invalid("ID tokens are not accepted here")
        if not oidc.audiences:
            # Never let an empty list become audience=None: verify_token then skips the check
            # and a token minted for any other service would pass.
            raise Invalid("ID tokens are not accepted here (no audience configured)")
        if not JWT.fullmatch(token):
            raise Invalid("it is not an ID token")
        try:
            header = _b64url_json(token.split(".", 1)[0])
        except (binascii.Error, ValueError, RecursionError):  # RecursionError: [[[[... headers
            raise Invalid("the ID token is malformed") from None
        if not isinstance(header, dict) or header.get("alg") not in ID_TOKEN_ALGORITHMS:
            raise Invalid("the ID token's algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Invalid("the ID token is malformed")

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
            raise Invalid("the ID token is invalid, expired or for another audience") from None

    def _id_claims(self, claims: Mapping[str, Any], issuers: list[str]) -> Verified:
        if claims.get("iss") not in issuers:
            raise Invalid("the ID token's issuer is not trusted")
        email = claims.get("email")
        if not isinstance(email, str) or not email:
            raise Invalid("the ID token carries no email")
        if not _is_true(claims.get("email_verified")):
            raise Invalid("the ID token's email is not verified")
        domains = self._auth.oidc.allowed_domains if self._auth.oidc is not None else []
        if domains and not _in_domains(email, claims.get("hd"), domains):
            raise Invalid("the ID token's domain is not accepted here")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise Invalid("the ID token has no expiry")
        return Verified(email, float(exp))

    # -- OAuth2 access tokens --

    async def verify_access_token(self, token: str) -> Verified:
        if self._auth.access_tokens is None:
            raise Invalid("access tokens are not accepted here")
        if not self._auth.access_tokens.audiences:
            # Without a client id to check, a token any OAuth client obtained would pass.
            raise Invalid("access tokens are not accepted here (no audience configured)")
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit, cached = self._access_tokens.get(digest)
        if hit:
            if cached is None:
                raise Invalid("the access token is invalid or expired")
            return cached
        # Concurrent requests with one token share a single tokeninfo call.
        fut = self._inflight.get(digest)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup_access_token(token, digest))
            self._inflight[digest] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(digest, None))
        return await asyncio.shield(fut)

    async def _lookup_access_token(self, token: str, digest: str) -> Verified:
        assert self._auth.access_tokens is not None
        url = self._auth.access_tokens.tokeninfo_url
        # POSTed, not in the URL: URLs end up in access logs on the way.
        form = urllib.parse.urlencode({"access_token": token}).encode()
        try:
            r = await self._bounded(lambda: self._fetch(url, form))
        except Saturated:
            raise
        except Exception:  # refused, timed out, truncated: all mean "cannot check now"
            raise Unverifiable("the token service cannot be reached") from None
        if r.status != 200:
            if 400 <= r.status < 500:
                self._access_tokens.put(digest, self._clock() + NEGATIVE_TTL_S, None)
                raise Invalid("the access token is invalid or expired")
            raise Unverifiable("the token service failed")
        try:
            verified = self._tokeninfo_claims(json.loads(r.body))
        except Invalid:
            self._access_tokens.put(digest, self._clock() + NEGATIVE_TTL_S, None)
            raise
        except ValueError:
            raise Unverifiable("the token service answered garbage") from None
        self._access_tokens.put(digest, verified.expires_at, verified)
        return verified

    def _tokeninfo_claims(self, info: Any) -> Verified:
        if not isinstance(info, dict):
            raise ValueError("tokeninfo is not an object")
        now = self._clock()
        deadlines = []
        for field, base in (("exp", 0.0), ("expires_in", now)):
            if field in info:
                try:
                    deadlines.append(base + float(int(info[field])))
                except (TypeError, ValueError):
                    raise Invalid("the access token has no valid expiry") from None
        if not deadlines:
            raise Invalid("the access token has no expiry")
        expires_at = min(deadlines)
        if expires_at <= now:
            raise Invalid("the access token is invalid or expired")
        assert self._auth.access_tokens is not None
        audiences = self._auth.access_tokens.audiences
        if info.get("aud") not in audiences and info.get("azp") not in audiences:
            raise Invalid("the access token was issued to another OAuth client")
        email = info.get("email")
        if not isinstance(email, str) or not email:
            raise Invalid("the access token carries no email (needs the email scope)")
        if not _is_true(info.get("email_verified")):
            raise Invalid("the access token's email is not verified")
        return Verified(email, expires_at)

    async def _bounded(self, work: Callable[[], Any]) -> Any:
        # Created lazily so the semaphore belongs to the loop that runs the hooks.
        if self._lookups is None:
            self._lookups = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)
        if self._pending >= MAX_PENDING_LOOKUPS:
            raise Saturated()
        self._pending += 1
        try:
            async with self._lookups:
                return await asyncio.to_thread(work)
        finally:
            self._pending -= 1
