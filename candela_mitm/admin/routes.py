"""Admin API routes: the /admin/v1 route table of admin-api.md and the matching of a call to it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from candela_mitm import errors
from candela_mitm.admin.params import MAX_ACTION_CHARS, action_ok, key_id_ok, tenant_id_ok
from candela_mitm.admin.parsing import ID_RULE, bad_param, check_id_param, parse_user_id
from candela_mitm.errors import Denial, Refused
from candela_mitm.governance.identity import KeyScope
from candela_mitm.governance.tenancy import MAX_TENANT_CHARS

PREFIX = "/admin/v1"

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


def match_route(path: str) -> tuple[list[Route], dict[str, str]] | Denial:
    """The routes whose template fits `path` (any method) and the decoded path parameters,
    or the Denial of a path that cannot be decoded.

    Segments are split before percent-decoding, so a user id may hold an encoded '/'.
    """
    try:
        return find_routes(path)
    except Refused as r:
        return r.denial


def find_routes(path: str) -> tuple[list[Route], dict[str, str]]:
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


def _bad_path(name: str, why: str) -> Refused:
    return Refused(errors.invalid_parameter(name, why, where="Path"))


def check_path_params(p: Mapping[str, str]) -> None:
    """The path parameters' formats (admin/params.py), refused with 400 naming the parameter."""
    if "user" in p:
        parse_user_id(p["user"], "user", _bad_path)
    if "tenant" in p and not tenant_id_ok(p["tenant"]):
        raise _bad_path("tenant", f"must be a tenant id of 1 to {MAX_TENANT_CHARS} {ID_RULE}")
    if "key" in p and not key_id_ok(p["key"]):
        raise _bad_path("key", "must be a key id: k_ and 16 hex digits")


def check_query_ids(q: Mapping[str, str]) -> None:
    """The id-shaped query parameters' formats, for every route and role (a tenant admin's
    scoped handlers included), refused with 400 naming the parameter."""
    if "user" in q:
        parse_user_id(q["user"])
    check_id_param(q, "tenant", tenant_id_ok, f"a tenant id of 1 to {MAX_TENANT_CHARS} {ID_RULE}")
    check_id_param(q, "action", action_ok, f"an action name ([a-z0-9_], at most {MAX_ACTION_CHARS})")


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
            raise bad_param(name, f"is not known here (accepted: {known})")
        if name in seen:
            raise bad_param(name, "is given more than once")
        seen.add(name)
        if value != "":
            out[name] = value
    return out

