"""The admin API fuzzed from its own OpenAPI document (schemathesis), as an admin, a developer and
a tenant admin: no 5xx, every answer as documented, invalid input refused, no developer reading
another user's data, no tenant admin reading another tenant's."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from candela_mitm.admin.openapi import openapi_document
from tests.fakes.candela import CandelaProcess

from .conftest import ADMIN_KEY, ALICE_KEY, base_config, candela_env, sha

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
TARA = "tara@example.com"  # tenant admin of research-team
TARA_KEY = "cdl_tara_tenant_admin_key"
TARA_TENANTS = {"research-team"}
schema = schemathesis.openapi.from_dict(openapi_document())


def _utc_day(text: str) -> str:
    moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    if len(text) == 10:
        return text
    return moment.astimezone(UTC).date().isoformat()


def _refused_as_the_document_says(case: Any, response: Any) -> bool:
    """The rules a schema cannot state, all in the document's descriptions: a time "in the
    future" (expires_at), `until` not before `since`, and a key's budget at most its user's. True only when the input really
    breaks the rule the answer names."""
    if response.status_code != 400:
        return False
    err = response.json()
    field = err.get("field")
    if field == "expires_at" and "in the future" in err["message"]:
        sent = datetime.fromisoformat(case.body["expires_at"].upper().replace("Z", "+00:00"))
        return sent <= datetime.now(UTC)
    if field == "budget_usd" and "at most the user's budget" in err["message"]:
        return True  # a key's budget is a part of its user's: the user's budget is not in the schema
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


def _named(body: Any, by_tenant: bool) -> tuple[set[str], set[str]]:
    """(tenants, users) a JSON answer names anywhere: tenant_id, tenants, user_id, and the keys
    of leaderboard rows."""
    tenants: set[str] = set()
    users: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "tenant_id" and isinstance(x, str):
                    tenants.add(x)
                elif k == "tenants" and isinstance(x, list):
                    tenants.update(t for t in x if isinstance(t, str))
                elif k == "user_id" and isinstance(x, str):
                    users.add(x)
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(body)
    if isinstance(body, dict) and isinstance(body.get("rows"), list):
        keys = {r.get("key") for r in body["rows"] if isinstance(r, dict)} - {None}
        (tenants if by_tenant else users).update(keys)
    return tenants, users


def _only_its_tenants(case: Any, response: Any, base_url: str) -> None:
    """A tenant admin's answers name no other tenant, and no user outside its tenants."""
    if response.status_code >= 300:
        return
    by_tenant = (case.query or {}).get("by", "tenant") in ("tenant", "")
    tenants, users = _named(response.json(), by_tenant)
    where = f"{case.method} {case.formatted_path}"
    assert tenants <= TARA_TENANTS, f"{where} showed tenants {tenants - TARA_TENANTS}"
    if users - {TARA}:
        every = requests.get(
            base_url + "/admin/v1/users",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=10,
        ).json()["users"]
        theirs = {u["user_id"] for u in every if set(u["tenants"]) & TARA_TENANTS} | {TARA}
        assert users <= theirs, f"{where} showed users {users - theirs}"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, upstream, token_server) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = base_config(upstream.url, limits={"max_body_bytes": 200_000})
    cfg["auth"]["api_keys"].append({"sha256": sha(TARA_KEY), "user": TARA})
    cfg["users"].update(
        {
            TARA: {"role": "tenant_admin", "tenants": ["research-team"]},
            "rita@example.com": {"tenants": ["research-team"]},
            "oscar@example.com": {"tenants": ["other-team"]},
        }
    )
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp)) as c:
        # spend in both tenants, so a leak would show
        for tenant in ("research-team", "other-team"):
            r = requests.post(
                c.url + "/proxy/openai/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {ALICE_KEY}", "X-Candela-Tenant-Id": tenant},
                timeout=20,
            )
            assert r.status_code == 200, r.text
        yield c.url


@pytest.mark.parametrize(
    "key, developer",
    [(ADMIN_KEY, None), (ALICE_KEY, ALICE), (TARA_KEY, TARA)],
    ids=["admin", "developer", "tenant_admin"],
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
    if developer == TARA:
        _only_its_tenants(case, response, base_url)
    elif developer is not None:
        _no_foreign_data(case, response, developer)
