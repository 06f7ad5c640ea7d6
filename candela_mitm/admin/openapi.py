"""OpenAPI: the OpenAPI 3.1 document of the admin API (GET /admin/v1/openapi.json)."""

from __future__ import annotations

import copy
import functools
from typing import Any

from candela_mitm.admin import params
from candela_mitm.governance.tenancy import MAX_TENANT_CHARS

OPENAPI_VERSION = "3.1.0"
_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], props: dict[str, Any], extra: bool = False) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": extra,
    }


def _closed(props: dict[str, Any]) -> dict[str, Any]:
    """A response object: every property always present, nothing else."""
    return _obj(list(props), props)


_USD = {"type": "number", "minimum": 0}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_DAY_OR_NULL = {"type": ["string", "null"], "format": "date"}
_TIME = {"type": "string", "format": "date-time"}
_ROLE = {
    "type": "string",
    "enum": ["admin", "tenant_admin", "developer"],
    "description": "tenant_admin: manages only the tenants in its own `tenants`",
}
_TENANTS = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 128}}
# Inputs: exactly what the validators accept (admin/params.py holds both sides' rules).
_USER_ID_IN = {
    "type": "string",
    "minLength": 1,
    "maxLength": params.MAX_USER_CHARS,
    "pattern": params.ID_PATTERN,
    "description": "no control characters, no surrounding spaces",
}
_TENANT_ID_IN = {**_USER_ID_IN, "maxLength": MAX_TENANT_CHARS}
_KEY_ID_IN = {
    "type": "string",
    "pattern": params.KEY_ID_PATTERN,
    "description": "k_ and 16 hex digits",
}
# RFC 3339 with an offset, written in years 1970 to 9998 (the pattern; the format rules out
# days not in the calendar)
_TIME_IN = {"type": "string", "format": "date-time", "pattern": params.TIME_PATTERN}
_MOMENT_IN = {
    "anyOf": [{"type": "string", "format": "date", "pattern": params.DAY_PATTERN}, _TIME_IN],
}
_USD_IN = {"type": "number", "minimum": 0, "maximum": params.MAX_USD}
_LIMIT = {"type": ["integer", "null"], "minimum": 0, "description": "null: no limit"}
_LIMITS = {
    "max_concurrent_requests": {**_LIMIT, "description": "requests in flight at once; null: no limit"},
    "input_tokens_per_minute": _LIMIT,
    "output_tokens_per_minute": _LIMIT,
    "total_tokens_per_minute": _LIMIT,
}
_LIMITS_IN = {
    name: {"type": ["integer", "null"], "minimum": 0, "maximum": params.MAX_LIMIT}
    for name in _LIMITS
}
KEY_PROPS: dict[str, Any] = {
            "id": {**_STR, "description": "the key's public name, for listing and revoking"},
            "user_id": _STR,
            "name": _STR,
            "fingerprint": {
                **_STR,
                "description": "the first 8 hex digits of the key's SHA-256, as audit entries "
                "name the key that made a request",
            },
            "state": {"type": "string", "enum": ["active", "revoked", "expired"]},
            "created_at": _TIME,
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
            "revoked_at": {"type": ["string", "null"], "format": "date-time"},
            "actor": {**_STR, "description": "who minted it"},
            "models": {
                "type": "array",
                "items": _STR,
                "description": "the models the key may use (names or fnmatch patterns), besides "
                "what its user's policy allows; []: whatever its user may use",
            },
            "budget_usd": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "description": "a part of its user's budget the key may spend per its user's "
                "period (kept by rotation: the rotated key spends from the same budget); "
                "null: its user's budget",
            },
        }
