"""Errors and denials: every refusal Candela answers is built here, as JSON with a snake_case code.

Exceptions::

    CandelaError
     +-- ConfigError        a config file that cannot be used (start refused)
     +-- StoreUnavailable   the state store cannot answer (governance fails closed: 503)
     +-- Refused            a request refused deep in a handler; carries the Denial to answer

A `Denial` is the answer itself (status, code, message, fields, headers); the functions below
build every one Candela sends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class CandelaError(Exception):
    """Base of Candela's own exceptions."""


class ConfigError(CandelaError):
    """A config file that cannot be used; the message names file, key path and reason."""


class StoreUnavailable(CandelaError):
    """The state store cannot be read or written: governance fails closed on it."""


@dataclass(frozen=True)
class Denial:
    """A refusal as the client receives it: JSON {"error": code, "message": ..., **fields}."""

    status: int
    error: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, **self.fields}

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode()


class Refused(CandelaError):
    """Raised where a request is found wanting, caught once where the answer is made."""

    def __init__(self, denial: Denial) -> None:
        super().__init__(f"{denial.status} {denial.error}: {denial.message}")
        self.denial = denial


def bad_request(message: str, **fields: Any) -> Denial:
    return Denial(400, "bad_request", message, fields)


def invalid_field(name: str, why: str) -> Denial:
    """A body field out of range or of the wrong format: 400 invalid_parameter naming it."""
    return Denial(400, "invalid_parameter", f"'{name}' {why}", {"field": name})


def invalid_parameter(name: str, why: str, where: str = "Query") -> Denial:
    """A query (or `where="Path"`) parameter out of range or of the wrong format: 400
    invalid_parameter naming it."""
    return Denial(
        400,
        "invalid_parameter",
        f"{where} parameter '{name}' {why}",
        {"field": name, "parameter": name},
    )


def invalid_json(detail: str) -> Denial:
    return Denial(400, "invalid_json", f"The request body is not valid JSON: {detail}")


def model_mismatch(path_model: str, body_model: str) -> Denial:
    return Denial(
        400,
        "model_mismatch",
        f"The URL names model '{path_model}' but the body names '{body_model}'",
        {"path_model": path_model, "body_model": body_model},
    )


def unknown_model(model: str) -> Denial:
    return Denial(
        404,
        "model_not_found",
        f"Model '{model}' is not served here: no provider route knows it",
        {"model": model},
    )


def not_found(path: str) -> Denial:
    return Denial(404, "not_found", f"No route for '{path}'", {"path": path})


def method_not_allowed(method: str, path: str, allowed: tuple[str, ...] = ()) -> Denial:
    headers = {"Allow": ", ".join(allowed)} if allowed else {}
    fields = {"allowed": list(allowed)} if allowed else {}
    return Denial(
        405, "method_not_allowed", f"{method} is not allowed on '{path}'", fields, headers
    )


def user_not_found(user: str) -> Denial:
    return Denial(404, "user_not_found", f"There is no user '{user}'", {"user_id": user})


def key_not_found(key_id: str) -> Denial:
    return Denial(404, "key_not_found", f"There is no API key '{key_id}'", {"key_id": key_id})


def payload_too_large(limit: int) -> Denial:
    return Denial(
        413,
        "payload_too_large",
        f"The request body exceeds the limit of {limit} bytes",
        {"limit_bytes": limit},
    )


def request_header_too_large(limit: int) -> Denial:
    return Denial(
        431,
        "request_header_too_large",
        f"The request head exceeds the limit of {limit} bytes",
        {"limit_bytes": limit},
    )


def request_timeout(what: str, seconds: float) -> Denial:
    return Denial(
        408, "request_timeout", f"The request {what} did not arrive within {seconds:g} s"
    )


def too_many_connections(limit: int) -> Denial:
    return Denial(
        429,
        "too_many_connections",
        f"This address already has {limit} connections open; reuse one",
        {"limit": limit},
        {"Retry-After": "1"},
    )


