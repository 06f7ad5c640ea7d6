"""admin/resources/usage.py: usage and the leaderboard over a spend history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from candela_mitm.runtime import Runtime
from tests.core.admin.support import ADMIN, ALICE, BOB, TODAY, YESTERDAY, call, q, spend

# -- usage and leaderboard ---------------------------------------------------------------------


@pytest.fixture
def history(rt: Runtime) -> Runtime:
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)
    spend(rt, ALICE, 1.0, "research-team", now=yesterday)
    spend(rt, ALICE, 2.0, "research-team", now=now)
    spend(rt, ALICE, 4.0, "other-team", now=now)
    spend(rt, BOB, 8.0, None, now=now)
    return rt


@pytest.mark.parametrize(
    ("who", "query", "spend_usd", "requests"),
    [
        (ADMIN, "", 15.0, 4),
        (ADMIN, f"user={q(ALICE)}", 7.0, 3),
        (ADMIN, f"user={q(ALICE)}&since={TODAY}", 6.0, 2),
        (ADMIN, f"user={q(ALICE)}&until={YESTERDAY}", 1.0, 1),
        (ADMIN, f"since={TODAY}T00:00:00Z", 14.0, 3),
        (ADMIN, "tenant=research-team", 3.0, 2),
        (ADMIN, "user=&tenant=", 15.0, 4),  # empty means absent
        (ALICE, "", 7.0, 3),  # a developer without user= gets their own
        (ALICE, f"user={q(ALICE)}&tenant=other-team", 4.0, 1),
        (BOB, "key=cdl_bob_key", 8.0, 1),  # ?key= carries a credential, never refused
    ],
)
def test_usage(history, who, query, spend_usd, requests):
    r = call(history, "GET", f"/admin/v1/usage?{query}", as_=who)
    assert r.status == 200
    assert (r.payload["spend_usd"], r.payload["requests"]) == (spend_usd, requests)
    assert sum(m["spend_usd"] for m in r.payload["models"]) == pytest.approx(spend_usd)
    if who != ADMIN:
        assert r.payload["user_id"] == who


@pytest.mark.parametrize(
    ("query", "rows"),
    [
        ("", [("other-team", 4.0), (None, 8.0), ("research-team", 3.0)]),
        ("by=tenant", [(None, 8.0), ("other-team", 4.0), ("research-team", 3.0)]),
        ("by=user", [(BOB, 8.0), (ALICE, 7.0)]),
        ("by=user&limit=1", [(BOB, 8.0)]),
        (f"by=user&since={TODAY}", [(BOB, 8.0), (ALICE, 6.0)]),
        (f"by=tenant&until={YESTERDAY}", [("research-team", 1.0)]),
    ],
)
def test_leaderboard(history, query, rows):
    r = call(history, "GET", f"/admin/v1/leaderboard?{query}")
    got = [(row["key"], row["spend_usd"]) for row in r.payload["rows"]]
    want = sorted(rows, key=lambda kv: -kv[1])
    assert got == want
    assert [row["rank"] for row in r.payload["rows"]] == list(range(1, len(want) + 1))