_PERIOD = {
    "type": "string",
    "enum": ["daily", "weekly", "monthly"],
    "description": "the span a budget covers, from midnight in governance.budgets.time_zone "
    "(weeks from Monday, months from the 1st)",
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every error: a snake_case code, a sentence, and the fields to act on.",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
            "message": _STR,
            "field": {"type": "string", "description": "the body field that is not valid"},
            "parameter": {"type": "string", "description": "the query parameter not valid"},
            "user_id": _STR,
            "allowed": {"type": "array", "items": _STR},
        },
        "additionalProperties": True,
    },
    "User": _closed(
        {
            "user_id": _STR,
            "role": _ROLE,
            "tenants": _TENANTS,
            "daily_budget_usd": {**_USD, "description": "the budget per budget_period"},
            "budget_period": _PERIOD,
            "requests_per_minute": _INT,
            **_LIMITS,
            "source": {
                "type": "string",
                "enum": ["store", "config", "default"],
                "description": "where the settings come from: the admin API, config, defaults",
            },
            "spent_today_usd": _USD,
        }
    ),
    "UserUpdate": {
        "type": "object",
        "description": "Partial: fields left out keep the user's settings in force.",
        "properties": {
            "role": _ROLE,
            "tenants": {
                "type": "array",
                "items": _TENANT_ID_IN,
                "maxItems": params.MAX_TENANTS,
                "uniqueItems": True,
            },
            "daily_budget_usd": _USD_IN,
            "budget_period": _PERIOD,
            "requests_per_minute": {"type": "integer", "minimum": 0, "maximum": params.MAX_RPM},
            **_LIMITS_IN,
        },
        "additionalProperties": False,
    },
    "Tenant": _closed(
        {
            "tenant_id": _STR,
            "budget_usd": {
                "type": ["number", "null"],
                "minimum": 0,
                "description": "null: no budget of the tenant's own (its users' still apply)",
            },
            "period": _PERIOD,
            "time_zone": _STR,
            "source": {"type": "string", "enum": ["store", "config", "default"]},
            "spent_usd": {**_USD, "description": "this period, by every user of the tenant"},
            "reserved_usd": {**_USD, "description": "held by requests in flight and by the proxies' budget slices (governance.budgets.slices)"},
            "remaining_usd": {"type": ["number", "null"], "minimum": 0},
            "period_starts_at": _TIME,
            "resets_at": _TIME,
            **_LIMITS,
        }
    ),
    "ApiKey": _closed(KEY_PROPS),
    "ApiKeyCreated": _closed(
        {
            **KEY_PROPS,
            "key": {
                **_STR,
                "description": "the key itself, shown this once: Candela keeps only its SHA-256",
            },
        }
    ),
    "ApiKeyRotated": _closed(
        {
            **KEY_PROPS,
            "key": {**_STR, "description": "the new key, shown this once"},
            "replaces": {**_ref("ApiKey"), "description": "the old key, with its grace expiry"},
        }
    ),
    "ApiKeyRotate": {
        "type": "object",
        "properties": {
            "grace_s": {
                "type": "integer",
                "minimum": 0,
                "maximum": params.MAX_ROTATION_GRACE_S,
                "default": params.DEFAULT_ROTATION_GRACE_S,
                "description": "how long the old key keeps working",
            }
        },
        "additionalProperties": False,
    },
    "ApiKeyList": _closed(
        {
            "user_id": {**_STR_OR_NULL, "description": "null: every user's keys"},
            "count": _INT,
            "keys": {"type": "array", "items": _ref("ApiKey")},
        }
    ),
    "ApiKeyCreate": {
        "type": "object",
        "properties": {
            "user_id": {
                **_USER_ID_IN,
                "description": "default: the caller; a developer may name only themselves",
            },
            "name": {"type": "string", "maxLength": params.MAX_REASON_CHARS},
            "expires_at": {
                **_TIME_IN,
                "type": ["string", "null"],
                "description": "RFC 3339 with an offset, in the future; null or absent: never",
            },
            "models": {
                "type": "array",
                "minItems": 1,
                "maxItems": params.MAX_KEY_MODELS,
                "items": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": params.MAX_MODEL_PATTERN_CHARS,
                    "pattern": "^[^\\x00-\\x1f]*$",
                },
                "description": "narrow the key to these models (names or patterns such as "
                "gpt-4o-mini or claude-sonnet-*): a request must be allowed by its user's policy "
                "and match one, else 403 model_not_allowed naming the key (key_id)",
            },
            "budget_usd": {
                "type": ["number", "null"],
                "minimum": params.MIN_GRANT_USD,
                "maximum": params.MAX_USD,
                "description": "a budget of the key's own, a part of its user's (at most the "
                "user's budget now), per the user's period: a request must fit it as well as the "
                "user's and tenant's, else 402 budget_exceeded with scope key and key_id",
            },
        },
        "additionalProperties": False,
    },
    "TenantList": _closed(
        {"count": _INT, "tenants": {"type": "array", "items": _ref("Tenant")}}
    ),
    "TenantUpdate": {
        "type": "object",
        "description": "Partial: fields left out keep the tenant's settings in force.",
        "properties": {
            "budget_usd": {**_USD_IN, "type": ["number", "null"]},
            "period": _PERIOD,
            **_LIMITS_IN,
        },
        "additionalProperties": False,
    },
    "UserList": _closed(
        {
            "day": {"type": "string", "format": "date"},
            "count": _INT,
            "users": {"type": "array", "items": _ref("User")},
        }
    ),
    "UserDeleted": _closed(
        {"user_id": _STR, "deleted": {"type": "boolean", "const": True}, "deleted_at": _TIME}
    ),
    "Grant": _closed(
        {
            "id": _STR,
            "user_id": _STR,
            "amount_usd": _USD,
            "used_usd": _USD,
            "held_usd": {**_USD, "description": "held by requests in flight"},
            "remaining_usd": {**_USD, "description": "0 once expired"},
            "expires_at": _TIME,
            "expired": {"type": "boolean"},
            "reason": _STR,
            "actor": {**_STR, "description": "the admin who granted it"},
            "created_at": _TIME,
        }
    ),
    "GrantCreate": _obj(
        ["amount_usd", "expires_at", "reason"],
        {
            "amount_usd": {**_USD_IN, "minimum": params.MIN_GRANT_USD},
            "expires_at": {**_TIME_IN, "description": "RFC 3339 with an offset, in the future"},
            "reason": {
                "type": "string",
                "minLength": 1,
                "maxLength": params.MAX_REASON_CHARS,
                "pattern": params.TEXT_PATTERN,
                "description": "not only spaces",
            },
        },
    ),
    "GrantList": _closed(
        {
            "user_id": _STR,
            "remaining_usd": {**_USD, "description": "the sum over unexpired grants"},
            "grants": {"type": "array", "items": _ref("Grant")},
        }
    ),
    "Me": _closed(
        {
            "user_id": _STR,
            "role": _ROLE,
            "via": {
                "type": ["string", "null"],
                "enum": ["api_key", "oidc", "access_token", "local", None],
            },
            "tenants": _TENANTS,
            "day": {"type": "string", "format": "date", "description": "today, in UTC"},
            "daily_budget_usd": {**_USD, "description": "the budget per budget_period"},
            "budget_period": _PERIOD,
            "period_starts_at": _TIME,
            "spent_today_usd": {**_USD, "description": "spent on the UTC day `day`"},
            "spent_period_usd": {**_USD, "description": "spent in the current budget period"},
            "reserved_usd": {**_USD, "description": "held by requests in flight and by the proxies' budget slices (governance.budgets.slices)"},
            "remaining_usd": {
                **_USD,
                "description": "what can still be spent today: allowance left plus unexpired "
                "grants (spend draws the allowance first, then grants by earliest expiry)",
            },
            "resets_at": {**_TIME, "description": "when the current budget period ends"},
            "requests_per_minute": _INT,
            **_LIMITS,
            "grants": {
                "type": "array",
                "items": _ref("Grant"),
                "description": "unexpired grants with money left",
            },
            "tenant_budgets": {
                "type": "array",
                "items": _ref("Tenant"),
                "description": "the budgets of the caller's tenants (a request must fit both)",
            },
            "key_budget": {
                "oneOf": [{"type": "null"}, _ref("KeyBudget")],
                "description": "called with an API key that has a budget of its own: that "
                "budget (a request must fit it too); else null",
            },
        }
    ),
    "KeyBudget": _closed(
        {
            "key_id": _STR,
            "budget_usd": _USD,
            "period": _PERIOD,
            "spent_usd": {**_USD, "description": "this period, by the key and every key it "
                          "was rotated from or to"},
            "reserved_usd": {**_USD, "description": "held by requests in flight and by the proxies' budget slices (governance.budgets.slices)"},
            "remaining_usd": _USD,
            "resets_at": _TIME,
        }
    ),
    "UsageRow": _closed(
        {
            "model": _STR,
            "provider": _STR,
            "spend_usd": _USD,
            "tokens_in": _INT,
            "tokens_out": _INT,
            "requests": _INT,
        }
    ),
    "Usage": _closed(
        {
            "user_id": {**_STR_OR_NULL, "description": "null: every user"},
            "tenant_id": _STR_OR_NULL,
            "since": _DAY_OR_NULL,
            "until": _DAY_OR_NULL,
            "spend_usd": _USD,
            "tokens_in": _INT,
            "tokens_out": _INT,
            "requests": _INT,
            "models": {"type": "array", "items": _ref("UsageRow")},
        }
    ),
    "LeaderboardRow": _closed(
        {
            "rank": {"type": "integer", "minimum": 1},
            "key": {
                **_STR_OR_NULL,
                "description": "tenant or user id; null: spend without a tenant",
            },
            "spend_usd": _USD,
            "tokens_in": _INT,
            "tokens_out": _INT,
            "requests": _INT,
        }
    ),
    "Leaderboard": _closed(
        {
            "by": {"type": "string", "enum": ["tenant", "user"]},
            "since": _DAY_OR_NULL,
            "until": _DAY_OR_NULL,
            "rows": {"type": "array", "items": _ref("LeaderboardRow")},
        }
    ),
    "AuditEntry": _closed(
        {
            "seq": {"type": "integer", "minimum": 1},
            "ts": _STR,
            "action": {
                **_STR,
                "description": "llm_request, model_policy_check, admin_action (its fields hold "
                "actor, action, target, before, after), proxy_start, ...",
            },
            "user_id": _STR_OR_NULL,
            "tenant_id": _STR_OR_NULL,
            "fields": {"type": "object"},
            "prev_hash": _STR,
            "hash": _STR,
        }
    ),
    "AuditList": _closed(
        {
            "count": _INT,
            "next_before_seq": {
                "type": ["integer", "null"],
                "description": "pass as before_seq for the next (older) page",
            },
            "entries": {"type": "array", "items": _ref("AuditEntry")},
        }
    ),
    "OpenApiDocument": {"type": "object", "required": ["openapi", "paths"]},
    # -- GET /admin/v1/policy --
    "ModelList": _closed(
        {
            "mode": {
                "type": "string",
                "enum": ["allowlist", "blocklist", "none"],
                "description": "none: every model allowed",
            },
            "entries": {
                "type": "array",
                "items": _STR,
                "description": "the models (or fnmatch families) allowed, or blocked",
            },
            "scope": {
                "type": "string",
                "enum": ["global", "tenant"],
                "description": "tenant: the tenant's own lists replace the global ones",
            },
        }
    ),
    "TenantModelList": _closed(
        {
            "tenant_id": _STR,
            "mode": {"type": "string", "enum": ["allowlist", "blocklist", "none"]},
            "entries": {"type": "array", "items": _STR},
            "scope": {"type": "string", "enum": ["global", "tenant"]},
        }
    ),
    "PolicyUser": _closed(
        {
            "user_id": _STR,
            "role": _ROLE,
            "tenants": _TENANTS,
            "daily_budget_usd": {**_USD, "description": "the budget per budget_period"},
            "budget_period": _PERIOD,
            "requests_per_minute": _INT,
            **_LIMITS,
        }
    ),
    "Policy": _closed(
        {
            "scope": {
                "type": "string",
                "enum": ["all", "tenants", "self"],
                "description": "what the caller may see: everything (admin), its tenants "
                "(tenant admin), itself and its tenants (developer)",
            },
            "models": _closed(
                {
                    "global": _ref("ModelList"),
                    "tenants": {"type": "array", "items": _ref("TenantModelList")},
                    "unknown_model_price": {"type": "string", "enum": ["deny", "zero"]},
                }
            ),
            "budgets": _closed(
                {
                    "default_budget_usd": {
                        **_USD,
                        "description": "a user's budget per period unless set",
                    },
                    "period": _PERIOD,
                    "time_zone": _STR,
                    "default_max_output_tokens": _INT,
                }
            ),
            "rate_limits": _closed(
                {
                    "default_requests_per_minute": _INT,
                    **{f"default_{k}": v for k, v in _LIMITS.items()},
                }
            ),
            "tenants": {"type": "array", "items": _ref("Tenant")},
            "users": {"type": "array", "items": _ref("PolicyUser")},
        }
    ),
}

