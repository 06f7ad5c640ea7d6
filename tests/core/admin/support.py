"""Helpers of the admin API tests: the users, a call through AdminApi checked against the
OpenAPI document, the committed admin actions, spend."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from candela_mitm.admin.handlers import AdminApi
from candela_mitm.admin.openapi import openapi_document
from candela_mitm.admin.routes import AdminRequest, AdminResponse, match_route
from candela_mitm.audit import query_entries
from candela_mitm.governance.ledger import Reservation
from candela_mitm.runtime import Runtime

ADMIN = "admin@example.com"
ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"
ROLES = {ADMIN: "admin", ALICE: "developer", BOB: "developer", CAROL: "developer"}
DOC = openapi_document()
_REGISTRY = Registry().with_resource("urn:candela-admin", DRAFT202012.create_resource(DOC))

TODAY = datetime.now(UTC).date().isoformat()
YESTERDAY = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
LIMITS = ("max_concurrent_requests", "input_tokens_per_minute", "output_tokens_per_minute",
          "total_tokens_per_minute")


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def q(user: str) -> str:
    return user.replace("@", "%40")


def future(days: float = 1.0) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")

def _schema_of(path: str, method: str, status: int) -> dict[str, Any]:
    """The documented response schema of this call: every answer must be documented."""
    matched = match_route(path)
    routes = [] if not isinstance(matched, tuple) else matched[0]
    route = next((r for r in routes if r.method == method), None)
    if route is None or status == 405:
        return {"$ref": "urn:candela-admin#/components/schemas/Error"}
    responses = DOC["paths"][route.template][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {route.template} answers {status}, undocumented"
    resp = responses[str(status)]
    if "$ref" in resp:
        resp = DOC["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
    ref = resp["content"]["application/json"]["schema"]["$ref"]
    return {"$ref": "urn:candela-admin" + ref}


def call(
    rt: Runtime,
    method: str,
    path: str,
    body: Any = None,
    as_: str = ADMIN,
    raw: bytes | None = None,
    key_scope: Any = None,
) -> AdminResponse:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    resp = AdminApi(rt).handle(
        AdminRequest(method, path, as_, ROLES[as_], data, "api_key", "span-1", key_scope)
    )
    json.dumps(resp.payload)  # the addon sends it as JSON
    Draft202012Validator(_schema_of(path, method, resp.status), registry=_REGISTRY).validate(
        resp.payload
    )
    if resp.status >= 400:
        assert set(resp.payload) >= {"error", "message"}
    return resp


def admin_actions(rt: Runtime) -> list[dict[str, Any]]:
    """Committed admin_action entries, oldest first."""
    assert rt.audit.flush(5)
    entries = query_entries(rt.audit.db_path, action="admin_action", limit=1000)
    return [e["fields"] for e in reversed(entries)]


def spend(
    rt: Runtime, user: str, cost: float, tenant: str | None = "research-team", **kw: Any
) -> None:
    budget = rt.users.settings(user).daily_budget_usd  # settle draws this allowance first
    r = rt.ledger.reserve(user, tenant, 0.0, budget, "req", **kw)
    assert isinstance(r, Reservation)
    assert rt.ledger.settle(r, cost, 100, 10, "gpt-4o", "openai", **kw).applied


GRANT = {"amount_usd": 2.0, "expires_at": "2099-01-01T00:00:00Z", "reason": "launch week"}
