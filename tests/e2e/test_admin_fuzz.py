"""The admin API fuzzed from its own OpenAPI document (schemathesis), as an admin and as a
developer: no 5xx, every answer as documented, invalid input refused, no developer reading
another user's data."""

from __future__ import annotations

from datetime import UTC, datetime
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


def _utc_day(text: str) -> str:
    moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    if len(text) == 10:
        return text
    return moment.astimezone(UTC).date().isoformat()


def _refused_as_the_document_says(case: Any, response: Any) -> bool:
    """The two rules a schema cannot state, both in the document's descriptions: a time "in the
    future" (expires_at) and `until` not before `since`. True only when the input really
    breaks the rule the answer names."""
    if response.status_code != 400:
        return False
    err = response.json()
    field = err.get("field")
    if field == "expires_at" and "in the future" in err["message"]:
        sent = datetime.fromisoformat(case.body["expires_at"].upper().replace("Z", "+00:00"))
        return sent <= datetime.now(UTC)
    if field == "until" and "before since" in err["message"]:
        q = case.query or {}
        return _utc_day(q["until"]) < _utc_day(q["since"])
    return False


def positive_data_acceptance(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every input the document calls valid is accepted (not 400), but for those two rules."""
    if _refused_as_the_document_says(case, response):
        return None
    return checks.positive_data_acceptance(ctx, response, case)


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    positive_data_acceptance,
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