_ERRORS = {
    "400": (
        "BadRequest",
        "`invalid_parameter`: a body field or query parameter out of range or of the wrong "
        "format (`field` names it); `invalid_json`: the body is not JSON; `bad_request`: "
        "anything else about the path, query or body",
    ),
    "401": ("Unauthenticated", "Missing, malformed, expired or unverifiable credential"),
    "403": (
        "Forbidden",
        "The caller's role may not do this (`forbidden`), e.g. a tenant admin acting outside "
        "its tenants",
    ),
    "404": (
        "NotFound",
        "No such route (`not_found`), user (`user_not_found`) or API key (`key_not_found`)",
    ),
    "503": ("Unavailable", "The state store or the audit trail cannot be used (fail closed)"),
    # answered by the listener before the admin API reads the request, on every route
    "408": (
        "RequestTimeout",
        "`request_timeout`: the request head or body did not arrive within "
        "`limits.header_timeout_s` / `limits.body_timeout_s`; the connection is closed",
    ),
    "413": (
        "PayloadTooLarge",
        "`payload_too_large`: the body (Content-Length, or once decoded) exceeds "
        "`limits.max_body_bytes` (`limit_bytes`)",
    ),
    "415": (
        "UnsupportedMediaType",
        "`unsupported_encoding`: a Content-Encoding other than identity, gzip, deflate, br or "
        "zstd; `unsupported_media_type` (candela, the local mode): a body that is not "
        "Content-Type: application/json",
    ),
    "429": (
        "TooManyConnections",
        "`too_many_connections`: this client address already holds "
        "`limits.max_connections_per_client` connections (`limit`); the connection is closed",
    ),
    "431": (
        "RequestHeaderTooLarge",
        "`request_header_too_large`: the request head exceeds `limits.max_header_bytes` "
        "(`limit_bytes`); the connection is closed",
    ),
}
# Every operation may meet these: they come from the connection, not the operation.
_CONNECTION_ERRORS = ("408", "413", "415", "429", "431")