def unsupported_encoding(encoding: str) -> Denial:
    return Denial(
        415,
        "unsupported_encoding",
        f"Content-Encoding '{encoding}' is not accepted; send identity, gzip, deflate, br or zstd",
    )


def unsupported_media_type(content_type: str | None) -> Denial:
    return Denial(
        415,
        "unsupported_media_type",
        f"Content-Type '{(content_type or '')[:100]}' is not accepted here; send "
        "Content-Type: application/json",
    )


def host_not_allowed(host: str | None) -> Denial:
    return Denial(
        403,
        "host_not_allowed",
        f"Host '{(host or '')[:100]}' is not this machine's Candela: connect to "
        "http://127.0.0.1 or http://localhost on Candela's port",
    )


def unauthenticated(message: str = "A valid credential is required") -> Denial:
    return Denial(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})


def user_not_enrolled(user: str) -> Denial:
    return Denial(
        403,
        "user_not_enrolled",
        f"'{user}' is verified but not a user of this deployment: ask an admin to create it "
        "(PUT /admin/v1/users/{user})",
        {"user_id": user},
    )


def forbidden(message: str) -> Denial:
    return Denial(403, "forbidden", message)


def tenant_not_allowed(user: str, tenant: str) -> Denial:
    return Denial(
        403,
        "tenant_not_allowed",
        f"User '{user}' may not act for tenant '{tenant}'",
        {"user_id": user, "tenant_id": tenant},
    )


def model_not_allowed(
    model: str, tenant: str | None, policy: str, key_id: str | None = None
) -> Denial:
    """`key_id`: the minted key whose own model patterns refused (named in the answer)."""
    if key_id is not None:
        return Denial(
            403,
            "model_not_allowed",
            f"Model '{model}' is not among the models API key '{key_id}' may use",
            {"model": model, "tenant_id": tenant, "policy": policy, "key_id": key_id},
        )
    where = f"tenant '{tenant}'" if tenant else "this deployment"
    return Denial(
        403,
        "model_not_allowed",
        f"Model '{model}' is not in the approved model list for {where}"
        if policy == "allowlist"
        else f"Model '{model}' is blocked by the model policy for {where}",
        {"model": model, "tenant_id": tenant, "policy": policy},
    )


def budget_exceeded(
    user: str,
    budget_usd: float,
    spent_usd: float,
    remaining_usd: float,
    estimated_cost_usd: float,
    resets_at: str,
    scope: str = "user",
    period: str = "daily",
    tenant: str | None = None,
    key_id: str | None = None,
) -> Denial:
    """`scope` names whose budget refused (the user's, the tenant's or the API key's: then
    `key_id` names the key), `period` its span."""
    whose = "your"
    if scope == "tenant":
        whose = f"tenant '{tenant}''s"
    elif scope == "key":
        whose = f"API key '{key_id}''s"
    fields: dict[str, Any] = {
        "user_id": user,
        "tenant_id": tenant,
        "scope": scope,
        "period": period,
        "budget_usd": round(budget_usd, 6),
        "spent_usd": round(spent_usd, 6),
        "remaining_usd": round(remaining_usd, 6),
        "estimated_cost_usd": round(estimated_cost_usd, 6),
        "resets_at": resets_at,
    }
    if scope == "key":
        fields["key_id"] = key_id
    return Denial(
        402,
        "budget_exceeded",
        f"Estimated cost ${estimated_cost_usd:.6f} exceeds the ${remaining_usd:.6f} "
        f"left of {whose} {period} budget",
        fields,
    )


def model_price_unknown(model: str) -> Denial:
    return Denial(
        402,
        "model_price_unknown",
        f"Model '{model}' has no price, and unknown_model_price is deny",
        {"model": model},
    )


_LIMIT_SENTENCES = {
    "requests": "More than {limit} requests in the last minute",
    "input_tokens": "More than {limit} input tokens in the last minute",
    "output_tokens": "More than {limit} output tokens in the last minute",
    "total_tokens": "More than {limit} tokens in the last minute",
    "concurrency": "More than {limit} requests in flight at once",
}


