"""Upstream credentials: the provider credential Candela sets on each request it forwards."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Callable, Mapping
from typing import Any

import botocore.credentials
import botocore.session
import google.auth
import google.auth.transport.requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest

from candela_mitm.errors import CandelaError
from candela_mitm.providers.specs import Upstream

GOOGLE_SCOPES: tuple[str, ...] = ("https://www.googleapis.com/auth/cloud-platform",)
# A token is replaced this long before it expires, so that a request forwarded with it does not
# expire in flight (a long streamed response can hold it for minutes).
GOOGLE_REFRESH_MARGIN = dt.timedelta(minutes=5)

# Client headers that carry a credential, lower-case. The client's credential is for Candela (or
# for a provider account that is not ours); none of it may reach a provider. The x-amz-* names
# are the ones SigV4 itself sets, so a client's stale signature never travels beside ours.
STRIP_HEADERS: tuple[str, ...] = (
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-goog-iam-authorization-token",
    "x-goog-iam-authority-selector",
    "x-candela-auth",
    "x-candela-tenant-id",
    "x-amz-security-token",
    "x-amz-date",
    "x-amz-content-sha256",
    "cookie",
)

# The headers SigV4 signing sets; a client's values for them are never signed or forwarded.
_SIGV4_OWN = frozenset(
    {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)


class CredentialsUnavailable(CandelaError):
    """No usable provider credential; the message names what is missing, never a secret value."""


def header_names_to_strip() -> tuple[str, ...]:
    """Client credential headers (lower-case) to remove before a request is forwarded."""
    return STRIP_HEADERS


def _describe(exc: BaseException) -> str:
    # Only the exception's type and leading message: google-auth and botocore keep response
    # bodies in later args, and a token endpoint's body can hold a token.
    first = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
    first = " ".join(first.split())[:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _utcnow() -> dt.datetime:
    # Naive UTC, the form google-auth keeps `Credentials.expiry` in.
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class GoogleTokenSource:
    """Google Application Default Credentials as an access token, refreshed off the event loop.

    Concurrent callers share one refresh; the token is reused until GOOGLE_REFRESH_MARGIN before
    it expires. ADC is looked up (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata server) on
    the first refresh, not at construction, so a deployment without Google routes never needs it.
    """

    def __init__(
        self,
        scopes: tuple[str, ...] = GOOGLE_SCOPES,
        *,
        margin: dt.timedelta = GOOGLE_REFRESH_MARGIN,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._scopes = scopes
        self._margin = margin
        self._clock = clock  # naive UTC, like google-auth's expiry
        self._credentials: Any = None
        self._token: str | None = None
        self._expiry: dt.datetime | None = None
        self._inflight: asyncio.Task[str] | None = None

    def _fresh(self) -> bool:
        if self._token is None:
            return False
        # No expiry from the credential means it does not expire (google-auth's convention).
        return self._expiry is None or self._clock() < self._expiry - self._margin

    async def token(self) -> str:
        """An access token valid for at least the refresh margin; raises CredentialsUnavailable."""
        token = self._token
        if token is not None and self._fresh():
            return token
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh())
            self._inflight.add_done_callback(_consume_exception)
        # Shielded: one caller giving up (client disconnect) must not cancel everyone's refresh.
        return await asyncio.shield(self._inflight)

    def invalidate(self) -> None:
        """Forget the cached token (say, after a provider answered 401 to it)."""
        self._token = None
        self._expiry = None

    async def _refresh(self) -> str:
        try:
            token, expiry = await asyncio.to_thread(self._refresh_blocking)
            self._token, self._expiry = token, expiry
            return token
        finally:
            self._inflight = None

    def _refresh_blocking(self) -> tuple[str, dt.datetime | None]:
        try:
            if self._credentials is None:
                self._credentials, _project = google.auth.default(scopes=list(self._scopes))
            self._credentials.refresh(google.auth.transport.requests.Request())
        except Exception as exc:
            # `from None`: the cause's args can hold the token endpoint's response.
            raise CredentialsUnavailable(
                f"Google Application Default Credentials failed ({_describe(exc)})"
            ) from None
        token = self._credentials.token
        if not isinstance(token, str) or not token:
            raise CredentialsUnavailable("Google Application Default Credentials gave no token")
        return token, self._credentials.expiry


def _consume_exception(task: asyncio.Task[Any]) -> None:
    # Mark the exception retrieved: if every waiter was cancelled nobody else will.
    if not task.cancelled():
        task.exception()


class AwsCredentialSource:
    """AWS credentials from the standard chain, resolved once off the event loop.

    `env` is consulted first for AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN;
    without them botocore's chain runs (its own environment, shared files, SSO, container and
    instance metadata). Refreshable credentials (assume-role, SSO, IMDS) are refreshed in a
    worker thread when botocore says a refresh is due, and read inline otherwise.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        credentials: botocore.credentials.Credentials | None = None,
    ) -> None:
        self._env = os.environ if env is None else env
        self._credentials = credentials
        self._resolving: asyncio.Task[botocore.credentials.Credentials] | None = None

    async def frozen(self) -> botocore.credentials.ReadOnlyCredentials:
        """A consistent (access key, secret, token) triple; raises CredentialsUnavailable."""
        creds = self._credentials
        if creds is None:
            creds = await self._resolved()
        try:
            refresh_needed = getattr(creds, "refresh_needed", None)
            if callable(refresh_needed) and refresh_needed():
                frozen = await asyncio.to_thread(creds.get_frozen_credentials)
            else:
                frozen = creds.get_frozen_credentials()
        except Exception as exc:
            raise CredentialsUnavailable(
                f"AWS credentials could not be refreshed ({_describe(exc)})"
            ) from None
        if not frozen.access_key or not frozen.secret_key:
            raise CredentialsUnavailable("AWS credentials have no access key or secret key")
        return frozen

    async def _resolved(self) -> botocore.credentials.Credentials:
        if self._resolving is None:
            self._resolving = asyncio.create_task(self._resolve())
            self._resolving.add_done_callback(_consume_exception)
        return await asyncio.shield(self._resolving)

    async def _resolve(self) -> botocore.credentials.Credentials:
        try:
            creds = await asyncio.to_thread(self._resolve_blocking)
        finally:
            self._resolving = None
        self._credentials = creds
        return creds

    def _resolve_blocking(self) -> botocore.credentials.Credentials:
        try:
            creds = botocore.credentials.EnvProvider(environ=self._env).load()
            if creds is None:
                creds = botocore.session.get_session().get_credentials()
        except Exception as exc:
            raise CredentialsUnavailable(
                f"AWS credentials could not be loaded ({_describe(exc)})"
            ) from None
        if creds is None:
            raise CredentialsUnavailable(
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or run where instance or container credentials are available"
            )
        return creds


