"""Admin API inputs: each helper returns the query or body value it read, or raises Refused
(answered by AdminApi.handle); the limits and formats are admin/params.py's."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import Any

from candela_mitm import errors
from candela_mitm.admin.params import (
    MAX_KEY_MODELS,
    MAX_LIMIT,
    MAX_MODEL_PATTERN_CHARS,
    MAX_TENANTS,
    MAX_USD,
    MAX_USER_CHARS,
    MAX_YEAR,
    MIN_GRANT_USD,
    MIN_YEAR,
    json_int,
    parse_moment,
    tenant_id_ok,
    user_id_ok,
)
from candela_mitm.errors import Refused
from candela_mitm.governance.periods import PERIOD_KINDS
from candela_mitm.governance.tenancy import MAX_TENANT_CHARS
from candela_mitm.state.ports import day_of


def invalid(name: str, why: str) -> Refused:
    return Refused(errors.invalid_field(name, why))


def bad_param(name: str, why: str) -> Refused:
    return Refused(errors.invalid_parameter(name, why))


ID_RULE = "characters, without control characters or surrounding spaces"


def parse_user_id(
    value: object, name: str = "user", refuse: Callable[[str, str], Refused] = bad_param
) -> str:
    """A user id (the path or query parameter `name`, or a body field with refuse=invalid)."""
    if not user_id_ok(value):
        raise refuse(name, f"must be a user id of 1 to {MAX_USER_CHARS} {ID_RULE}")
    assert isinstance(value, str)
    return value


def check_id_param(q: Mapping[str, str], name: str, ok: Callable[[object], bool], what: str) -> None:
    if name in q and not ok(q[name]):
        raise bad_param(name, f"must be {what}")


def moment_param(q: Mapping[str, str], name: str) -> date | datetime | None:
    if name not in q:
        return None
    moment = parse_moment(q[name])
    if moment is None:
        raise bad_param(
            name,
            f"is not a date (YYYY-MM-DD) or an RFC 3339 time in years {MIN_YEAR} to {MAX_YEAR}",
        )
    return moment


def _day(moment: date | datetime | None) -> str | None:
    if moment is None:
        return None
    return day_of(moment) if isinstance(moment, datetime) else moment.isoformat()


def day_range(
    since: date | datetime | None, until: date | datetime | None
) -> tuple[str | None, str | None]:
    """The UTC days of `since` and `until` (either may be absent), until not before since."""
    first, last = _day(since), _day(until)
    if first and last and last < first:
        raise bad_param("until", "is before since")
    return first, last


def int_param(q: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    if name not in q:
        return None
    text = q[name]
    if not re.fullmatch(r"[0-9]{1,19}", text) or not low <= int(text) <= high:
        raise bad_param(name, f"must be an integer from {low} to {high}")
    return int(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity are not JSON)."""
    if not body.strip():
        raise Refused(errors.bad_request("The request body must be a JSON object"))
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(errors.invalid_json(str(e)[:200])) from None
    except RecursionError:  # [[[[... thousands deep: no admin body nests more than a few
        raise Refused(errors.invalid_json("the JSON nests too deeply")) from None
    if not isinstance(data, dict):
        raise Refused(errors.bad_request("The request body must be a JSON object"))
    try:  # "\ud800" alone is JSON, but no text: the stores (UTF-8) cannot hold it
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise Refused(errors.invalid_json("a string holds a lone surrogate")) from None
    return data


def no_unknown_fields(body: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for name in body:
        if name not in known:
            raise invalid(name, f"is not a known field (known: {', '.join(known)})")


def usd_field(body: Mapping[str, Any], name: str, positive: bool) -> float:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(name, "must be a number")
    if not 0 <= v <= MAX_USD:  # before any arithmetic: 1e308 nano-dollars is no integer
        raise invalid(name, f"must be from 0 to {MAX_USD:.0f}")
    if positive and v < MIN_GRANT_USD:  # the stores count nano-dollars
        raise invalid(name, "must be at least 0.000000001")
    return float(v)


def int_field(body: Mapping[str, Any], name: str, high: int) -> int:
    """An integer body field from 0 to `high` (1.0 counts, as JSON Schema counts integers)."""
    n = json_int(body[name])
    if n is None or not 0 <= n <= high:
        raise invalid(name, f"must be an integer from 0 to {high}")
    return n


def limit_field(body: Mapping[str, Any], name: str) -> int | None:
    """A limit: null (none) or an integer from 0 to MAX_LIMIT."""
    n = json_int(body[name])
    if body[name] is not None and (n is None or not 0 <= n <= MAX_LIMIT):
        raise invalid(name, f"must be null or an integer from 0 to {MAX_LIMIT}")
    return n




def period_field(body: Mapping[str, Any], name: str) -> str:
    v = body[name]
    if v not in PERIOD_KINDS:
        raise invalid(name, f"must be one of {', '.join(PERIOD_KINDS)}")
    return str(v)


def tenants_field(v: Any) -> tuple[str, ...]:
    name = "tenants"
    if not isinstance(v, list) or len(v) > MAX_TENANTS:
        raise invalid(name, f"must be a list of at most {MAX_TENANTS} tenant ids")
    for t in v:
        if not tenant_id_ok(t):
            raise invalid(
                name,
                f"must hold tenant ids of 1 to {MAX_TENANT_CHARS} characters, "
                "without control characters or surrounding spaces",
            )
    if len(set(v)) != len(v):
        raise invalid(name, "must not repeat a tenant")
    return tuple(v)


def parse_rfc3339(v: Any) -> datetime | None:
    moment = parse_moment(v) if isinstance(v, str) else None
    return moment if isinstance(moment, datetime) else None



def key_models(value: Any) -> tuple[str, ...]:
    """A key's model patterns: names or fnmatch patterns, as governance.models entries."""
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_KEY_MODELS:
        raise invalid("models", f"must be a list of 1 to {MAX_KEY_MODELS} model names or patterns")
    for m in value:
        if (
            not isinstance(m, str)
            or not m
            or len(m) > MAX_MODEL_PATTERN_CHARS
            or any(ord(ch) < 0x20 for ch in m)
        ):
            raise invalid(
                "models",
                f"each entry must be a model name or pattern of 1 to {MAX_MODEL_PATTERN_CHARS} "
                "printable characters (gpt-4o-mini, claude-sonnet-*)",
            )
    return tuple(value)

