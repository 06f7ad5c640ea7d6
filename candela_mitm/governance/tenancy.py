"""Tenancy: which tenant a request acts for, named by header or W3C Baggage, checked against the user."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote

from candela_mitm import errors
from candela_mitm.errors import Denial

TENANT_HEADER = "x-candela-tenant-id"
BAGGAGE_KEY = "candela.tenant_id"
MAX_TENANT_CHARS = 128


def tenant_from_baggage(baggage: str) -> str | None:
    """The `candela.tenant_id` member of a W3C Baggage header, if any (properties ignored)."""
    for member in baggage.split(","):
        kv, _, _props = member.partition(";")
        key, eq, value = kv.partition("=")
        if eq and key.strip() == BAGGAGE_KEY:
            return unquote(value.strip()) or None
    return None


def requested_tenant(headers: Mapping[str, str]) -> str | None:
    """X-Candela-Tenant-Id wins over Baggage."""
    value = headers.get(TENANT_HEADER) or headers.get(TENANT_HEADER.title())
    if value is not None and value.strip():
        return value.strip()
    baggage = headers.get("baggage") or headers.get("Baggage")
    if baggage:
        return tenant_from_baggage(baggage)
    return None


def resolve_tenant(user: str, requested: str | None, tenants: list[str]) -> str | None | Denial:
    """The tenant a principal acts for: the one named if it is theirs, else their first (or None)."""
    if requested is None:
        return tenants[0] if tenants else None
    if len(requested) > MAX_TENANT_CHARS or any(ord(c) < 0x20 for c in requested):
        return errors.bad_request("the tenant id is not valid")
    if requested in tenants:
        return requested
    return errors.tenant_not_allowed(user, requested)