def sigv4_headers(
    creds: botocore.credentials.Credentials | botocore.credentials.ReadOnlyCredentials,
    region: str,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    service: str = "bedrock",
) -> dict[str, str]:
    """AWS Signature Version 4 headers for one request, signed over exactly `body`.

    `url` must be the URL as sent on the wire (path already percent-encoded, as Bedrock model
    ids with ':' need); botocore applies SigV4's second encoding itself. The signed headers
    are `host` (derived from `url`: hostname, plus the port when not the scheme's default,
    which is what `Upstream.host_header` sends), `content-type` and every `x-amz-*` header of
    `headers` except the ones signing sets: the caller must forward those unchanged. Other
    headers (user-agent, accept, anthropic-*, x-amzn-*) are left unsigned so that hops may
    rewrite them. Returns lower-case names: authorization and x-amz-date, plus
    x-amz-security-token for temporary credentials and x-amz-content-sha256 when botocore
    adds it (only for unsigned payloads, which Candela never asks for).
    """
    to_sign: dict[str, str] = {}
    for name, value in headers.items():
        lname = name.lower()
        if lname == "content-type" or (lname.startswith("x-amz-") and lname not in _SIGV4_OWN):
            to_sign[lname] = value
    request = AWSRequest(method=method.upper(), url=url, headers=to_sign, data=body)
    SigV4Auth(creds, service, region).add_auth(request)
    return {
        name.lower(): request.headers[name]
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256")
        if name in request.headers
    }