RESPONSES: dict[str, Any] = {
    name: {"description": text, "content": {_JSON: {"schema": _ref("Error")}}}
    for name, text in _ERRORS.values()
}
RESPONSES["TooManyConnections"]["headers"] = {
    "Retry-After": {"description": "seconds", "schema": {"type": "integer", "minimum": 0}}
}


def _query(name: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
    # An empty value is the same as leaving the parameter out (`?user=&tenant=` as admin-api.md
    # writes it), and the document says so: the code accepts exactly these.
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"anyOf": [schema, {"type": "string", "maxLength": 0}]},
        "description": text + " (empty: as if absent)",
    }


_USER_PARAM = {
    "name": "user",
    "in": "path",
    "required": True,
    "description": "the user id, percent-encoded (e-mail addresses hold @)",
    "schema": _USER_ID_IN,
}
_KEY_PARAM = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "the key's id (k_...), not the key",
    "schema": _KEY_ID_IN,
}
_MOMENT_TEXT = "a UTC day (YYYY-MM-DD) or an RFC 3339 time with its offset, years 1970 to 9998"
_SINCE = _query("since", _MOMENT_IN, _MOMENT_TEXT + "; inclusive")
_UNTIL = _query("until", _MOMENT_IN, _MOMENT_TEXT + "; inclusive; its UTC day not before since's")
_USER_QUERY = _query("user", _USER_ID_IN, "a developer may name only themselves (the default)")


