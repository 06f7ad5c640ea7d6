"""The admin API fuzzed from its own OpenAPI document (schemathesis), as an admin and as a
developer: no 5xx, every answer as documented, invalid input refused, no developer reading
another user's data."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from candela_mitm.admin.openapi import openapi_document

from .conftest import ADMIN_KEY, ALICE_KEY

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
schema = schemathesis.openapi.from_dict(openapi_document())
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
CREDENTIAL_HEADERS = {"authorization", "x-candela-auth", "x-api-key", "x-goog-api-key"}
# bounded: about 2 x 10 operations x this many requests, a few seconds on loopback
EXAMPLES = 40


def _no_foreign_data(case: Any, response: Any, as_user: str) -> None:
    """A developer's answers name nobody else (usage, /me); anything else is refused."""
    if response.status_code >= 300:
        return
    body = response.json()
    rows = body.get("rows") or body.get("usage") or [] if isinstance(body, dict) else []
    users = {r.get("user_id") for r in rows if isinstance(r, dict)} - {None}
    assert users <= {as_user}, f"{case.method} {case.formatted_path} showed {users}"
    if isinstance(body, dict) and "user_id" in body:
        assert body["user_id"] == as_user


@pytest.fixture(scope="module")
def base_url(candela) -> str:
    return candela.url


@pytest.mark.parametrize(
    "key, developer", [(ADMIN_KEY, None), (ALICE_KEY, ALICE)], ids=["admin", "developer"]
)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_admin_api_answers_as_documented(case, base_url, key, developer):
    # the caller's key, alone: the generated security-scheme headers (X-Candela-Auth wins over
    # Authorization) would make almost every case a 401 (authentication has tests of its own)
    headers = {
        k: v for k, v in (case.headers or {}).items() if k.lower() not in CREDENTIAL_HEADERS
    }
    case.headers = {**headers, "Authorization": f"Bearer {key}"}
    response = case.call(base_url=base_url, timeout=10)
    case.validate_response(response, checks=CHECKS)
    if developer is not None:
        _no_foreign_data(case, response, developer)