def rate_limited(
    limit: int,
    window_resets_at: str,
    retry_after_s: int,
    limit_kind: str = "requests",
    headers: dict[str, str] | None = None,
    scope: str = "user",
) -> Denial:
    """`limit_kind`: requests, input_tokens, output_tokens, total_tokens or concurrency;
    `scope`: whose limit refused, the user's or (tokens, concurrency) the tenant's."""
    sentence = _LIMIT_SENTENCES[limit_kind].format(limit=limit)
    if scope != "user":
        sentence += f" for the {scope}"
    return Denial(
        429,
        "rate_limited",
        sentence,
        {
            "limit_kind": limit_kind,
            "scope": scope,
            "limit": limit,
            "window_resets_at": window_resets_at,
            "retry_after_s": retry_after_s,
        },
        headers={**(headers or {}), "Retry-After": str(retry_after_s)},
    )


def runtime_action_failed(status: int, message: str) -> Denial:
    """`candela`'s management API could not start or stop a local runtime (409, or 5xx)."""
    return Denial(status, "runtime_action_failed", message)


def misdirected(sni: str, host: str | None) -> Denial:
    """Transparent mode: the Host header names another host than the TLS connection's SNI."""
    return Denial(
        421,
        "misdirected_request",
        f"The request names host '{host or ''}' but its TLS connection was opened for '{sni}'",
        {"sni": sni, "host": host},
    )


def region_not_configured(route: str, sni: str, upstream_host: str) -> Denial:
    """Transparent mode: an app called a provider host (region) the route is not set up for."""
    return Denial(
        421,
        "misdirected_request",
        f"Provider route '{route}' is configured for '{upstream_host}', not '{sni}': "
        f"set providers.{route}.region or base_url",
        {"sni": sni, "provider": route, "upstream_host": upstream_host},
    )


def proxy_request_denied(method: str, target: str) -> Denial:
    """Transparent mode: an intercepted app addressed a request to another proxy."""
    return Denial(
        403,
        "proxy_not_allowed",
        "Requests addressed to another proxy are not allowed from an intercepted connection",
        {"method": method, "target": target[:200]},
    )


def host_not_intercepted(host: str | None) -> Denial:
    """Transparent mode: a request for a host that is not a provider Candela governs."""
    return Denial(
        403,
        "host_not_intercepted",
        f"'{host or ''}' is not a provider host Candela governs",
        {"host": host},
    )


def foreign_provider_key(route: str, fingerprint: str | None) -> Denial:
    """Transparent mode, keys not replaced: the app's provider key is not the organisation's."""
    return Denial(
        403,
        "foreign_provider_key",
        f"This provider key is not one of the organisation's: requests to '{route}' from "
        "intercepted applications must use an organisation key",
        {"provider": route, "key_fingerprint": fingerprint},
    )


def governance_unavailable(reason: str) -> Denial:
    return Denial(
        503,
        "governance_unavailable",
        f"Candela cannot decide on this request ({reason}); it was not forwarded",
    )


def upstream_unreachable(provider: str, detail: str) -> Denial:
    return Denial(
        502,
        "upstream_unreachable",
        f"Provider '{provider}' could not be reached: {detail}",
        {"provider": provider},
    )


def upstream_timeout(provider: str, seconds: float) -> Denial:
    return Denial(
        504,
        "upstream_timeout",
        f"Provider '{provider}' did not answer within {seconds:g} s",
        {"provider": provider},
    )


def upstream_credentials(provider: str) -> Denial:
    # No detail: which environment variable or file is missing is for the operator's log.
    return Denial(
        502,
        "upstream_credentials_unavailable",
        f"The provider credential for '{provider}' is not available; ask the operator "
        "(the proxy's log says why)",
        {"provider": provider},
    )


def endpoint_not_governed(
    method: str, path: str, provider: str | None, reason: str | None = None
) -> Denial:
    why = f": {reason}" if reason else ""
    return Denial(
        404,
        "endpoint_not_governed",
        f"{method} {path} is not an operation Candela governs on this route{why}; nothing was "
        f"forwarded",
        {"method": method, "path": path, "provider": provider, **({"reason": reason} if reason else {})},
    )


