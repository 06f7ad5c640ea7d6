"""Shadow policy: the candidate's verdicts on the live counters, its config, and failing open."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from candela_mitm.config import load_config, parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.governance.ledger import Ledger
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.governance.replay import Candidate, Verdict
from candela_mitm.governance.shadow import Shadow, ShadowVerdicts, budget_verdict
from candela_mitm.state.memory import MemoryStateStore
from candela_mitm.state.ports import ReserveResult, usd_to_nano

NOW = datetime(2026, 11, 18, 12, tzinfo=UTC)
DAILY, MONTHLY = BudgetPeriod("daily"), BudgetPeriod("monthly")

CANDIDATE = Candidate(parse_config({
    "users": {"alice": {"daily_budget_usd": 1.0}},
    "governance": {
        "tenants": {"fin": {"budget_usd": 2.0, "period": "monthly"}, "ops": {"period": "weekly"}},
        "models": {"mode": "blocklist", "blocked": ["o1-pro*"]},
    },
}))


def seen(
    spent: float = 0, reserved: float = 0, grants_free: float = 0, t_spent: float = 0,
    ok: bool = True, scope: str = "user",
) -> ReserveResult:
    n = usd_to_nano
    return ReserveResult(ok, 0, {}, n(spent), 0, n(reserved), n(grants_free), scope=scope,
                         tenant_spent=n(t_spent))


@pytest.mark.parametrize(
    ("tenant", "amount", "counters", "tenant_period", "expected"),
    [
        (None, 0.5, seen(spent=0.4), None, Verdict("allowed")),
        (None, 0.5, seen(spent=0.4, reserved=0.2), None,
         Verdict("denied", "budget_exceeded", {"scope": "user", "period": "daily"})),
        (None, 0.5, seen(spent=0.8, grants_free=0.3), None, Verdict("allowed")),  # grants count
        ("fin", 0.5, seen(t_spent=1.6), MONTHLY,
         Verdict("denied", "budget_exceeded", {"scope": "tenant", "period": "monthly"})),
        ("fin", 0.5, seen(t_spent=1.5), MONTHLY, Verdict("allowed")),
        ("ops", 5.0, seen(), DAILY,  # no tenant budget: only the user's
         Verdict("denied", "budget_exceeded", {"scope": "user", "period": "daily"})),
        ("fin", 0.5, seen(), DAILY, None),  # the live tenant row is of another period
        ("fin", 0.5, seen(ok=False), MONTHLY, None),  # live user refused: tenant row unread
        ("fin", 0.5, None, MONTHLY, None),
    ],
)
def test_budget_verdict_on_the_live_counters(tenant, amount, counters, tenant_period, expected):
    got = budget_verdict(CANDIDATE, "alice", tenant, amount, counters, DAILY, tenant_period)
    assert got == expected


def test_another_user_period_cannot_be_judged() -> None:
    weekly = Candidate(parse_config({"users": {"alice": {"budget_period": "weekly"}}}))
    assert budget_verdict(weekly, "alice", None, 0.1, seen(), DAILY, None) is None
    paris = Candidate(parse_config({"governance": {"budgets": {"time_zone": "Europe/Paris"}}}))
    assert budget_verdict(paris, "alice", None, 0.1, seen(), DAILY, None) is None
    assert budget_verdict(paris, "alice", None, 0.1, seen(), BudgetPeriod("daily", "Europe/Paris"),
                          None) == Verdict("allowed")


def test_the_counters_are_the_live_reserves() -> None:
    """Reservation.seen carries what the store decided on (the shadow's only input)."""
    ledger = Ledger(MemoryStateStore(), clock=lambda: NOW)
    ledger.reserve("alice", "fin", 0.3, 10.0, "r1", tenant_budget_usd=5.0, tenant_period=MONTHLY)
    second = ledger.reserve("alice", "fin", 0.9, 10.0, "r2", tenant_budget_usd=5.0,
                            tenant_period=MONTHLY)
    assert second.seen is not None
    assert second.seen.reserved == usd_to_nano(0.3) and second.seen.tenant_reserved == usd_to_nano(0.3)
    # the candidate's 1.0 a day: 0.3 held + 0.9 > 1.0
    assert budget_verdict(CANDIDATE, "alice", "fin", 0.9, second.seen, DAILY, MONTHLY) == (
        Verdict("denied", "budget_exceeded", {"scope": "user", "period": "daily"})
    )


def test_verdicts_in_pipeline_order_and_as_audited() -> None:
    v = ShadowVerdicts()
    shadow = Shadow(CANDIDATE)
    shadow.judge_model(v, "o1-pro-2025-03-19", None, None)
    v.budget = Verdict("denied", "budget_exceeded", {"scope": "user", "period": "daily"})
    assert v.to_json() == {
        "decision": "denied", "code": "model_not_allowed", "policy": "blocklist",
        "judged": ["model_policy", "budget"],
    }
    ok = ShadowVerdicts()
    shadow.judge_model(ok, "gpt-4o", "fin", None)
    assert ok.to_json() == {"decision": "allowed", "code": None, "judged": ["model_policy"]}


def test_a_broken_evaluation_is_recorded_as_error_and_raises_nothing(caplog) -> None:
    class Broken(Candidate):
        def model_denial(self, *a, **k):
            raise RuntimeError("boom")

        def user(self, user):
            raise RuntimeError("boom")

    shadow = Shadow(Broken(parse_config({})))
    v = ShadowVerdicts()
    shadow.judge_model(v, "gpt-4o", None, None)
    assert v.error and v.decision == "error"
    assert v.to_json() == {"decision": "error", "code": None}
    v2 = ShadowVerdicts()
    shadow.judge_budget(v2, "alice", None, 0.1, seen(), DAILY, None)
    assert v2.decision == "error"
    assert "could not judge" in caplog.text


def test_the_shadow_path_is_relative_to_the_config_and_validated(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "candidate.yaml").write_text(
        yaml.safe_dump({"users": {"alice": {"daily_budget_usd": 1}}})
    )
    (tmp_path / "candela.yaml").write_text(
        yaml.safe_dump({"governance": {"shadow": "policies/candidate.yaml"}})
    )
    cfg = load_config(tmp_path / "candela.yaml")
    assert cfg.governance.shadow == str(tmp_path / "policies" / "candidate.yaml")
    shadow = Shadow.from_config(cfg)
    assert shadow is not None and shadow.candidate.user("alice").daily_budget_usd == 1


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({"users": {"alice": {"daily_budget_usd": -1}}}, "users.alice.daily_budget_usd"),
        ({"governance": {"modelz": {}}}, "governance.modelz: unknown key"),
        ({"governance": {"shadow": "other.yaml"}}, "a shadow candidate cannot name one itself"),
        (None, "cannot read"),
    ],
)
def test_a_bad_shadow_fails_the_start_naming_both_files(tmp_path: Path, candidate, message) -> None:
    if candidate is not None:
        (tmp_path / "candidate.yaml").write_text(yaml.safe_dump(candidate))
    (tmp_path / "candela.yaml").write_text(yaml.safe_dump({"governance": {"shadow": "candidate.yaml"}}))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "candela.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'candela.yaml'}: governance.shadow: ")
    assert message in str(e.value)
