"""Budget alerts: the crossing rule, the webhook bodies, and claims once per period on both stores."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from candela_mitm.governance.alerts import (
    CLAIM_GRACE_S,
    AlertRule,
    BudgetAlert,
    backoff_s,
    reached,
    watches,
)
from candela_mitm.governance.ledger import KeyBudget, Ledger, Reservation
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.state.ports import StateStore, usd_to_nano

T0 = datetime(2026, 5, 20, 12, 0, tzinfo=UTC)  # a Wednesday
THRESHOLDS = [50, 80, 90, 100]


@pytest.mark.parametrize(
    ("spent", "budget", "expected"),
    [
        (0, 100, []),
        (49, 100, []),
        (50, 100, [50]),
        (79_999_999, 100_000_000, [50]),  # one nano-dollar short of 80%: exact, no float
        (80_000_000, 100_000_000, [50, 80]),
        (95, 100, [50, 80, 90]),
        (100, 100, [50, 80, 90, 100]),
        (250, 100, [50, 80, 90, 100]),  # overdrawn (an underestimated request)
        (5, 0, []),  # a budget of 0 admits nothing: no utilisation to speak of
        (0, 0, []),
    ],
)
def test_reached(spent: int, budget: int, expected: list[int]) -> None:
    assert reached(spent, budget, THRESHOLDS) == expected


def test_reached_sorts_and_ignores_repeats() -> None:
    assert reached(95, 100, [90, 50, 90, 120]) == [50, 90]


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (500, 60.0)]
)
def test_backoff_doubles_up_to_its_cap(attempt: int, expected: float) -> None:
    assert backoff_s(attempt, 1.0, 60.0) == expected


def _reservation(**kw: Any) -> Reservation:
    fields: dict[str, Any] = {
        "id": "r", "user_id": "alice", "tenant": "t", "amount_usd": 1.0, "day": "2026-05-20",
        "request_id": "s", "owner": "o", "created_at": T0, "allowance_usd": 1.0,
        "budget_usd": 10.0, "tenant_budget_usd": 100.0,
        "tenant_period": BudgetPeriod("weekly"),
    }
    fields.update(kw)
    return Reservation(**fields)


def test_watches_are_the_user_budget_and_the_tenant_budget_when_there_is_one() -> None:
    user, tenant = watches(_reservation())
    assert (user.scope, user.scope_id, user.budget_usd, user.period_key, user.tenant) == (
        "user", "alice", 10.0, "2026-05-20", "t"
    )
    assert (tenant.scope, tenant.scope_id, tenant.budget_usd, tenant.period_key) == (
        "tenant", "t", 100.0, "weekly:2026-05-18"
    )
    assert [w.scope for w in watches(_reservation(tenant_budget_usd=None))] == ["user"]
    assert [w.scope for w in watches(_reservation(tenant=None))] == ["user"]
    assert (user.user_id, tenant.user_id) == ("alice", None)


def test_a_key_with_a_budget_is_watched_on_its_rotation_chain_row_in_its_users_period() -> None:
    res = _reservation(key_budget=KeyBudget("k_new", "k_first", 2.0),
                       period=BudgetPeriod("monthly"))
    user, tenant, key = watches(res)
    assert (key.scope, key.scope_id, key.row, key.budget_usd, key.user_id, key.tenant) == (
        "key", "k_new", "k_first", 2.0, "alice", "t"
    )
    assert key.period_key == user.period_key == "monthly:2026-05-01"
    assert key.key == ("key", "k_first", "monthly:2026-05-01")
    # a key without a budget of its own is no budget: nothing more to watch
    assert [w.scope for w in watches(_reservation(key_budget=None))] == ["user", "tenant"]


def _spend(ledger: Ledger, usd: float, user: str = "alice", tenant: str | None = "t",
           budget: float = 10.0, tenant_budget: float | None = 100.0,
           at: datetime = T0) -> Reservation:
    res = ledger.reserve(
        user, tenant, 0.0, budget, "req", at,
        tenant_budget_usd=tenant_budget, tenant_period=BudgetPeriod("weekly"),
    )
    assert isinstance(res, Reservation)
    assert ledger.settle(res, usd, 1, 1, "m", "openai", at).applied
    return res


def test_each_threshold_is_claimed_once_when_settled_spend_reaches_it(store: StateStore) -> None:
    ledger, rule = Ledger(store), AlertRule(store)

    def look(res: Reservation) -> list[tuple[str, int]]:
        out = []
        for w in watches(res):
            out += [(a.scope, a.threshold) for a in rule.observe(w, THRESHOLDS, T0).alerts]
        return out

    assert look(_spend(ledger, 4.9)) == []
    assert look(_spend(ledger, 0.1)) == [("user", 50)]  # 5.0 of 10: reached exactly
    assert look(_spend(ledger, 1.0)) == []  # 6.0: nothing new
    assert look(_spend(ledger, 3.5)) == [("user", 80), ("user", 90)]  # 9.5: two at once
    assert look(_spend(ledger, 42.0)) == [("user", 100), ("tenant", 50)]  # tenant 51.5 of 100
    assert look(_spend(ledger, 1.0)) == []


def test_reservations_alone_alert_nothing(store: StateStore) -> None:
    ledger, rule = Ledger(store), AlertRule(store)
    res = ledger.reserve("alice", None, 9.9, 10.0, "req", T0)
    assert isinstance(res, Reservation)
    seen = rule.observe(watches(res)[0], THRESHOLDS, T0)
    assert seen.alerts == () and seen.utilization == 0.0


def test_the_alert_says_what_a_webhook_needs(store: StateStore) -> None:
    ledger, rule = Ledger(store), AlertRule(store)
    res = _spend(ledger, 85.0, budget=1000.0)
    fifty, alert = rule.observe(watches(res)[1], THRESHOLDS, T0).alerts
    assert fifty.threshold == 50
    assert alert.to_json() == {
        "type": "budget_threshold",
        "scope": "tenant",
        "id": "t",
        "user_id": None,
        "tenant": "t",
        "period": "weekly",
        "period_start": "2026-05-18T00:00:00Z",
        "threshold": 80,
        "spent_usd": 85.0,
        "budget_usd": 100.0,
        "utilization": 0.85,
        "resets_at": "2026-05-25T00:00:00Z",
    }
    slack = alert.slack()
    assert set(slack) == {"text", "blocks"}
    assert "Tenant t has used 80% of its weekly budget: $85.00 of $100.00" in slack["text"]
    assert [b["type"] for b in slack["blocks"]] == ["header", "section", "section"]
    assert {"type": "mrkdwn", "text": "*Threshold*\n80%"} in slack["blocks"][2]["fields"]


def _spend_key(ledger: Ledger, usd: float, key: KeyBudget, at: datetime = T0) -> Reservation:
    res = ledger.reserve("alice", "t", 0.0, 100.0, "req", at, key_budget=key)
    assert isinstance(res, Reservation)
    assert ledger.settle(res, usd, 1, 1, "m", "openai", at).applied
    return res


def test_a_keys_budget_alerts_once_per_threshold_across_its_rotation(store: StateStore) -> None:
    ledger, rule = Ledger(store), AlertRule(store)
    first, rotated = KeyBudget("k_one", "k_one", 2.0), KeyBudget("k_two", "k_one", 2.0)

    def look(res: Reservation) -> list[tuple[str, str, int]]:
        out = []
        for w in watches(res):
            out += [(a.scope, a.scope_id, a.threshold) for a in rule.observe(w, THRESHOLDS, T0).alerts]
        return out

    assert look(_spend_key(ledger, 0.9, first)) == []
    assert look(_spend_key(ledger, 0.1, first)) == [("key", "k_one", 50)]  # 1.0 of 2.0
    # the rotated key spends from the same row: 50% was announced, 80% is new and names it
    assert look(_spend_key(ledger, 0.6, rotated)) == [("key", "k_two", 80)]  # 1.6 of 2.0
    # another process, its own rule: the claims are in the store, nothing is sent twice
    other = AlertRule(store)
    assert other.observe(watches(_spend_key(ledger, 0.0, first))[1], THRESHOLDS, T0).alerts == ()
    # the user's own budget (100) is another scope: 1.6 is under its 50%
    assert rule.observe(watches(_spend_key(ledger, 0.0, rotated))[0], THRESHOLDS, T0).alerts == ()
    # an unrelated key of the same user has a row of its own
    assert look(_spend_key(ledger, 1.5, KeyBudget("k_b", "k_b", 3.0))) == [("key", "k_b", 50)]


def test_a_key_alert_names_the_key_and_its_user_never_a_secret(store: StateStore) -> None:
    ledger, rule = Ledger(store), AlertRule(store)
    res = _spend_key(ledger, 1.7, KeyBudget("k_abc", "k_abc", 2.0))
    seen = rule.observe(watches(res)[1], THRESHOLDS, T0)
    assert seen.utilization == pytest.approx(0.85)
    fifty, alert = seen.alerts
    assert alert.to_json() == {
        "type": "budget_threshold",
        "scope": "key",
        "id": "k_abc",
        "user_id": "alice",
        "tenant": "t",
        "period": "daily",
        "period_start": "2026-05-20T00:00:00Z",
        "threshold": 80,
        "spent_usd": 1.7,
        "budget_usd": 2.0,
        "utilization": 0.85,
        "resets_at": "2026-05-21T00:00:00Z",
    }
    slack = alert.slack()
    assert slack["text"].startswith("API key k_abc of user alice has used 80% of its daily budget")
    fields = [f["text"] for f in slack["blocks"][2]["fields"]]
    assert fields[:3] == ["*Scope*\nkey `k_abc`", "*User*\n`alice`", "*Tenant*\n`t`"]


def test_a_new_period_alerts_again_and_claims_outlive_the_period(store: StateStore) -> None:
    ledger, rule = Ledger(store), AlertRule(store)
    res = _spend(ledger, 5.0, tenant=None)
    assert [a.threshold for a in rule.observe(watches(res)[0], THRESHOLDS, T0).alerts] == [50]
    tomorrow = T0 + timedelta(days=1)
    res2 = _spend(ledger, 5.0, tenant=None, at=tomorrow)
    (alert,) = rule.observe(watches(res2)[0], THRESHOLDS, tomorrow).alerts
    assert (alert.threshold, alert.period_key) == (50, "2026-05-21")
    # yesterday's claim is still there for a late settlement: another process sees it
    late = AlertRule(store).observe(watches(res)[0], THRESHOLDS, tomorrow)
    assert late.alerts == ()
    assert CLAIM_GRACE_S >= 24 * 3600


def test_only_measures_without_claiming(store: StateStore) -> None:
    ledger, rule = Ledger(store), AlertRule(store)
    res = _spend(ledger, 9.0, tenant=None)
    seen = rule.observe(watches(res)[0], THRESHOLDS, T0, claim=False)
    assert seen.alerts == () and seen.utilization == pytest.approx(0.9)
    assert [a.threshold for a in rule.observe(watches(res)[0], THRESHOLDS, T0).alerts] == [50, 80, 90]


@pytest.mark.processes
def test_concurrent_settlements_in_many_processes_alert_each_threshold_once(backend: Any) -> None:
    """Twelve clients (one per thread, as processes sharing the store are), each its own rule,
    settle 10 requests each and look after every settle: each threshold is claimed once."""
    clients = [backend.open() for _ in range(12)]
    start = threading.Barrier(len(clients))
    got: list[BudgetAlert] = []
    lock = threading.Lock()

    def work(store: StateStore) -> None:
        ledger, rule = Ledger(store), AlertRule(store)
        start.wait()
        for _ in range(10):
            res = _spend(ledger, 0.1, budget=12.0, tenant_budget=13.0)  # 120 x 0.1 = 12.0
            for w in watches(res):
                alerts = rule.observe(w, THRESHOLDS, T0).alerts
                with lock:
                    got.extend(alerts)

    threads = [threading.Thread(target=work, args=(s,)) for s in clients]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted((a.scope, a.threshold) for a in got) == [
        ("tenant", 50), ("tenant", 80), ("tenant", 90),  # 12.0 of 13.0: 92%
        ("user", 50), ("user", 80), ("user", 90), ("user", 100),
    ]
    assert Ledger(clients[0]).status("alice", 12.0, T0).spent_usd == pytest.approx(12.0)
    user80 = next(a for a in got if a.scope == "user" and a.threshold == 80)
    assert usd_to_nano(user80.spent_usd) * 100 >= usd_to_nano(12.0) * 80
