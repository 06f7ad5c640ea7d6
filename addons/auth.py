"""Auth: who is calling (401 otherwise) and which tenant they act for (403 if not theirs)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from types import MappingProxyType

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.errors import Denial
from candela_mitm.governance.credentials import (
    SOURCE_AUTHORIZATION,
    SOURCE_X_API_KEY,
    SOURCE_X_CANDELA_AUTH,
    SOURCE_X_GOOG_API_KEY,
    MalformedCredential,
    extract_credential,
)
from candela_mitm.governance.tenancy import TENANT_HEADER, requested_tenant, resolve_tenant
from candela_mitm.governance.users import enrollment_denial
from candela_mitm.runtime import Runtime

from .flowstate import answered, ctx_of, deny, fail_closed

# Routes that answer without knowing the caller.
_PUBLIC = ("health",)
_JWT_SHAPED = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_CREDENTIAL_HEADERS = frozenset(
    {SOURCE_AUTHORIZATION, SOURCE_X_API_KEY, SOURCE_X_GOOG_API_KEY, SOURCE_X_CANDELA_AUTH}
)
_TENANT_HEADERS = frozenset({TENANT_HEADER.encode(), b"baggage"})  # what requested_tenant reads


def names_tenant(headers: http.Headers) -> bool:
    """Whether the head holds a header that can name a tenant: one pass over the raw fields,
    where requested_tenant's four Headers lookups (each a pass through the Mapping ABC)
    cost about 6 µs on the many requests that send none."""
    for k, _ in headers.fields:
        if k.lower() in _TENANT_HEADERS:
            return True
    return False


def foreign_credential(headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
    """A key meant for someone else: apps built for LM Studio or Ollama send a dummy one
    ("lm-studio"; the openai SDK insists on a key). Not X-Candela-Auth, not JWT-shaped (an ID
    token that fails is an identity that failed), and well formed. Where auth is not required it
    is ignored, which grants nothing: sending no credential at all gets the same principal."""
    try:
        cred = extract_credential(headers, query)
    except MalformedCredential:
        return False
    if cred is None:
        return False
    source, token = cred
    return source != SOURCE_X_CANDELA_AUTH and not _JWT_SHAPED.fullmatch(token)


def without_credentials(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers minus the caller's credential (Proxy-Authorization, IAP's, stays checked)."""
    return {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}


def plain_headers(headers: http.Headers) -> dict[str, str]:
    """The headers as dict(headers.items()) has them (first spelling of a name, repeated values
    joined with ", "), read in one pass: Headers.items() looks every name up again (O(n²)),
    and authentication lower-cases them twice per request (issue 7's profile)."""
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    for k, v in headers.fields:
        name = k.decode("utf-8", "surrogateescape")
        value = v.decode("utf-8", "surrogateescape")
        low = name.lower()
        if low in first:
            out[first[low]] += ", " + value
        else:
            first[low] = name
            out[name] = value
    return out


_NO_QUERY: Mapping[str, str] = MappingProxyType({})


def query_of(request: http.Request) -> Mapping[str, str]:
    """The request's query (where `?key=` can carry a credential); for a path without one, an
    empty mapping without mitmproxy's parse (`Request.query` parses the path on every read:
    4 µs warm)."""
    return request.query if b"?" in request.data.path else _NO_QUERY


class Auth:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.kind in _PUBLIC:
            return
        if c.principal is None:  # transparent sandboxes are attributed before this
            headers = plain_headers(flow.request.headers)
            query = query_of(flow.request)
            result = await self.rt.authenticator.authenticate(headers, query)
            if (
                isinstance(result, Denial)
                and result.status == 401
                and not self.rt.auth_required
                and foreign_credential(headers, query)
            ):
                # the caller is who they would be with no credential at all: the OS user
                result = await self.rt.authenticator.authenticate(
                    without_credentials(headers), {}
                )
            if isinstance(result, Denial):
                deny(flow, result)
                return
            c.principal = result
        users = self.rt.users
        user = c.principal.user
        settings = users.recent(user)
        if settings is None:  # not read within its TTL by this process
            settings = await self.rt.store_call(users.settings_cached, user)
        elif (delay := users.ahead(user)) is not None:  # read again before it expires
            self.rt.read_ahead(("user", user), delay, users.settings_cached, user)
        if settings.deleted:
            deny(flow, errors.unauthenticated("This user has been removed"))
            return
        refusal = enrollment_denial(
            settings, c.principal.via, self.rt.config.auth.allow_unknown_users
        )
        if refusal is not None:
            deny(flow, refusal)
            return
        if settings.role != c.principal.role:
            c.principal = dataclasses.replace(c.principal, role=settings.role)
        c.settings = settings
        head = flow.request.headers
        requested = requested_tenant(head) if names_tenant(head) else None
        tenant = resolve_tenant(c.principal.user, requested, list(settings.tenants))
        if isinstance(tenant, Denial):
            deny(flow, tenant)
            return
        c.tenant = tenant
