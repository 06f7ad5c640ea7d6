"""Admin parameters: what the admin API accepts, stated once for the validators and the OpenAPI
document (each rule is a regular expression both Python's `re` and ECMA-262 read alike)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

from candela_mitm.governance.tenancy import MAX_TENANT_CHARS

MAX_USER_CHARS = 320  # an e-mail address is at most 254
MAX_TENANTS = 256
MAX_USD = 1e9  # as nano-dollars this stays far inside the 64-bit integers every store keeps
MIN_GRANT_USD = 1e-9  # one nano-dollar, the stores' resolution: less would be a grant of 0
MIN_YEAR, MAX_YEAR = 1970, 9998  # years as written; their UTC form stays inside the calendar
MAX_RPM = 1_000_000
MAX_LIMIT = 1_000_000_000  # concurrency and tokens per minute
DEFAULT_ROTATION_GRACE_S = 3600  # how long a rotated key keeps working beside its successor
MAX_ROTATION_GRACE_S = 30 * 24 * 3600
MAX_REASON_CHARS = 1000
MAX_KEY_MODELS = 64  # model names or patterns a key may be narrowed to
MAX_MODEL_PATTERN_CHARS = 256
DEFAULT_AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 10_000
MAX_LEADERBOARD_LIMIT = 10_000
MAX_SEQ = 2**62
MAX_ACTION_CHARS = 64

# The characters Python's str.strip() removes (str.isspace): an id never starts or ends with one.
# `$(?!\n)`: the end, in ECMA-262 and in Python alike (Python's `$` alone also matches before a
# final newline, so a validator using re.search would accept "alice\n").
_END = r"$(?!\n)"
_UNICODE_SPACE = r"\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACE = rf"\t-\r\x1c-\x20{_UNICODE_SPACE}"
_EDGE = rf"[^\x00-\x20\x7f{_UNICODE_SPACE}]"  # neither a control character nor a space
# A user or tenant id: no control character (C0 or DEL), no surrounding space.
ID_PATTERN = rf"^{_EDGE}(?:[^\x00-\x1f\x7f]*{_EDGE})?{_END}"
# Text that is not only spaces (a grant's reason).
TEXT_PATTERN = rf"[^{_SPACE}]"
KEY_ID_PATTERN = rf"^k_[0-9a-f]{{16}}{_END}"  # as minted: "k_" and 16 hex digits
ACTION_PATTERN = rf"^[a-z][a-z0-9_]{{0,{MAX_ACTION_CHARS - 1}}}{_END}"

_YEAR = r"(?:19[7-9][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"  # 1970..9998
_DATE = _YEAR + r"-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_CLOCK = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
_OFFSET = r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
# A UTC day; with `format: date` (which excludes 2026-02-30) exactly what parse_moment reads.
DAY_PATTERN = rf"^{_DATE}{_END}"
# An RFC 3339 time with its offset; with `format: date-time`, exactly what parse_moment reads.
TIME_PATTERN = rf"^{_DATE}[Tt]{_CLOCK}{_OFFSET}{_END}"

_ID = re.compile(ID_PATTERN)
_TEXT = re.compile(TEXT_PATTERN)
_KEY_ID = re.compile(KEY_ID_PATTERN)
_ACTION = re.compile(ACTION_PATTERN)
_DAY = re.compile(DAY_PATTERN)
_TIME = re.compile(TIME_PATTERN)


def _fits(pattern: re.Pattern[str], value: object, max_chars: int) -> bool:
    # fullmatch, not the pattern's `$`: Python's `$` also matches before a final newline
    return isinstance(value, str) and len(value) <= max_chars and bool(pattern.fullmatch(value))


def user_id_ok(value: object) -> bool:
    return _fits(_ID, value, MAX_USER_CHARS)


def tenant_id_ok(value: object) -> bool:
    return _fits(_ID, value, MAX_TENANT_CHARS)


def key_id_ok(value: object) -> bool:
    return _fits(_KEY_ID, value, 18)


def action_ok(value: object) -> bool:
    return _fits(_ACTION, value, MAX_ACTION_CHARS)


def text_ok(value: object, max_chars: int) -> bool:
    """A string of at most `max_chars` that is not only spaces."""
    return isinstance(value, str) and len(value) <= max_chars and bool(_TEXT.search(value))


def json_int(value: object) -> int | None:
    """A JSON integer as JSON Schema counts them (1 and 1.0, not true), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def parse_moment(value: str) -> date | datetime | None:
    """A UTC day (YYYY-MM-DD) or an RFC 3339 time with its offset, written in years MIN_YEAR to
    MAX_YEAR (DAY_PATTERN, TIME_PATTERN); None if it is neither or not in the calendar."""
    try:
        if _DAY.fullmatch(value):
            return date.fromisoformat(value)
        if _TIME.fullmatch(value):
            return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:  # 2026-02-30
        return None
    return None
