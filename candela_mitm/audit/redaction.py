"""What the audit trail never records: credentials (by key name, anywhere in an entry, and
bearer or basic tokens inside text), and prompt text unless `audit.log_prompts` is set."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[redacted]"
# Keys whose values are credentials wherever they appear (headers, nested dicts): never recorded.
_CREDENTIAL_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "proxy_authorization",
        "api_key",
        "api-key",
        "apikey",
        "x-api-key",
        "x-goog-api-key",
        "key",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "password",
        "secret",
        "client_secret",
        "private_key",
        "credentials",
        "cookie",
        "set-cookie",
        "x-amz-security-token",
    }
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
# Top-level keys holding prompt or completion text; dropped unless audit.log_prompts is true.
PROMPT_KEYS = frozenset(
    {"prompt", "prompts", "messages", "contents", "completion", "request_body", "response_body"}
)


_PLAIN = frozenset({int, float, bool, type(None)})  # nothing to redact in them


# Whether a text key names a credential, for the keys seen first (entries use a few dozen
# names): a lookup instead of a lower-cased copy per key (redact of a request's entry, 26
# fields, 4.3 -> 2.9 µs warm). Bounded: a key past it is lower-cased each time, as before.
_KEY_IS_CREDENTIAL: dict[str, bool] = {}
_KEYS_KEPT = 4096


def _credential_key(k: Any) -> bool:
    name = k if type(k) is str else str(k)
    hit = _KEY_IS_CREDENTIAL.get(name)
    if hit is None:
        hit = name.lower() in _CREDENTIAL_KEYS
        if len(_KEY_IS_CREDENTIAL) < _KEYS_KEPT:
            _KEY_IS_CREDENTIAL[name] = hit
    return hit


def redact(value: Any) -> Any:
    """A copy of value with credential-named keys masked and bearer tokens in text cut out."""
    if isinstance(value, dict):
        out = dict(value)  # then only what changes is set again (in its place)
        known = _KEY_IS_CREDENTIAL
        for k, v in value.items():
            hit = known.get(k) if type(k) is str else None
            if hit or (hit is None and _credential_key(k)):
                out[k] = REDACTED
            elif type(v) in _PLAIN:  # most of an entry's fields: nothing to do
                continue
            elif type(v) is str:  # the others: what redact(v) does, without a call
                # the pattern needs a "b" and a whitespace: a text of letters and digits
                # alone (ids, hashes: span_id, trace_id, key_id) holds none
                if ("b" in v or "B" in v) and not v.isalnum():
                    out[k] = _redact_text(v)
            else:
                out[k] = redact(v)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _redact_text(value)
    return value


def _redact_text(value: str) -> str:
    # _BEARER matches only from a "b" or a "B" (no other character matches them ignoring case):
    # a text without one is returned at the cost of two scans (redact's dict loop checks that)
    if _BEARER.search(value):
        return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", value)
    return value