def _op(
    op_id: str,
    summary: str,
    schema: str,
    errors: tuple[str, ...],
    statuses: tuple[str, ...] = ("200",),
    params: list[dict[str, Any]] | None = None,
    body: str | None = None,
) -> dict[str, Any]:
    codes = ("400", "401", *errors, "503", *_CONNECTION_ERRORS)
    op: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "responses": {
            **{
                status: {
                    "description": "Created" if status == "201" else "OK",
                    "content": {_JSON: {"schema": _ref(schema)}},
                }
                for status in statuses
            },
            **{c: {"$ref": f"#/components/responses/{_ERRORS[c][0]}"} for c in sorted(set(codes))},
        },
    }
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {_JSON: {"schema": _ref(body)}}}
    return op


PATHS: dict[str, Any] = {
    "/admin/v1/me": {
        "get": _op("getMe", "The caller: role, tenants, today's budget and grants", "Me", ())
    },
    "/admin/v1/users": {
        "get": _op(
            "listUsers",
            "Every user with settings and today's spend (admin; tenant admin: the users of its "
            "tenants, with only those tenants and the spend there)",
            "UserList",
            ("403",),
        )
    },
    "/admin/v1/users/{user}": {
        "parameters": [_USER_PARAM],
        "put": _op(
            "putUser",
            "Create (201) or update (200) a user (admin); a partial body keeps the rest",
            "User",
            ("403",),
            statuses=("200", "201"),
            body="UserUpdate",
        ),
        "delete": _op(
            "deleteUser",
            "Remove a user (admin); audit entries and spend stay",
            "UserDeleted",
            ("403", "404"),
        ),
    },
    "/admin/v1/users/{user}/grants": {
        "parameters": [_USER_PARAM],
        "post": _op(
            "createGrant",
            "Grant a one-time bonus until it expires (admin; tenant admin: to developers whose "
            "tenants are all its own)",
            "Grant",
            ("403", "404"),
            statuses=("201",),
            body="GrantCreate",
        ),
        "get": _op(
            "listGrants",
            "A user's grants, remaining amount and expiry (admin; tenant admin: users of its "
            "tenants)",
            "GrantList",
            ("403",),
        ),
    },
    "/admin/v1/tenants": {
        "get": _op(
            "listTenants",
            "Every known tenant with its budget and this period's spend (admin; tenant admin: "
            "its own)",
            "TenantList",
            ("403",),
        )
    },
    "/admin/v1/tenants/{tenant}": {
        "parameters": [
            {
                "name": "tenant",
                "in": "path",
                "required": True,
                "description": "the tenant id, percent-encoded",
                "schema": _TENANT_ID_IN,
            }
        ],
        "put": _op(
            "putTenant",
            "Set a tenant's budget and period (admin): 201 the first time, then 200",
            "Tenant",
            ("403",),
            statuses=("200", "201"),
            body="TenantUpdate",
        ),
    },
    "/admin/v1/keys": {
        "post": _op(
            "createKey",
            "Mint an API key (admin: for any user; tenant admin: for itself and developers whose "
            "tenants are all its own; developer: for themselves); the key is in this answer only",
            "ApiKeyCreated",
            ("403", "404"),
            statuses=("201",),
            body="ApiKeyCreate",
        ),
        "get": _op(
            "listKeys",
            "API keys minted through this API (admin: anyone's; tenant admin: its own and its "
            "developers'; developer: their own)",
            "ApiKeyList",
            ("403",),
            params=[_USER_QUERY],
        ),
    },
    "/admin/v1/keys/{key}": {
        "parameters": [_KEY_PARAM],
        "delete": _op(
            "revokeKey",
            "Revoke a key at once, in every process (admin: anyone's; developer: their own)",
            "ApiKey",
            ("404",),
        ),
    },
    "/admin/v1/keys/{key}/rotate": {
        "parameters": [_KEY_PARAM],
        "post": _op(
            "rotateKey",
            "A new key for the same user, name and expiry; the old one works for grace_s more "
            "seconds (admin: anyone's; developer: their own)",
            "ApiKeyRotated",
            ("404",),
            statuses=("201",),
            body="ApiKeyRotate",
        ),
    },
    "/admin/v1/usage": {
        "get": _op(
            "getUsage",
            "Spend, tokens and requests per model (admin: anyone; tenant admin: spend in its "
            "tenants; developer: themselves)",
            "Usage",
            ("403",),
            params=[
                _USER_QUERY,
                _query("tenant", _TENANT_ID_IN, "only spend attributed to this tenant"),
                _SINCE,
                _UNTIL,
            ],
        )
    },
    "/admin/v1/leaderboard": {
        "get": _op(
            "getLeaderboard",
            "Spend ranking by tenant or user (admin; tenant admin: within its tenants)",
            "Leaderboard",
            ("403",),
            params=[
                _query(
                    "by",
                    {"type": "string", "enum": ["tenant", "user"], "default": "tenant"},
                    "rank tenants or users",
                ),
                _SINCE,
                _UNTIL,
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": params.MAX_LEADERBOARD_LIMIT},
                    "rows",
                ),
            ],
        )
    },
    "/admin/v1/audit": {
        "get": _op(
            "listAudit",
            "Audit entries, newest first (admin; tenant admin: entries of its tenants and admin "
            "actions it made or that target its tenants or the developers it manages)",
            "AuditList",
            ("403",),
            params=[
                _query(
                    "action",
                    {
                        "type": "string",
                        "maxLength": params.MAX_ACTION_CHARS,
                        "pattern": params.ACTION_PATTERN,
                    },
                    "e.g. llm_request, admin_action, model_policy_check",
                ),
                _query(
                    "user", _USER_ID_IN, "the entry's user: the requester, or the admin who acted"
                ),
                _SINCE,
                _query(
                    "limit",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": params.MAX_AUDIT_LIMIT,
                        "default": params.DEFAULT_AUDIT_LIMIT,
                    },
                    "entries per page",
                ),
                _query(
                    "before_seq",
                    {"type": "integer", "minimum": 1, "maximum": params.MAX_SEQ},
                    "only entries older than this seq (paging)",
                ),
            ],
        )
    },
    "/admin/v1/openapi.json": {"get": _op("getOpenApi", "This document", "OpenApiDocument", ())},
    "/admin/v1/policy": {
        "get": _op(
            "getPolicy",
            "The policy in force: model lists, budgets and limits, read-only (admin: every "
            "tenant and user; tenant admin: its tenants and their users; developer: itself and "
            "its tenants)",
            "Policy",
            (),
        )
    },
}

_DESCRIPTION = """\
The admin API of Candela, served on the proxy's own listener. Every call is authenticated like a
proxy request. Role `admin` may call everything; `developer` only `/me`, `/usage` and `/keys`
(their own) and this document; `tenant_admin` reads what belongs to the tenants in its own
`tenants` (users, spend, usage, leaderboard, grants, keys, audit entries) and creates grants and
keys for the developers whose tenants are all its own: anything else answers 403 `forbidden`. Every change is committed to the audit
trail (action `admin_action`, with actor, action, target, before and after) before it is made.
Every error is JSON `{"error": "<snake_case>", "message": "<sentence>", ...}`; an unknown path
answers 404 `not_found`, a method the path does not have 405 `method_not_allowed` with `Allow`.
Query parameters not listed for an operation are refused with 400."""


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Candela admin API", "version": "1", "description": _DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"candelaAuth": []}, {"apiKey": []}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "responses": RESPONSES,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a Candela API key, a Google/OIDC ID token or an OAuth2 token",
                },
                "candelaAuth": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Candela-Auth",
                    "description": "`Bearer <token>`; wins over Authorization",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """A fresh copy: callers may change theirs."""
    return copy.deepcopy(_document())
