"""Admin API: the /admin/v1 routes of admin-api.md, over the users, the ledger and the audit log."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, unquote

from candela_mitm import errors
from candela_mitm.admin.openapi import openapi_document
from candela_mitm.admin.params import (
    DEFAULT_AUDIT_LIMIT,
    DEFAULT_ROTATION_GRACE_S,
    MAX_ACTION_CHARS,
    MAX_AUDIT_LIMIT,
    MAX_KEY_MODELS,
    MAX_LEADERBOARD_LIMIT,
    MAX_LIMIT,
    MAX_MODEL_PATTERN_CHARS,
    MAX_REASON_CHARS,
    MAX_ROTATION_GRACE_S,
    MAX_RPM,
    MAX_SEQ,
    MAX_TENANTS,
    MAX_USD,
    MAX_USER_CHARS,
    MAX_YEAR,
    MIN_GRANT_USD,
    MIN_YEAR,
    action_ok,
    json_int,
    key_id_ok,
    parse_moment,
    tenant_id_ok,
    text_ok,
    user_id_ok,
)
from candela_mitm.audit.actions import ADMIN_ACTION
from candela_mitm.audit.query import query_entries
from candela_mitm.audit.writer import AuditWriter
from candela_mitm.config import Config
from candela_mitm.errors import Denial, Refused, StoreUnavailable
from candela_mitm.governance.identity import MINTED_KEY_PREFIX, KeyScope
from candela_mitm.governance.ledger import Grant, KeyBudget, Ledger, TenantBudgetStatus
from candela_mitm.governance.periods import PERIOD_KINDS
from candela_mitm.governance.tenancy import MAX_TENANT_CHARS
from candela_mitm.governance.users import TenantSettings, UserDirectory, UserSettings
from candela_mitm.state.ports import (
    LIMIT_FIELDS,
    TENANT_LIMIT_FIELDS,
    KeyRecord,
    StateStore,
    TenantRecord,
    UserRecord,
    day_of,
    from_us,
    rfc3339,
    to_us,
)

PREFIX = "/admin/v1"

# An admin change waits this long for its audit entry to be committed; past it, 503.
AUDIT_COMMIT_TIMEOUT_S = 5.0
# A read of the audit log first waits this long for entries already queued (read-your-writes).
AUDIT_FLUSH_TIMEOUT_S = 2.0

# The limits and formats of every input are in admin/params.py, shared with the OpenAPI document.

# Always accepted in a query string: it may carry the caller's Candela API key (see identity).
_CREDENTIAL_PARAMS = frozenset({"key"})


@dataclass(frozen=True)
class AdminRequest:
    """One call, as the addon hands it over after authentication."""

    method: str
    path: str  # as received: percent-encoded, query included
    user: str  # the authenticated principal
    role: str  # "admin", "tenant_admin" or "developer", as Auth settled it
    body: bytes = b""  # decoded (Content-Encoding removed)
    via: str | None = None
    request_id: str | None = None  # the span id: links audit entries to the request
    key_scope: KeyScope | None = None  # called with a minted key: what it narrows its user to


@dataclass(frozen=True)
class AdminResponse:
    status: int
    payload: Any
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, denial: Denial) -> AdminResponse:
        return cls(denial.status, denial.payload(), dict(denial.headers))

    @property
    def error(self) -> str | None:
        if self.status >= 400 and isinstance(self.payload, dict):
            return self.payload.get("error")
        return None


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # as in the OpenAPI document: /admin/v1/users/{user}
    handler: str  # the AdminApi method that answers it
    admin_only: bool
    query: frozenset[str] = frozenset()  # accepted query parameters

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template[len(PREFIX) + 1 :].split("/"))


ROUTES: tuple[Route, ...] = (
    Route("GET", "/admin/v1/me", "me", False),
    Route("GET", "/admin/v1/users", "list_users", True),
    Route("PUT", "/admin/v1/users/{user}", "put_user", True),
    Route("DELETE", "/admin/v1/users/{user}", "delete_user", True),
    Route("POST", "/admin/v1/users/{user}/grants", "create_grant", True),
    Route("GET", "/admin/v1/users/{user}/grants", "list_grants", True),
    Route("GET", "/admin/v1/tenants", "list_tenants", True),
    # developers too, for their own keys
    Route("POST", "/admin/v1/keys", "create_key", False),
    Route("GET", "/admin/v1/keys", "list_keys", False, frozenset({"user"})),
    Route("DELETE", "/admin/v1/keys/{key}", "revoke_key", False),
    Route("POST", "/admin/v1/keys/{key}/rotate", "rotate_key", False),
    Route("PUT", "/admin/v1/tenants/{tenant}", "put_tenant", True),
    # developers too, filtered to themselves
    Route(
        "GET", "/admin/v1/usage", "usage", False, frozenset({"user", "tenant", "since", "until"})
    ),
    Route(
        "GET",
        "/admin/v1/leaderboard",
        "leaderboard",
        True,
        frozenset({"by", "since", "until", "limit"}),
    ),
    Route(
        "GET",
        "/admin/v1/audit",
        "audit",
        True,
        frozenset({"action", "user", "since", "limit", "before_seq"}),
    ),
    Route("GET", "/admin/v1/openapi.json", "openapi", False),
    # everyone: read-only, scoped to what the role may see (admin/policy_view.py)
    Route("GET", "/admin/v1/policy", "policy", False),
)

Handled = AdminResponse


# -- parsing: each helper returns what it read, or raises Refused (answered by AdminApi.handle) ---


def _invalid(name: str, why: str) -> Refused:
    return Refused(errors.invalid_field(name, why))


def _bad_param(name: str, why: str) -> Refused:
    return Refused(errors.invalid_parameter(name, why))


def match_route(path: str) -> tuple[list[Route], dict[str, str]] | Denial:
    """The routes whose template fits `path` (any method) and the decoded path parameters,
    or the Denial of a path that cannot be decoded.

    Segments are split before percent-decoding, so a user id may hold an encoded '/'.
    """
    try:
        return _match_route(path)
    except Refused as r:
        return r.denial


def _match_route(path: str) -> tuple[list[Route], dict[str, str]]:
    bare = path.split("?", 1)[0]
    if not (bare == PREFIX or bare.startswith(PREFIX + "/")):
        return [], {}
    rest = bare[len(PREFIX) + 1 :]
    if rest.endswith("/"):
        rest = rest[:-1]
    try:
        parts = [unquote(p, errors="strict") for p in rest.split("/")] if rest else []
    except UnicodeDecodeError:
        raise Refused(errors.bad_request("The path is not valid percent-encoded UTF-8")) from None
    found: list[Route] = []
    params: dict[str, str] = {}
    for route in ROUTES:
        segs = route.segments
        if len(segs) != len(parts):
            continue
        got: dict[str, str] = {}
        for seg, part in zip(segs, parts, strict=True):
            if seg.startswith("{"):
                if not part:
                    break
                got[seg[1:-1]] = part
            elif seg != part:
                break
        else:
            found.append(route)
            params = got
    return found, params


_ID_RULE = "characters, without control characters or surrounding spaces"


def _user_id(
    value: object, name: str = "user", refuse: Callable[[str, str], Refused] = _bad_param
) -> str:
    """A user id (the path or query parameter `name`, or a body field with refuse=_invalid)."""
    if not user_id_ok(value):
        raise refuse(name, f"must be a user id of 1 to {MAX_USER_CHARS} {_ID_RULE}")
    assert isinstance(value, str)
    return value


def _bad_path(name: str, why: str) -> Refused:
    return Refused(errors.invalid_parameter(name, why, where="Path"))


def _path_params(p: Mapping[str, str]) -> None:
    """The path parameters' formats (admin/params.py), refused with 400 naming the parameter."""
    if "user" in p:
        _user_id(p["user"], "user", _bad_path)
    if "tenant" in p and not tenant_id_ok(p["tenant"]):
        raise _bad_path("tenant", f"must be a tenant id of 1 to {MAX_TENANT_CHARS} {_ID_RULE}")
    if "key" in p and not key_id_ok(p["key"]):
        raise _bad_path("key", "must be a key id: k_ and 16 hex digits")


