"""Policy replay over a hand-built audit log: every gate of the candidate, in pipeline order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance.replay import Candidate, Recorded, Verdict, replay

T0 = datetime(2026, 11, 18, 10, 0, tzinfo=UTC)

CANDIDATE = {
    "governance": {
        "budgets": {"default_daily_usd": 10},
        "models": {"mode": "allowlist", "allowed": ["gpt-4o-mini*"]},
        "tenants": {"fin": {"budget_usd": 0.01, "period": "monthly"}},
    },
    "users": {
        "alice": {"daily_budget_usd": 0.01},
        "bob": {"requests_per_minute": 2},
        "dave": {"max_concurrent_requests": 1},
        "erin": {"tenants": ["fin"]},
        "frank": {"tenants": ["fin"]},
        "gina": {"total_tokens_per_minute": 1000},
    },
}


def entry(
    seq: int,
    at_s: float,
    user: str | None,
    *,
    model: str | None = "gpt-4o-mini",
    tenant: str | None = None,
    duration_s: float = 1.0,
    cost: float = 0.001,
    estimate: float | None = None,
    decision: str = "allowed",
    reason: str | None = None,
    tokens: tuple[int, int] = (10, 10),
    action: str = "llm_request",
) -> dict[str, Any]:
    ts = T0 + timedelta(seconds=at_s + duration_s)
    return {
        "seq": seq,
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "action": action,
        "user_id": user,
        "tenant_id": tenant,
        "fields": {
            "user_id": user,
            "tenant_id": tenant,
            "provider": "openai",
            "model": model,
            "decision": decision,
            "reason": reason,
            "input_tokens": tokens[0],
            "output_tokens": tokens[1],
            "cost_usd": cost if decision == "allowed" else 0.0,
            "estimate_usd": cost if estimate is None else estimate,
            "duration_ms": duration_s * 1000,
        },
    }


LOG = [
    # alice: the model policy, then her 0.01 daily budget (reserved at the estimate)
    entry(1, 0, "alice", cost=0.004, estimate=0.006),
    entry(2, 10, "alice", model="gpt-4o", cost=0.003),
    entry(3, 60, "alice", cost=0.005, estimate=0.006),
    entry(4, 120, "alice", cost=0.002, estimate=0.006),
    # bob: 2 requests a minute
    entry(5, 200, "bob"),
    entry(6, 210, "bob"),
    entry(7, 220, "bob", cost=0.002),
    entry(8, 261, "bob"),  # the first left the window at 260
    # carol: refused live by her budget; the candidate's default budget admits her
    entry(9, 300, "carol", decision="denied", reason="budget_exceeded", estimate=0.0015),
    # dave: one request in flight
    entry(10, 400, "dave", duration_s=10),
    entry(11, 405, "dave", cost=0.0007),
    entry(12, 410, "dave"),  # starts as the first ends: admitted
    # the tenant fin's monthly 0.01, shared by erin and frank
    entry(13, 500, "erin", tenant="fin", cost=0.006),
    entry(14, 510, "frank", tenant="fin", cost=0.006),
    # gina: 1000 tokens a minute
    entry(15, 600, "gina", tokens=(600, 100)),
    entry(16, 610, "gina", tokens=(200, 200), cost=0.0009),
    # not judged: no credential, an admin action, a refusal no policy changes
    entry(17, 700, None, decision="denied", reason="unauthenticated"),
    entry(18, 701, "alice", action="user.update"),
    entry(19, 702, "alice", decision="denied", reason="invalid_json"),
]


def verdicts(report: Any) -> dict[int, str]:
    return {j.request.seq: j.verdict.describe() for j in report.judged}


def test_every_gate_of_the_candidate() -> None:
    report = replay(Candidate(parse_config(CANDIDATE), "candidate.yaml"), LOG)
    assert verdicts(report) == {
        1: "allowed",
        2: "denied model_not_allowed (allowlist)",
        3: "allowed",
        4: "denied budget_exceeded (user,daily)",
        5: "allowed",
        6: "allowed",
        7: "denied rate_limited (user,requests)",
        8: "allowed",
        9: "allowed",
        10: "allowed",
        11: "denied rate_limited (user,concurrency)",
        12: "allowed",
        13: "allowed",
        14: "denied budget_exceeded (tenant,monthly)",
        15: "allowed",
        16: "denied rate_limited (user,total_tokens)",
    }
    assert [(j.request.seq, j.change) for j in report.changes] == [
        (2, "newly_denied"), (4, "newly_denied"), (7, "newly_denied"), (9, "newly_allowed"),
        (11, "newly_denied"), (14, "newly_denied"), (16, "newly_denied"),
    ]
    rows = {(r["user_id"], r["tenant_id"]): r for r in report.to_json()["scopes"]}
    assert rows[("alice", None)] == {
        "user_id": "alice", "tenant_id": None, "judged": 4, "newly_denied": 2,
        "newly_allowed": 0, "recorded_spend_usd": 0.014, "spend_avoided_usd": 0.005,
        "estimated_spend_added_usd": 0.0,
    }
    assert rows[("carol", None)]["newly_allowed"] == 1
    assert rows[("carol", None)]["estimated_spend_added_usd"] == 0.0015
    assert rows[("frank", "fin")]["spend_avoided_usd"] == 0.006
    totals = report.to_json()["totals"]
    assert totals["judged"] == 16 and totals["newly_denied"] == 6 and totals["newly_allowed"] == 1
    assert totals["spend_avoided_usd"] == pytest.approx(0.003 + 0.002 + 0.002 + 0.0007 + 0.006 + 0.0009)


def test_the_live_policy_replayed_changes_nothing() -> None:
    """The configuration the log was recorded under, replayed, judges as it did."""
    live = parse_config({"users": {"carol": {"daily_budget_usd": 0.001}}})
    log = [e for e in LOG if e["seq"] != 19]
    report = replay(Candidate(live), log)
    assert report.changes == []
    assert len(report.judged) == 16


def test_a_denied_request_spends_nothing_for_those_after_it() -> None:
    """The request the candidate refuses leaves the budget for the next one."""
    cfg = parse_config({"users": {"alice": {"daily_budget_usd": 0.01}}})
    log = [
        entry(1, 0, "alice", cost=0.008),
        entry(2, 10, "alice", cost=0.008),  # 0.016 > 0.01: refused, spends nothing
        entry(3, 20, "alice", cost=0.002),  # fits: only 0.008 was spent
    ]
    assert verdicts(replay(Candidate(cfg), log)) == {
        1: "allowed", 2: "denied budget_exceeded (user,daily)", 3: "allowed",
    }


def test_warmup_counts_the_period_before_since_without_reporting_it() -> None:
    cfg = parse_config({"users": {"alice": {"daily_budget_usd": 0.01, "budget_period": "weekly"}}})
    candidate = Candidate(cfg)
    since = T0 + timedelta(hours=1)
    # 2026-11-18 is a Wednesday: the week began on Monday the 16th, less one rate window
    assert candidate.warmup_start(since) == datetime(2026, 11, 15, 23, 59, tzinfo=UTC)
    log = [entry(1, 0, "alice", cost=0.009), entry(2, 3600, "alice", cost=0.002)]
    report = replay(candidate, log, since=since)
    assert report.warmup == 1
    assert verdicts(report) == {2: "denied budget_exceeded (user,weekly)"}


def test_a_new_period_starts_the_count_again() -> None:
    cfg = parse_config({"users": {"alice": {"daily_budget_usd": 0.01}}})
    log = [entry(1, 0, "alice", cost=0.009), entry(2, 14 * 3600, "alice", cost=0.009)]
    assert verdicts(replay(Candidate(cfg), log)) == {1: "allowed", 2: "allowed"}


def test_local_models_are_never_refused_by_budget() -> None:
    cfg = parse_config({"users": {"alice": {"daily_budget_usd": 0}}})
    e = entry(1, 0, "alice", model="llama3", cost=0.0)
    e["fields"]["provider"] = "ollama"
    paid = entry(2, 5, "alice", cost=0.001)
    assert verdicts(replay(Candidate(cfg), [e, paid])) == {
        1: "allowed", 2: "denied budget_exceeded (user,daily)",
    }


def test_recorded_entries_read_what_the_log_says() -> None:
    r = Recorded.from_entry(entry(7, 30, "bob", tenant="t", duration_s=2.5, decision="denied",
                                  reason="rate_limited"))
    assert r is not None
    assert r.started == T0 + timedelta(seconds=30) and r.ended == T0 + timedelta(seconds=32.5)
    assert r.verdict == Verdict("denied", "rate_limited") and r.tenant == "t"
    assert Recorded.from_entry(entry(8, 0, "bob", decision="denied", reason="payload_too_large")) is None