def _client_header(headers: Mapping[str, str], name: str) -> str | None:
    # Plain dicts are case-sensitive; mitmproxy's Headers is not. Handle both.
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


class UpstreamCredentials:
    """Sets each route's provider credential: API keys from the environment, ADC, or SigV4.

    Built once at start from `resolve_all(config)`. Nothing is fetched until a request needs
    it: a missing key or unreachable token endpoint fails that request (CredentialsUnavailable,
    answered as 502 upstream_credentials_unavailable), never start-up.
    """

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        env: Mapping[str, str] | None = None,
        *,
        google: GoogleTokenSource | None = None,
        aws: AwsCredentialSource | None = None,
    ) -> None:
        self._upstreams = dict(upstreams)
        self._env = os.environ if env is None else env
        # One of each for all routes: every Google route shares one token, and so on.
        self._google = google or GoogleTokenSource()
        self._aws = aws or AwsCredentialSource(self._env)

    @property
    def google(self) -> GoogleTokenSource:
        return self._google

    def missing_api_keys(self) -> dict[str, str]:
        """Route name -> the env var it needs but that is unset (for start-up warnings)."""
        return {
            name: up.api_key_env or "(no api_key_env configured)"
            for name, up in self._upstreams.items()
            if up.spec.auth in ("bearer_key", "anthropic_key")
            and not (up.api_key_env and self._env.get(up.api_key_env))
        }

    def _api_key(self, up: Upstream) -> str:
        var = up.api_key_env
        if not var:
            raise CredentialsUnavailable(f"provider '{up.name}' has no api_key_env configured")
        key = self._env.get(var)
        if not key:
            raise CredentialsUnavailable(
                f"provider '{up.name}' needs an API key in environment variable {var}, "
                "which is not set"
            )
        return key

    @staticmethod
    def reads_request(up: Upstream) -> bool:
        """Whether headers_for reads the request's URL, headers and body for this provider
        (SigV4 signs them, Anthropic keeps the client's anthropic-version); else they are unused."""
        return up.spec.auth in ("anthropic_key", "sigv4")

    async def headers_for(
        self, up: Upstream, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        """The provider credential headers (lower-case names) to set on one forwarded request.

        `headers` are the client's headers (for anthropic-version and SigV4's signed set),
        `url` and `body` exactly what will be sent. Raises CredentialsUnavailable.
        """
        auth = up.spec.auth
        if auth == "bearer_key":
            return {"authorization": f"Bearer {self._api_key(up)}"}
        if auth == "anthropic_key":
            version = _client_header(headers, "anthropic-version") or up.anthropic_version
            return {"x-api-key": self._api_key(up), "anthropic-version": version}
        if auth == "google_adc":
            return {"authorization": f"Bearer {await self._google.token()}"}
        if auth == "sigv4":
            if up.api_key_env:
                # a Bedrock API key (providers.<route>.api_key_env, e.g.
                # AWS_BEARER_TOKEN_BEDROCK): sent as a bearer token instead of signing
                return {"authorization": f"Bearer {self._api_key(up)}"}
            if not up.region:
                raise CredentialsUnavailable(f"provider '{up.name}' has no AWS region")
            creds = await self._aws.frozen()
            return sigv4_headers(
                creds, up.region, method, url, headers, body, up.spec.signing_service
            )
        if auth == "none":
            return {}
        raise CredentialsUnavailable(f"provider '{up.name}' has unknown auth kind {auth!r}")