def _id_param(q: Mapping[str, str], name: str, ok: Callable[[object], bool], what: str) -> None:
    if name in q and not ok(q[name]):
        raise _bad_param(name, f"must be {what}")


def _query_ids(q: Mapping[str, str]) -> None:
    """The id-shaped query parameters' formats, for every route and role (a tenant admin's
    scoped handlers included), refused with 400 naming the parameter."""
    if "user" in q:
        _user_id(q["user"])
    _id_param(q, "tenant", tenant_id_ok, f"a tenant id of 1 to {MAX_TENANT_CHARS} {_ID_RULE}")
    _id_param(q, "action", action_ok, f"an action name ([a-z0-9_], at most {MAX_ACTION_CHARS})")


def parse_query(query: str, accepted: frozenset[str]) -> dict[str, str]:
    """Query parameters, each at most once; unknown ones are refused. An empty value is absent."""
    out: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict", max_num_fields=32)
    except (ValueError, UnicodeDecodeError):
        raise Refused(errors.bad_request("The query string cannot be parsed")) from None
    seen: set[str] = set()
    for name, value in pairs:
        if name in _CREDENTIAL_PARAMS:
            continue
        if name not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise _bad_param(name, f"is not known here (accepted: {known})")
        if name in seen:
            raise _bad_param(name, "is given more than once")
        seen.add(name)
        if value != "":
            out[name] = value
    return out


def _moment_param(q: Mapping[str, str], name: str) -> date | datetime | None:
    if name not in q:
        return None
    moment = parse_moment(q[name])
    if moment is None:
        raise _bad_param(
            name,
            f"is not a date (YYYY-MM-DD) or an RFC 3339 time in years {MIN_YEAR} to {MAX_YEAR}",
        )
    return moment


def _day(moment: date | datetime | None) -> str | None:
    if moment is None:
        return None
    return day_of(moment) if isinstance(moment, datetime) else moment.isoformat()


def _days(
    since: date | datetime | None, until: date | datetime | None
) -> tuple[str | None, str | None]:
    """The UTC days of `since` and `until` (either may be absent), until not before since."""
    first, last = _day(since), _day(until)
    if first and last and last < first:
        raise _bad_param("until", "is before since")
    return first, last


