"""Credentials: where a caller's credential is read from a request (001's precedence), checked
for shape only, and its loggable fingerprint."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

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
    return _credential(_lower_keys(headers), query)


def extract_credentials(
    headers: Mapping[str, str], query: Mapping[str, str]
) -> tuple[str | None, tuple[str, str] | None]:
    """(extract_proxy_credential, extract_credential) of one request, its header names
    lower-cased once for both; MalformedCredential as either raises it, the proxy's first."""
    h = _lower_keys(headers)
    return _proxy_credential(h), _credential(h, query)


def _credential(h: dict[str, str], query: Mapping[str, str]) -> tuple[str, str] | None:
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
    return _proxy_credential(_lower_keys(headers))


def _proxy_credential(h: dict[str, str]) -> str | None:
    if "proxy-authorization" not in h:
        return None
    return _token_of("proxy-authorization", h["proxy-authorization"], bearer=True)


def display_source(source: str) -> str:
    return {
        SOURCE_X_CANDELA_AUTH: "X-Candela-Auth",
        SOURCE_AUTHORIZATION: "Authorization",
        SOURCE_X_API_KEY: "x-api-key",
        SOURCE_X_GOOG_API_KEY: "x-goog-api-key",
        SOURCE_QUERY_KEY: "the key query parameter",
        "proxy-authorization": "Proxy-Authorization",
    }.get(source, source)
