"""Admin parameters: the OpenAPI document's schemas accept exactly what the validators accept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from candela_mitm.admin import params
from candela_mitm.admin.openapi import openapi_document
from candela_mitm.admin.parsing import parse_rfc3339

DOC = openapi_document()
SCHEMAS = DOC["components"]["schemas"]


def _param(path: str, method: str | None, name: str) -> dict[str, Any]:
    item = DOC["paths"][path]
    found = item.get("parameters", []) + (item[method].get("parameters", []) if method else [])
    schema = next(p["schema"] for p in found if p["name"] == name)
    if "anyOf" in schema and {"type": "string", "maxLength": 0} in schema["anyOf"]:
        # a query parameter: empty means absent (parse_query drops it before any validator)
        schema = {"anyOf": [s for s in schema["anyOf"] if s != {"type": "string", "maxLength": 0}]}
    return schema


def _moment_ok(v: str) -> bool:
    return params.parse_moment(v) is not None


# what the document says, and the validator the handlers run on it
RULES: dict[str, tuple[dict[str, Any], Callable[[str], bool]]] = {
    "user (path)": (_param("/admin/v1/users/{user}", None, "user"), params.user_id_ok),
    "user (query)": (_param("/admin/v1/usage", "get", "user"), params.user_id_ok),
    "user_id (body)": (SCHEMAS["ApiKeyCreate"]["properties"]["user_id"], params.user_id_ok),
    "tenant (path)": (_param("/admin/v1/tenants/{tenant}", None, "tenant"), params.tenant_id_ok),
    "tenant (query)": (_param("/admin/v1/usage", "get", "tenant"), params.tenant_id_ok),
    "tenants[] (body)": (
        SCHEMAS["UserUpdate"]["properties"]["tenants"]["items"],
        params.tenant_id_ok,
    ),
    "key (path)": (_param("/admin/v1/keys/{key}", None, "key"), params.key_id_ok),
    "action (query)": (_param("/admin/v1/audit", "get", "action"), params.action_ok),
    "since (query)": (_param("/admin/v1/usage", "get", "since"), _moment_ok),
    "until (query)": (_param("/admin/v1/leaderboard", "get", "until"), _moment_ok),
    "since (audit)": (_param("/admin/v1/audit", "get", "since"), _moment_ok),
    "expires_at (grant)": (
        SCHEMAS["GrantCreate"]["properties"]["expires_at"],
        lambda v: parse_rfc3339(v) is not None,
    ),
    "reason (grant)": (
        SCHEMAS["GrantCreate"]["properties"]["reason"],
        lambda v: params.text_ok(v, params.MAX_REASON_CHARS),
    ),
}

# strings near every rule's edges: spaces of every kind, control characters, digits of other
# scripts, years and days out of range, offsets, fractions, a final newline
EDGES = [
    "", " ", "\n", "a", "a\n", "a ", " a", "a\u3000", "\u3000a", "\xa0a", "a\x85", "a\x1f", "\x1fa",
    "a\x7fb", "a\x80b", "a b", "\u200bx", "é", "\U0001f600", "\ud800", "k_0123456789abcdef",
    "k_0123456789ABCDEF", "k_0123456789abcdef\n", "k_0123456789abcde", "llm_request",
    "Llm_request", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 320, "x" * 321,
    "2026-05-01", "2026-5-1", "2026-02-29", "2024-02-29", "2026-13-01", "1969-12-31",
    "1970-01-01", "9998-12-31", "9999-01-01", "0001-01-01", "٢٠٢٦-٠١-٠١", "2026-05-01\n",
    "2026-05-01T00:00:00Z", "2026-05-01t00:00:00z", "2026-05-01 00:00:00Z",
    "2026-05-01T00:00:00", "2026-05-01T24:00:00Z", "2026-05-01T23:59:60Z",
    "2026-05-01T00:00:00.123456789+05:30", "2026-05-01T00:00:00.1234567890Z",
    "2026-05-01T00:00:00+24:00", "1970-01-01T00:00:00+23:59", "9998-12-31T23:59:59-23:59",
    "9999-12-31T23:00:00-05:00", "2026-05-01T00:00Z", "2026-05-01T00:00:00Z\n",
]

_CHARS = st.characters(codec=None, exclude_categories=())
_TEXT = st.text(
    st.one_of(_CHARS, st.sampled_from("\t\n\r \x1c\x1f\x7f\x85\xa0\u2028\u3000k_0123456789-:TZ+.")),
    max_size=40,
)


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("value", EDGES)
def test_the_document_and_the_validator_agree_at_the_edges(rule, value):
    schema, ok = RULES[rule]
    assert _validator(schema).is_valid(value) == ok(value), (rule, value)


_EDIT = st.sampled_from(["", " ", "\n", "0", "9", "x", "\x00", "\u3000"])


def _mutated(shape: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid shape with one character replaced, removed or added."""
    return st.tuples(shape, st.integers(0, 60), _EDIT, st.booleans()).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + int(t[3]) :]
    )


@pytest.mark.parametrize("rule", list(RULES))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_the_document_and_the_validator_agree(rule, data):
    schema, ok = RULES[rule]
    patterns = [s["pattern"] for s in schema.get("anyOf", [schema]) if "pattern" in s]
    shapes = [st.from_regex(p) for p in patterns]
    value = data.draw(st.one_of(_TEXT, *shapes, *map(_mutated, shapes)))
    assert _validator(schema).is_valid(value) == ok(value), (rule, value)


@pytest.mark.parametrize(
    "value, expected",
    [(1, 1), (1.0, 1), (0, 0), (True, None), (False, None), (1.5, None), ("1", None), (None, None)],
)
def test_json_integers_are_json_schemas_integers(value, expected):
    assert params.json_int(value) == expected
    assert _validator({"type": "integer"}).is_valid(value) == (expected is not None)


def test_every_operation_documents_the_listeners_own_answers():
    responses = DOC["components"]["responses"]
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, name in [
                ("408", "RequestTimeout"),
                ("413", "PayloadTooLarge"),
                ("415", "UnsupportedMediaType"),
                ("429", "TooManyConnections"),
                ("431", "RequestHeaderTooLarge"),
            ]:
                assert op["responses"][status] == {"$ref": f"#/components/responses/{name}"}, (
                    method, path, status
                )
    assert "Retry-After" in responses["TooManyConnections"]["headers"]
    for name in ("RequestTimeout", "PayloadTooLarge", "RequestHeaderTooLarge"):
        schema = responses[name]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}