def _int_param(q: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    if name not in q:
        return None
    text = q[name]
    if not re.fullmatch(r"[0-9]{1,19}", text) or not low <= int(text) <= high:
        raise _bad_param(name, f"must be an integer from {low} to {high}")
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


def _no_unknown_fields(body: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for name in body:
        if name not in known:
            raise _invalid(name, f"is not a known field (known: {', '.join(known)})")


def _usd(body: Mapping[str, Any], name: str, positive: bool) -> float:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _invalid(name, "must be a number")
    if not 0 <= v <= MAX_USD:  # before any arithmetic: 1e308 nano-dollars is no integer
        raise _invalid(name, f"must be from 0 to {MAX_USD:.0f}")
    if positive and v < MIN_GRANT_USD:  # the stores count nano-dollars
        raise _invalid(name, "must be at least 0.000000001")
    return float(v)


def _int_field(body: Mapping[str, Any], name: str, high: int) -> int:
    """An integer body field from 0 to `high` (1.0 counts, as JSON Schema counts integers)."""
    n = json_int(body[name])
    if n is None or not 0 <= n <= high:
        raise _invalid(name, f"must be an integer from 0 to {high}")
    return n


def _limit_field(body: Mapping[str, Any], name: str) -> int | None:
    """A limit: null (none) or an integer from 0 to MAX_LIMIT."""
    n = json_int(body[name])
    if body[name] is not None and (n is None or not 0 <= n <= MAX_LIMIT):
        raise _invalid(name, f"must be null or an integer from 0 to {MAX_LIMIT}")
    return n




def _period(body: Mapping[str, Any], name: str) -> str:
    v = body[name]
    if v not in PERIOD_KINDS:
        raise _invalid(name, f"must be one of {', '.join(PERIOD_KINDS)}")
    return str(v)


def _tenants(v: Any) -> tuple[str, ...]:
    name = "tenants"
    if not isinstance(v, list) or len(v) > MAX_TENANTS:
        raise _invalid(name, f"must be a list of at most {MAX_TENANTS} tenant ids")
    for t in v:
        if not tenant_id_ok(t):
            raise _invalid(
                name,
                f"must hold tenant ids of 1 to {MAX_TENANT_CHARS} characters, "
                "without control characters or surrounding spaces",
            )
    if len(set(v)) != len(v):
        raise _invalid(name, "must not repeat a tenant")
    return tuple(v)


def parse_rfc3339(v: Any) -> datetime | None:
    moment = parse_moment(v) if isinstance(v, str) else None
    return moment if isinstance(moment, datetime) else None


# -- JSON views ----------------------------------------------------------------------------------


def _usd_out(value: float) -> float:
    return round(value, 9)  # nano-dollars: the stores' resolution, without float noise


def settings_json(s: UserSettings) -> dict[str, Any]:
    return {
        "role": s.role,
        "tenants": list(s.tenants),
        "daily_budget_usd": s.daily_budget_usd,
        "budget_period": s.budget_period.kind,
        "requests_per_minute": s.requests_per_minute,
        **{name: getattr(s, name) for name in LIMIT_FIELDS},
    }


def _mint(
    user: str,
    name: str,
    actor: str,
    now_us: int,
    expires_us: int | None,
    models: tuple[str, ...] = (),
    budget_usd: float | None = None,
    lineage: str = "",
) -> tuple[str, KeyRecord]:
    """A new key and its record (which holds only the key's SHA-256)."""
    secret = MINTED_KEY_PREFIX + secrets.token_urlsafe(32)
    return secret, KeyRecord(
        key_id="k_" + uuid.uuid4().hex[:16],
        sha256=hashlib.sha256(secret.encode()).hexdigest(),
        user_id=user,
        name=name,
        actor=actor,
        created_us=now_us,
        expires_us=expires_us,
        models=models,
        budget_usd=budget_usd,
        lineage=lineage,
    )


def _key_models(value: Any) -> tuple[str, ...]:
    """A key's model patterns: names or fnmatch patterns, as governance.models entries."""
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_KEY_MODELS:
        raise _invalid("models", f"must be a list of 1 to {MAX_KEY_MODELS} model names or patterns")
    for m in value:
        if (
            not isinstance(m, str)
            or not m
            or len(m) > MAX_MODEL_PATTERN_CHARS
            or any(ord(ch) < 0x20 for ch in m)
        ):
            raise _invalid(
                "models",
                f"each entry must be a model name or pattern of 1 to {MAX_MODEL_PATTERN_CHARS} "
                "printable characters (gpt-4o-mini, claude-sonnet-*)",
            )
    return tuple(value)


def key_json(k: KeyRecord, now_us: int) -> dict[str, Any]:
    state = "revoked" if k.revoked_us is not None else (
        "active" if k.valid_at(now_us) else "expired"
    )
    return {
        "id": k.key_id,
        "user_id": k.user_id,
        "name": k.name,
        "fingerprint": k.sha256[:8],  # as audit entries name the key that made a request
        "state": state,
        "created_at": rfc3339(from_us(k.created_us)),
        "expires_at": None if k.expires_us is None else rfc3339(from_us(k.expires_us)),
        "revoked_at": None if k.revoked_us is None else rfc3339(from_us(k.revoked_us)),
        "actor": k.actor,
        "models": list(k.models),  # []: whatever its user may use
        "budget_usd": k.budget_usd,  # null: its user's budget; else a part of it, per its period
    }


def tenant_json(t: TenantSettings, status: TenantBudgetStatus) -> dict[str, Any]:
    return {
        "tenant_id": t.tenant_id,
        "budget_usd": t.budget_usd,
        "period": t.period.kind,
        "time_zone": t.period.time_zone,
        "source": t.source,
        "spent_usd": _usd_out(status.spent_usd),
        "reserved_usd": _usd_out(status.reserved_usd),
        "remaining_usd": None if status.remaining_usd is None else _usd_out(status.remaining_usd),
        "period_starts_at": status.period_starts_at,
        "resets_at": status.resets_at,
        **tenant_limits(t),
    }


def tenant_limits(t: TenantSettings) -> dict[str, int | None]:
    """A tenant's limits by the names config, records and the API share (TENANT_LIMIT_FIELDS)."""
    return {
        name: (
            t.max_concurrent_requests
            if name == "max_concurrent_requests"
            else getattr(t.token_limits, name.removesuffix("_per_minute"))
        )
        for name in TENANT_LIMIT_FIELDS
    }


def user_json(s: UserSettings, spent_today_usd: float) -> dict[str, Any]:
    return {
        "user_id": s.user_id,
        **settings_json(s),
        "source": s.source,
        "spent_today_usd": _usd_out(spent_today_usd),
    }


def grant_json(g: Grant) -> dict[str, Any]:
    return {
        "id": g.id,
        "user_id": g.user_id,
        "amount_usd": _usd_out(g.amount_usd),
        "used_usd": _usd_out(g.used_usd),
        "held_usd": _usd_out(g.held_usd),
        "remaining_usd": _usd_out(g.remaining_usd),
        "expires_at": rfc3339(g.expires_at),
        "expired": g.expired,
        "reason": g.reason,
        "actor": g.actor,
        "created_at": rfc3339(g.created_at),
    }


# -- the API -------------------------------------------------------------------------------------


class AdminServices(Protocol):
    """What the admin API works on (the runtime provides it; tests may build it from parts)."""

    config: Config
    store: StateStore
    ledger: Ledger
    users: UserDirectory
    audit: AuditWriter


class AdminApi:
    """Answers admin calls. Blocking (store, ledger and audit-log reads): run `handle` on a
    worker thread (Runtime.blocking), never on the event loop.

    Every change is audited before it is made: the `admin_action` entry (actor, action, target,
    before, after) must be committed to the audit ledger first, or the change is refused with
    503 and nothing changes. If the change then fails, a second entry with the same action and
    `outcome: "failed"` follows it, so the trail never claims a change that did not happen
    without saying so.
    """

    def __init__(self, rt: AdminServices, clock: Callable[[], datetime] | None = None) -> None:
        self.rt = rt
        self.clock = clock or rt.ledger.clock

    def handle(self, req: AdminRequest) -> AdminResponse:
        """The answer to one call: every refusal, raised wherever it is found, is answered here."""
        try:
            return self._dispatch(req)
        except Refused as r:
            return AdminResponse.of(r.denial)
        except StoreUnavailable:
            return AdminResponse.of(errors.governance_unavailable("the state store is unavailable"))

    def _dispatch(self, req: AdminRequest) -> Handled:
        bare, _, query = req.path.partition("?")
        routes, params = _match_route(req.path)
        if not routes:
            raise Refused(errors.not_found(bare))
        method = req.method.upper()
        route = next((r for r in routes if r.method == method), None)
        if route is None:
            allowed = tuple(sorted(r.method for r in routes))
            raise Refused(errors.method_not_allowed(method, bare, allowed))
        scoped = self._tenant_admin_handler(req, route)
        if scoped is None and route.admin_only and req.role != "admin":
            raise Refused(errors.forbidden(f"{method} {route.template} is for admins only"))
        _path_params(params)
        q = parse_query(query, route.query)
        _query_ids(q)
        body = parse_object(req.body) if method in ("PUT", "POST") else {}
        if scoped is not None:
            return scoped(req, params, q, body)
        handler: Callable[..., Handled] = getattr(self, route.handler)
        return handler(req, params, q, body)

    # -- tenant admins: scoped in admin/tenant_scope.py ---------------------------------------

    def _tenant_admin_handler(
        self, req: AdminRequest, route: Route
    ) -> Callable[..., Handled] | None:
        """The tenant-admin version of a route, for a tenant admin; None otherwise (and for a
        route it answers as to a developer)."""
        if req.role != "tenant_admin":
            return None
        from candela_mitm.admin import tenant_scope  # it builds on this module

        scoped = tenant_scope.HANDLERS.get(route.handler)
        if scoped is None:
            return None
        return lambda r, p, q, b: scoped(tenant_scope.TenantScope(self, r), p, q, b)

    # -- helpers -----------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.clock()

    def _configured_ids(self) -> set[str]:
        cfg = self.rt.config
        return set(cfg.users) | {k.user for k in cfg.auth.api_keys} | set(cfg.auth.admins)

    def _known(self, user: str) -> bool:
        """A user the directory holds: a live stored record, or one named in the config."""
        rec = self.rt.store.get_user(user, include_deleted=True)
        if rec is not None:
            return not rec.deleted
        return user in self._configured_ids()

    def _audited(
        self,
        req: AdminRequest,
        action: str,
        target: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        change: Callable[[], object],
    ) -> None:
        """Commit the audit entry, then make the change; refused (503, no change) if the entry
        cannot be committed."""
        entry = {
            "actor": req.user,
            "action": action,
            "target": target,
            "before": before,
            "after": after,
            "request_id": req.request_id,
        }
        try:
            self.rt.audit.record_durable(ADMIN_ACTION, **entry).result(AUDIT_COMMIT_TIMEOUT_S)
        except FutureTimeout:
            # it may still commit: say that the change was not made
            self.rt.audit.record(ADMIN_ACTION, **entry, outcome="failed", reason="audit_timeout")
            raise Refused(errors.governance_unavailable("the audit trail cannot be written")) from None
        except Exception:
            raise Refused(errors.governance_unavailable("the audit trail cannot be written")) from None
        try:
            change()
        except Exception as e:
            self.rt.audit.record(ADMIN_ACTION, **entry, outcome="failed", reason=type(e).__name__)
            raise
        finally:
            self.rt.users.forget()  # this process's next request reads the change from the store

    # -- routes ------------------------------------------------------------------------------

    def me(self, req: AdminRequest, _p: Any, _q: Any, _b: Any) -> Handled:
        s = self.rt.users.settings(req.user)
        now = self._now()
        status = self.rt.ledger.status(req.user, s.daily_budget_usd, now, s.budget_period)
        return AdminResponse(
            200,
            {
                "user_id": req.user,
                "role": req.role,
                "via": req.via,
                "tenants": list(s.tenants),
                "day": status.day,
                "daily_budget_usd": s.daily_budget_usd,
                "budget_period": status.period,
                "period_starts_at": status.period_starts_at,
                "spent_today_usd": _usd_out(self.rt.ledger.spent_today(req.user, now)),
                "spent_period_usd": _usd_out(status.spent_usd),
                "reserved_usd": _usd_out(status.reserved_usd),
                "remaining_usd": _usd_out(status.remaining_usd),
                "resets_at": status.resets_at,
                "requests_per_minute": s.requests_per_minute,
                **{name: getattr(s, name) for name in LIMIT_FIELDS},
                "grants": [grant_json(g) for g in status.grants],
                "tenant_budgets": [self._tenant_view(t, now) for t in s.tenants],
                "key_budget": self._key_view(req.key_scope, s, now),
            },
        )

    def _key_view(
        self, key: KeyScope | None, s: UserSettings, now: datetime
    ) -> dict[str, Any] | None:
        if key is None or key.budget_usd is None:
            return None
        budget = KeyBudget(key.key_id, key.budget_id or key.key_id, key.budget_usd)
        k = self.rt.ledger.key_status(budget, s.budget_period, now)
        return {
            "key_id": k.key_id,
            "budget_usd": k.budget_usd,
            "period": k.period,
            "spent_usd": _usd_out(k.spent_usd),
            "reserved_usd": _usd_out(k.reserved_usd),
            "remaining_usd": _usd_out(k.remaining_usd),
            "resets_at": k.resets_at,
        }

    def _tenant_view(self, tenant: str, now: datetime) -> dict[str, Any]:
        t = self.rt.users.tenant_settings(tenant)
        return tenant_json(t, self.rt.ledger.tenant_status(tenant, t.budget_usd, t.period, now))

    # -- API keys ----------------------------------------------------------------------------

    def create_key(self, req: AdminRequest, _p: Any, _q: Any, body: dict[str, Any]) -> Handled:
        """Mint a key for a user (a developer: only for themselves); shown once, stored as its
        SHA-256 in the state store."""
        _no_unknown_fields(body, ("user_id", "name", "expires_at", "models", "budget_usd"))
        user = _user_id(body.get("user_id", req.user), "user_id", _invalid)
        if req.role != "admin" and user != req.user:
            raise Refused(errors.forbidden("A developer may only mint keys for themselves"))
        if not self._known(user) and user != req.user:
            raise Refused(errors.user_not_found(user))
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > MAX_REASON_CHARS:
            raise _invalid("name", f"must be a string of at most {MAX_REASON_CHARS} characters")
        now = self._now()
        expires_us = None
        if body.get("expires_at") is not None:
            expires = parse_rfc3339(body["expires_at"])
            if expires is None:
                raise _invalid(
                    "expires_at",
                    "must be an RFC 3339 time with an offset, e.g. 2030-01-31T00:00:00Z",
                )
            if expires <= now:
                raise _invalid("expires_at", "must be in the future")
            expires_us = to_us(expires)
        models = _key_models(body.get("models"))
        budget_usd = None
        if body.get("budget_usd") is not None:
            budget_usd = _usd(body, "budget_usd", True)
            # a part of the user's budget, as it is now (a later change of it is not tracked:
            # a request still has to fit the user's budget as well as the key's)
            owner = self.rt.users.settings(user)
            if budget_usd > owner.daily_budget_usd:
                raise _invalid(
                    "budget_usd",
                    f"must be at most the user's budget (${owner.daily_budget_usd:g} per "
                    f"{owner.budget_period.kind} period)",
                )
        secret, record = _mint(
            user, name, req.user, to_us(now), expires_us, models, budget_usd
        )
        view = key_json(record, to_us(now))
        self._audited(
            req, "key.create", user, None, view, lambda: self.rt.store.put_api_key(record)
        )
        return AdminResponse(201, {**view, "key": secret})

    def list_keys(self, req: AdminRequest, _p: Any, q: dict[str, str], _b: Any) -> Handled:
        user = q.get("user")
        if user is not None:
            _user_id(user)
        if req.role != "admin":
            if user is None:
                user = req.user
            elif user != req.user:
                raise Refused(errors.forbidden("A developer may only list their own keys"))
        now_us = to_us(self._now())
        keys = [key_json(k, now_us) for k in self.rt.store.api_keys(user)]
        return AdminResponse(200, {"user_id": user, "count": len(keys), "keys": keys})

    def _own_key(self, req: AdminRequest, key_id: str) -> KeyRecord:
        current = next((k for k in self.rt.store.api_keys() if k.key_id == key_id), None)
        # a developer learns nothing about other users' keys: theirs or "no such key"
        if current is None or (req.role != "admin" and current.user_id != req.user):
            raise Refused(errors.key_not_found(key_id))
        return current

    def rotate_key(
        self, req: AdminRequest, p: dict[str, str], _q: Any, body: dict[str, Any]
    ) -> Handled:
        """A new key for the same user, name and expiry; the old one keeps working for
        `grace_s` seconds (default an hour), then is refused like an expired key."""
        old = self._own_key(req, p["key"])
        _no_unknown_fields(body, ("grace_s",))
        grace = DEFAULT_ROTATION_GRACE_S
        if "grace_s" in body:
            grace = _int_field(body, "grace_s", MAX_ROTATION_GRACE_S)
        now_us = to_us(self._now())
        if not old.valid_at(now_us):
            raise _invalid("key", "is revoked or expired: mint a new key instead")
        # the same budget row: a rotation does not give the key a fresh budget
        secret, new = _mint(
            old.user_id, old.name, req.user, now_us, old.expires_us, old.models,
            old.budget_usd, old.budget_id,
        )
        ends = now_us + grace * 1_000_000
        if old.expires_us is not None:
            ends = min(ends, old.expires_us)
        old_after = key_json(dataclasses.replace(old, expires_us=ends), now_us)
        new_view = key_json(new, now_us)

        def rotate() -> None:
            self.rt.store.put_api_key(new)
            self.rt.store.expire_api_key(old.key_id, ends)

        self._audited(
            req,
            "key.rotate",
            old.user_id,
            key_json(old, now_us),
            {"old": old_after, "new": new_view},
            rotate,
        )
        return AdminResponse(201, {**new_view, "key": secret, "replaces": old_after})

    def revoke_key(self, req: AdminRequest, p: dict[str, str], _q: Any, _b: Any) -> Handled:
        key_id = p["key"]
        current = self._own_key(req, key_id)
        now = self._now()
        now_us = to_us(now)
        before = key_json(current, now_us)
        if current.revoked_us is not None:
            return AdminResponse(200, before)  # already revoked: nothing changes
        after = key_json(dataclasses.replace(current, revoked_us=now_us), now_us)
        self._audited(
            req,
            "key.revoke",
            current.user_id,
            before,
            after,
            lambda: self.rt.store.revoke_api_key(key_id, now_us),
        )
        return AdminResponse(200, after)

    def list_tenants(self, _r: Any, _p: Any, _q: Any, _b: Any) -> Handled:
        now = self._now()
        ids = {r.tenant_id for r in self.rt.store.list_tenants()}
        ids |= set(self.rt.config.governance.tenants)
        for u in self.rt.config.users.values():
            ids |= set(u.tenants)
        for rec in self.rt.store.list_users():
            ids |= set(rec.tenants)
        tenants = [self._tenant_view(t, now) for t in sorted(ids)]
        return AdminResponse(200, {"count": len(tenants), "tenants": tenants})

    def put_tenant(
        self, req: AdminRequest, p: dict[str, str], _q: Any, body: dict[str, Any]
    ) -> Handled:
        tenant = p["tenant"]
        _no_unknown_fields(body, ("budget_usd", "period", *TENANT_LIMIT_FIELDS))
        current = self.rt.users.tenant_settings(tenant)
        stored = self.rt.store.get_tenant(tenant)
        budget = current.budget_usd
        kind: str | None = stored.budget_period if stored else None
        if stored is None and current.source == "config":
            kind = self.rt.config.governance.tenants[tenant].period
        if "budget_usd" in body:  # null: no budget of the tenant's own
            budget = None if body["budget_usd"] is None else _usd(body, "budget_usd", False)
        if "period" in body:
            kind = _period(body, "period")
        limits = tenant_limits(current)
        for name in TENANT_LIMIT_FIELDS:
            if name in body:  # null: no limit
                limits[name] = _limit_field(body, name)
        record = TenantRecord(tenant, budget, kind, self._now(), **limits)
        before = (
            {
                "budget_usd": current.budget_usd,
                "period": current.period.kind,
                **tenant_limits(current),
            }
            if current.source != "default"
            else None
        )
        after = {"budget_usd": budget, "period": kind or self.rt.users.period().kind, **limits}
        action = "tenant.update" if before is not None else "tenant.create"
        self._audited(req, action, tenant, before, after, lambda: self.rt.store.put_tenant(record))
        return AdminResponse(200 if before else 201, self._tenant_view(tenant, self._now()))

    def _spent_today(self) -> dict[str, float]:
        today = day_of(self._now())
        rows = self.rt.ledger.leaderboard("user", since=today, until=today)
        return {r.key: r.spend_usd for r in rows if r.key}

    def list_users(self, _r: Any, _p: Any, _q: Any, _b: Any) -> Handled:
        records = self.rt.store.list_users(include_deleted=True)
        removed = {r.user_id for r in records if r.deleted}
        spent = self._spent_today()
        # users who only spent today (e.g. an OIDC identity never configured) are users too
        ids = (self._configured_ids() | set(spent) | {r.user_id for r in records}) - removed
        users = [user_json(self.rt.users.settings(u), spent.get(u, 0.0)) for u in sorted(ids)]
        return AdminResponse(200, {"day": day_of(self._now()), "count": len(users), "users": users})

    def put_user(
        self, req: AdminRequest, p: dict[str, str], _q: Any, body: dict[str, Any]
    ) -> Handled:
        user = p["user"]
        _no_unknown_fields(
            body,
            (
                "role",
                "tenants",
                "daily_budget_usd",
                "budget_period",
                "requests_per_minute",
                *LIMIT_FIELDS,
            ),
        )
        current = self.rt.users.settings(user)
        existed = self._known(user)
        # a partial body changes only what it names: start from the settings in force
        role: str = current.role
        tenants = current.tenants
        budget = current.daily_budget_usd
        rpm = current.requests_per_minute
        stored = self.rt.store.get_user(user)
        cfg_user = self.rt.config.users.get(user)
        period: str | None = (stored.budget_period if stored else None) or (
            cfg_user.budget_period if cfg_user else None
        )
        if "budget_period" in body:
            period = _period(body, "budget_period")
        if "role" in body:
            if body["role"] not in ("admin", "tenant_admin", "developer"):
                raise _invalid("role", "must be 'admin', 'tenant_admin' or 'developer'")
            role = body["role"]
            if role != "admin" and user in self.rt.users.admins:
                raise _invalid("role", "cannot be changed: the user is an admin by auth.admins")
        if "tenants" in body:
            tenants = _tenants(body["tenants"])
        if "daily_budget_usd" in body:
            budget = _usd(body, "daily_budget_usd", positive=False)
        if "requests_per_minute" in body:
            rpm = _int_field(body, "requests_per_minute", MAX_RPM)
        limits = {name: getattr(current, name) for name in LIMIT_FIELDS}
        for name in LIMIT_FIELDS:
            if name in body:  # null: no limit of the user's own (the default applies)
                limits[name] = _limit_field(body, name)
        now = self._now()
        record = UserRecord(
            user_id=user,
            role=role,
            tenants=tenants,
            daily_budget_usd=budget,
            requests_per_minute=rpm,
            updated_at=now,
            budget_period=period,
            **limits,
        )
        before = settings_json(current) if existed else None
        after = {
            "role": role,
            "tenants": list(tenants),
            "daily_budget_usd": budget,
            "budget_period": period or self.rt.users.period().kind,
            "requests_per_minute": rpm,
            **limits,
        }
        action = "user.update" if existed else "user.create"
        self._audited(req, action, user, before, after, lambda: self.rt.store.put_user(record))
        saved = self.rt.users.settings(user)
        return AdminResponse(
            200 if existed else 201, user_json(saved, self.rt.ledger.spent_today(user, now))
        )

    def delete_user(self, req: AdminRequest, p: dict[str, str], _q: Any, _b: Any) -> Handled:
        user = p["user"]
        if not self._known(user):
            raise Refused(errors.user_not_found(user))
        if user == req.user:
            raise Refused(errors.bad_request("An admin cannot delete their own user", user_id=user))
        current = self.rt.users.settings(user)
        now = self._now()

        def remove() -> None:
            if self.rt.store.get_user(user) is None:
                # a user from the config has no record yet: keep their settings, then mark it
                self.rt.store.put_user(
                    UserRecord(
                        user_id=user,
                        role=current.role,
                        tenants=current.tenants,
                        daily_budget_usd=current.daily_budget_usd,
                        requests_per_minute=current.requests_per_minute,
                        updated_at=now,
                        budget_period=current.budget_period.kind,
                        **{name: getattr(current, name) for name in LIMIT_FIELDS},
                    )
                )
            self.rt.store.delete_user(user, to_us(now))

        self._audited(req, "user.delete", user, settings_json(current), None, remove)
        return AdminResponse(200, {"user_id": user, "deleted": True, "deleted_at": rfc3339(now)})

    def create_grant(
        self, req: AdminRequest, p: dict[str, str], _q: Any, body: dict[str, Any]
    ) -> Handled:
        user = p["user"]
        if not self._known(user):
            raise Refused(errors.user_not_found(user))
        _no_unknown_fields(body, ("amount_usd", "expires_at", "reason"))
        for name in ("amount_usd", "expires_at", "reason"):
            if name not in body:
                raise _invalid(name, "is required")
        amount = _usd(body, "amount_usd", positive=True)
        now = self._now()
        expires = parse_rfc3339(body["expires_at"])
        if expires is None:
            raise _invalid(
                "expires_at", "must be an RFC 3339 time with an offset, e.g. 2030-01-31T00:00:00Z"
            )
        if expires <= now:
            raise _invalid("expires_at", "must be in the future")
        reason = body["reason"]
        if not text_ok(reason, MAX_REASON_CHARS):
            raise _invalid(
                "reason", f"must be a non-empty string of at most {MAX_REASON_CHARS} characters"
            )
        row = self.rt.ledger.new_grant(user, amount, expires, reason, req.user, now)
        view = grant_json(self.rt.ledger.grant_view(row, now))
        self._audited(req, "grant.create", user, None, view, lambda: self.rt.store.add_grant(row))
        return AdminResponse(201, view)

    def list_grants(self, _r: Any, p: dict[str, str], _q: Any, _b: Any) -> Handled:
        user = p["user"]
        grants = self.rt.ledger.list_grants(user, self._now())
        return AdminResponse(
            200,
            {
                "user_id": user,
                "remaining_usd": _usd_out(sum(g.remaining_usd for g in grants)),
                "grants": [grant_json(g) for g in grants],
            },
        )

    def usage(self, req: AdminRequest, _p: Any, q: dict[str, str], _b: Any) -> Handled:
        user = q.get("user")
        if user is not None:
            _user_id(user)
        _id_param(q, "tenant", tenant_id_ok, f"a tenant id of 1 to {MAX_TENANT_CHARS} {_ID_RULE}")
        if req.role != "admin":
            if user is None:
                user = req.user
            elif user != req.user:
                raise Refused(errors.forbidden("A developer may only read their own usage"))
        first, last = _days(_moment_param(q, "since"), _moment_param(q, "until"))
        tenant = q.get("tenant")
        rows = self.rt.ledger.usage(user, tenant, first, last)
        return AdminResponse(
            200,
            {
                "user_id": user,
                "tenant_id": tenant,
                "since": first,
                "until": last,
                "spend_usd": _usd_out(sum(r.spend_usd for r in rows)),
                "tokens_in": sum(r.tokens_in for r in rows),
                "tokens_out": sum(r.tokens_out for r in rows),
                "requests": sum(r.requests for r in rows),
                "models": [
                    {
                        "model": r.model,
                        "provider": r.provider,
                        "spend_usd": _usd_out(r.spend_usd),
                        "tokens_in": r.tokens_in,
                        "tokens_out": r.tokens_out,
                        "requests": r.requests,
                    }
                    for r in rows
                ],
            },
        )

    def leaderboard(self, _r: Any, _p: Any, q: dict[str, str], _b: Any) -> Handled:
        by = q.get("by", "tenant")
        if by not in ("tenant", "user"):
            raise _bad_param("by", "must be 'tenant' or 'user'")
        by_: Literal["tenant", "user"] = "tenant" if by == "tenant" else "user"
        since, until = _moment_param(q, "since"), _moment_param(q, "until")
        limit = _int_param(q, "limit", 1, MAX_LEADERBOARD_LIMIT)
        first, last = _days(since, until)
        rows = self.rt.ledger.leaderboard(by_, first, last, limit)
        return AdminResponse(
            200,
            {
                "by": by,
                "since": first,
                "until": last,
                "rows": [
                    {
                        "rank": i,
                        "key": r.key,
                        "spend_usd": _usd_out(r.spend_usd),
                        "tokens_in": r.tokens_in,
                        "tokens_out": r.tokens_out,
                        "requests": r.requests,
                    }
                    for i, r in enumerate(rows, 1)
                ],
            },
        )

    def audit(self, _r: Any, _p: Any, q: dict[str, str], _b: Any) -> Handled:
        if "user" in q:
            _user_id(q["user"])
        _id_param(q, "action", action_ok, f"an action name ([a-z0-9_], at most {MAX_ACTION_CHARS})")
        since = _moment_param(q, "since")
        limit = _int_param(q, "limit", 1, MAX_AUDIT_LIMIT)
        before_seq = _int_param(q, "before_seq", 1, MAX_SEQ)
        if isinstance(since, date) and not isinstance(since, datetime):
            since = datetime(since.year, since.month, since.day, tzinfo=UTC)
        n = limit or DEFAULT_AUDIT_LIMIT
        # entries queued by this process (an admin change just made) are shown, not missed
        self.rt.audit.flush(AUDIT_FLUSH_TIMEOUT_S)
        try:
            entries = query_entries(
                self.rt.audit.db_path,
                action=q.get("action"),
                user=q.get("user"),
                since=since,
                limit=n,
                before_seq=before_seq,
            )
        except FileNotFoundError:
            entries = []
        except sqlite3.Error:
            raise Refused(errors.governance_unavailable("the audit log cannot be read")) from None
        return AdminResponse(
            200,
            {
                "count": len(entries),
                "next_before_seq": entries[-1]["seq"] if len(entries) == n else None,
                "entries": entries,
            },
        )

    def openapi(self, _r: Any, _p: Any, _q: Any, _b: Any) -> Handled:
        return AdminResponse(200, openapi_document())

    # -- the policy in force (admin/policy_view.py) -------------------------------------------

    def policy(self, req: AdminRequest, _p: Any, _q: Any, _b: Any) -> Handled:
        from candela_mitm.admin.policy_view import policy_view  # it builds on this module

        return AdminResponse(200, policy_view(self, req))