def job_not_owned(provider: str, job_id: str) -> Denial:
    """A job's result asked by someone other than its creator, or a job Candela did not see
    created: the organisation's credential would read another user's (or anyone's) job."""
    return Denial(
        403,
        "job_not_owned",
        f"Job '{job_id}' was not created through Candela by you; only its creator (or an admin) "
        "reads it. Nothing was forwarded",
        {"provider": provider, "job_id": job_id},
    )


def batch_file_not_governed(provider: str, file_id: str) -> Denial:
    """A batch naming an input file Candela did not see uploaded (by this user, as a batch's
    input): its models and size were never checked, so nothing can be reserved for it."""
    return Denial(
        403,
        "batch_file_not_governed",
        f"File '{file_id}' was not uploaded through Candela by you as a batch's input "
        "(purpose=batch); upload it through Candela first. Nothing was forwarded",
        {"provider": provider, "file_id": file_id},
    )


def invalid_request_target(reason: str) -> Denial:
    return Denial(
        400,
        "invalid_request_target",
        f"The request target cannot be forwarded: {reason}",
        {"reason": reason},
    )


# WebSocket sessions (addons/websocket.py). The first is an HTTP answer to the upgrade; the
# others end an open session: the client receives them as an error event in its provider's
# shape, then a close frame (1008, or 1009 for a frame too large).


def websocket_sessions_exceeded(user: str, limit: int) -> Denial:
    return Denial(
        429,
        "websocket_sessions_exceeded",
        f"User '{user}' already has {limit} WebSocket sessions open, the most allowed",
        {"user_id": user, "limit": limit},
    )


def websocket_frame_too_large(limit: int, size: int) -> Denial:
    return Denial(
        413,
        "websocket_frame_too_large",
        f"A WebSocket message of {size} bytes exceeds the {limit}-byte limit; the session is "
        f"closed",
        {"limit_bytes": limit, "size_bytes": size},
    )


def websocket_rate_limited(limit: int) -> Denial:
    return Denial(
        429,
        "websocket_rate_limited",
        f"More than {limit} WebSocket messages in one second; the session is closed",
        {"limit": limit},
    )


def websocket_idle_timeout(seconds: float) -> Denial:
    return Denial(
        408,
        "websocket_idle_timeout",
        f"No WebSocket message either way for {seconds:g} seconds; the session is closed",
        {"idle_timeout_s": seconds},
    )


def session_budget_exhausted(
    user: str,
    budget_usd: float,
    session_cost_usd: float,
    scope: str = "user",
    period: str = "daily",
    tenant: str | None = None,
    key_id: str | None = None,
    spent_usd: float | None = None,
    remaining_usd: float | None = None,
    resets_at: str | None = None,
) -> Denial:
    """budget_exceeded for an open session: the last usage frame left no slice to hold on the
    budget `scope` names (the user's, the tenant's or the API key's: then `key_id`)."""
    whose = "Your"
    if scope == "tenant":
        whose = f"Tenant '{tenant}''s"
    elif scope == "key":
        whose = f"API key '{key_id}''s"
    fields: dict[str, Any] = {
        "user_id": user,
        "tenant_id": tenant,
        "scope": scope,
        "period": period,
        "budget_usd": round(budget_usd, 6),
        "session_cost_usd": round(session_cost_usd, 6),
    }
    if spent_usd is not None:
        fields["spent_usd"] = round(spent_usd, 6)
    if remaining_usd is not None:
        fields["remaining_usd"] = round(remaining_usd, 6)
    if resets_at is not None:
        fields["resets_at"] = resets_at
    if scope == "key":
        fields["key_id"] = key_id
    return Denial(
        402,
        "budget_exceeded",
        f"{whose} {period} budget cannot fund more of this WebSocket session; it is closed",
        fields,
    )


def websocket_model_required(operation: str) -> Denial:
    return Denial(
        400,
        "websocket_model_required",
        f"The first message of a {operation} session must name a model Candela can check "
        f"(setup.model or response.create's model); nothing was forwarded",
        {"operation": operation},
    )
