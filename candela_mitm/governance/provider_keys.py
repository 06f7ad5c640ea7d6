"""Provider keys an intercepted app brings: which one it sent, its fingerprint, whether it is ours.

The organisation's keys are configured as HMAC-SHA256 fingerprints (interception.organisation_keys)
keyed with a secret from the environment, never as keys: the config, the audit trail and the logs
hold fingerprints only, and without the secret a fingerprint cannot be checked against a guess.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from candela_mitm.config import Interception
from candela_mitm.errors import ConfigError

_SIGV4_ACCESS_KEY = re.compile(r"Credential=([A-Z0-9]{16,128})/")


def presented(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The provider key in an intercepted request, where each provider's SDK puts it:
    `Authorization: Bearer` (OpenAI, Anthropic's newer SDKs, Bedrock API keys), `x-api-key`
    (Anthropic), `x-goog-api-key` or `?key=` (Gemini), and a SigV4 signature's access key id
    (Bedrock: the secret never travels). None when the request carries none."""
    h = {k.lower(): v for k, v in headers.items()}
    auth = h.get("authorization", "").strip()
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    if auth.startswith("AWS4-HMAC-SHA256"):
        m = _SIGV4_ACCESS_KEY.search(auth)
        if m:
            return m.group(1)
    for name in ("x-api-key", "x-goog-api-key"):
        if h.get(name, "").strip():
            return h[name].strip()
    key = query.get("key", "").strip()
    return key or None


def fingerprint(secret: bytes, key: str) -> str:
    """HMAC-SHA256(secret, key), hex: what the config lists and the audit trail records."""
    return hmac.new(secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class KeyCheck:
    """A presented key, seen through its fingerprint."""

    fingerprint: str
    organisation: bool  # one of interception.organisation_keys


class OrganisationKeys:
    """The organisation's key fingerprints and the secret that makes them."""

    def __init__(self, secret: bytes | None, fingerprints: Iterable[str]) -> None:
        self.secret = secret
        self.fingerprints = frozenset(fingerprints)

    def check(self, key: str) -> KeyCheck | None:
        """None without a secret: nothing can be fingerprinted (nor recognised as ours)."""
        if not self.secret:
            return None
        fp = fingerprint(self.secret, key)
        ours = any(hmac.compare_digest(fp, known) for known in self.fingerprints)
        return KeyCheck(fp, ours)


def from_config(cfg: Interception, environ: Mapping[str, str]) -> OrganisationKeys:
    """The organisation's keys of interception.*; ConfigError when fingerprints are configured
    but their secret is not in the environment (nothing could be recognised as ours)."""
    secret = environ.get(cfg.key_fingerprint_secret_env, "")
    if cfg.organisation_keys and not secret:
        raise ConfigError(
            f"interception.organisation_keys: the fingerprints' secret is not set "
            f"(${cfg.key_fingerprint_secret_env})"
        )
    return OrganisationKeys(secret.encode() or None, cfg.organisation_keys)
