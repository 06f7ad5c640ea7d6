"""What a request reserves, in one place (issue 13): the budget hold and the token estimate."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance.admission import (
    BudgetReserve,
    Checked,
    Hold,
    PriceUnknown,
    Rules,
    admit,
    body_scan,
    budget_hold,
    token_estimate,
)
from candela_mitm.governance.estimate import BodyScan, estimate_cost, scan
from candela_mitm.governance.ledger import BudgetRefusal, Ledger, Reservation
from candela_mitm.governance.periods import DAILY_UTC
from candela_mitm.governance.ratelimit import RateLimiter, TokenLimits
from candela_mitm.governance.users import TenantSettings, UserSettings
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.state.memory import MemoryStateStore

TABLE = PricingTable()
RULES = Rules(default_max_output_tokens=4096, unknown_model_price="deny", session_reserve_usd=0.05)
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello " * 50}]}


def plan(
    model: str | None = "gpt-4o-mini",
    *,
    local: bool = False,
    session: bool = False,
    metered: bool = True,
    max_output: int | None = None,
    provider: str = "openai",
) -> Any:
    """The fields of a ForwardPlan the rule reads."""
    upstream = SimpleNamespace(name=provider, spec=SimpleNamespace(local=local))
    return SimpleNamespace(
        upstream=upstream,
        model=model,
        session=session,
        metered=metered,
        max_output_tokens=max_output,
        operation=SimpleNamespace(model="body"),  # the model read from the body, not a batch file
        batch=None,
    )


def priced(model: str, provider: str = "openai", max_output: int | None = None) -> float:
    price = TABLE.get(model, provider)
    assert price is not None
    return estimate_cost(BODY, max_output, 4096, price)


@pytest.mark.parametrize(
    "p, rules, expected",
    [
        (None, RULES, None),
        (plan(local=True), RULES, None),  # local models cost nothing
        (plan(None), RULES, None),  # no model named: nothing to price
        (plan(metered=False), RULES, None),  # a free read
        (plan(session=True), RULES, Hold(0.05, "gpt-4o-mini", "openai")),  # a session's slice
        (plan("no-such-model-xyz"), RULES, PriceUnknown("no-such-model-xyz")),
        (
            plan("no-such-model-xyz"),
            Rules(4096, "zero", 0.05),
            None,  # unknown_model_price: zero
        ),
        (plan(), RULES, Hold(priced("gpt-4o-mini"), "gpt-4o-mini", "openai")),
        (plan(max_output=10), RULES, Hold(priced("gpt-4o-mini", max_output=10), "gpt-4o-mini", "openai")),
    ],
)
def test_what_a_request_reserves(p: Any, rules: Rules, expected: object) -> None:
    got = budget_hold(p, TABLE, rules, BODY, None)
    if isinstance(expected, Hold):
        assert isinstance(got, Hold)
        assert (got.model, got.provider) == (expected.model, expected.provider)
        assert got.estimate_usd == pytest.approx(expected.estimate_usd, rel=1e-12)
        assert got.estimate_usd > 0
    else:
        assert got == expected


def test_a_scan_made_already_is_used_not_made_again() -> None:
    made = scan(BODY)
    assert body_scan(BODY, made) is made
    bigger = BodyScan(chars=made.chars * 100)
    # the estimate follows the scan it is given (a large body's, made off the loop)
    small = budget_hold(plan(), TABLE, RULES, BODY, made)
    large = budget_hold(plan(), TABLE, RULES, BODY, bigger)
    assert isinstance(small, Hold) and isinstance(large, Hold)
    assert large.estimate_usd > small.estimate_usd
    price = TABLE.get("gpt-4o-mini")
    assert price is not None and price.max_output_tokens  # the model's own limit, not the default
    want = (bigger.input_tokens(), price.max_output_tokens)
    assert token_estimate(plan(), TABLE, RULES, BODY, bigger) == want


@pytest.mark.parametrize(
    "p, expected_out",
    [
        (plan(None), None),  # not an inference call: no token estimate
        (plan(max_output=100), 100),
        (plan("no-such-model-xyz"), 4096),  # unpriced: the configured default
        (plan("no-such-model-xyz", max_output=7), 7),
    ],
)
def test_token_estimate(p: Any, expected_out: int | None) -> None:
    got = token_estimate(p, TABLE, RULES, BODY, None)
    if expected_out is None:
        assert got is None
    else:
        assert got == (scan(BODY).input_tokens(), expected_out)


def test_rules_come_from_the_governance_config() -> None:
    cfg = parse_config(
        {
            "governance": {
                "unknown_model_price": "zero",
                "budgets": {"default_max_output_tokens": 123},
                "websocket": {"reserve_usd": 0.2},
            }
        }
    )
    assert Rules.of(cfg.governance) == Rules(123, "zero", 0.2)


# -- the slice key, made once per budgets and period (admission.carve) -------------------------


def test_rules_for_follows_a_reload() -> None:
    """rules_for keeps the Rules of one configuration: a reload (a new config) has its own."""
    from candela_mitm.governance.admission import rules_for

    a = parse_config({"governance": {"budgets": {"default_max_output_tokens": 100}}})
    b = parse_config({"governance": {"budgets": {"default_max_output_tokens": 200}}})
    assert rules_for(a.governance).default_max_output_tokens == 100
    assert rules_for(a.governance) is rules_for(a.governance)
    assert rules_for(b.governance).default_max_output_tokens == 200
    assert rules_for(a.governance).default_max_output_tokens == 100


class _Slices:
    """What carve uses of Slices, recording the key each carve asks for."""

    def __init__(self, now: Any) -> None:
        from candela_mitm.governance.slices import Slices

        self.rules = SimpleNamespace(enabled=True)
        self.now = now
        self.key_of = Slices.key_of
        self.keys: list[Any] = []

    def clock(self) -> Any:
        return self.now

    def carve(self, key: Any, amount: float, request_id: str) -> None:
        self.keys.append(key)
        return None


def test_carve_asks_for_the_key_of_the_budgets_in_force() -> None:
    """Every carve names the key Slices.key_of makes for that moment, whatever was cached: an
    admin change to a user's, tenant's or key's budget, a new day, a weekly period in a time
    zone crossing its boundary, a clock set back."""
    from datetime import UTC, datetime, timedelta

    from candela_mitm.governance.admission import carve
    from candela_mitm.governance.identity import KeyScope
    from candela_mitm.governance.ledger import KeyBudget
    from candela_mitm.governance.periods import BudgetPeriod
    from candela_mitm.governance.users import TenantSettings, UserSettings

    weekly = BudgetPeriod("weekly", "Europe/Paris")
    user = UserSettings("u@x", "developer", ("t",), 10.0, 60, "store")
    tenants = {"t": TenantSettings("t", 50.0, weekly, "store")}
    p = SimpleNamespace(session=False, batch=None, operation=SimpleNamespace(job=None, model="chat"))
    hold = Hold(0.01, "gpt-4o-mini", "openai")
    t0 = datetime(2026, 5, 17, 21, 30, tzinfo=UTC)  # a Sunday: Paris's week ends at 22:00 UTC
    s = _Slices(t0)
    steps: list[tuple[Any, UserSettings, str | None, Any]] = [
        (t0, user, None, None),
        (t0 + timedelta(minutes=1), user, None, None),  # the same
        (t0, user, "t", None),
        (t0 + timedelta(minutes=20), user, "t", None),  # same day, Paris's week still
        (t0 + timedelta(minutes=31), user, "t", None),  # Paris's new week, the same UTC day
        (t0 + timedelta(minutes=31), UserSettings("u@x", "developer", ("t",), 12.0, 60, "store"),
         "t", None),  # an admin change to the user's budget
        (t0 + timedelta(hours=3), user, None, None),  # a new UTC day
        (t0 + timedelta(hours=3), user, None, KeyScope("k_1", (), 2.0, "k_0")),
        (t0 + timedelta(hours=3), user, None, KeyScope("k_1", (), 3.0, "k_0")),  # key budget
        (t0 - timedelta(days=7), user, "t", None),  # a clock set back
    ]
    for i, (now, settings, tenant, key) in enumerate(steps):
        s.now = now
        if i == 4:
            tenants["t"] = TenantSettings("t", 60.0, weekly, "store")  # the tenant's budget
        carve(s, p, hold, settings, tenant, tenants.get, f"r{i}", key)  # type: ignore[arg-type]
        t = tenants[tenant] if tenant else None
        kb = KeyBudget(key.key_id, key.budget_id, key.budget_usd) if key else None
        assert s.keys[-1] == s.key_of(
            settings.user_id, settings.daily_budget_usd, settings.budget_period, tenant,
            t.budget_usd if t else None, t.period if t else settings.budget_period, kb, now,
        ), i
    assert len({k.tenant_period for k in s.keys if k.tenant}) == 3  # the test crossed periods


@pytest.mark.parametrize(
    "limits",
    [(None, None, None), (10, None, None), (None, 0, None), (None, None, 5), (1, 2, 3)],
)
def test_token_limited_is_token_limits_active(limits) -> None:
    from candela_mitm.governance.admission import token_limited
    from candela_mitm.governance.users import UserSettings

    s = UserSettings("u", "developer", (), 1.0, 60, "store", False, **dict(
        zip(("input_tokens_per_minute", "output_tokens_per_minute", "total_tokens_per_minute"),
            limits, strict=True)))
    assert token_limited(s) == bool(s.token_limits.active())


@pytest.mark.parametrize(
    "limits",
    [(None, None, None), (10, None, None), (None, 0, None), (None, None, 5), (1, 2, 3)],
)
def test_limits_set_is_token_limits_active(limits) -> None:
    from candela_mitm.governance.admission import limits_set
    from candela_mitm.governance.ratelimit import TokenLimits

    t = TokenLimits(*limits)
    assert limits_set(t) == bool(t.active())


# -- the admission's store call: the rate step and the reservation folded in one (issue 21) -----


class Spy(MemoryStateStore):
    """The memory store, naming the calls made of it (a folded call's own two too)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        got = super().__getattribute__(name)
        if name in ("rate_hit_reserve", "rate_hit", "reserve", "lease_acquire", "token_admit"):
            super().__getattribute__("calls").append(name)
        return got


NOW = datetime(2026, 5, 17, 12, tzinfo=UTC)
HOLD = Hold(0.25, "gpt-4o-mini", "openai")


def admit_on(
    store: Spy,
    *,
    rpm: int = 5,
    budget: float = 10.0,
    user: dict[str, Any] | None = None,
    tenant: TenantSettings | None = None,
    rate_decided: bool = False,
    tokens: tuple[int, int] | None = (10, 20),
    hold: bool = True,
    fold: bool = True,
) -> Checked:
    settings = UserSettings("u", "developer", ("t",), budget, rpm, "store", **(user or {}))
    ledger = Ledger(store, clock=lambda: NOW, owner="host:1")
    reserve_hold = (
        BudgetReserve(ledger, settings, "t" if tenant else None, lambda _t: tenant, "span", HOLD)
        if hold
        else None
    )
    return admit(
        RateLimiter(store, clock=lambda: NOW),
        settings,
        "t" if tenant else None,
        lambda _t: tenant,  # type: ignore[arg-type, return-value]
        rate_decided=rate_decided,
        owner="host:1",
        tokens=tokens,
        reserve_hold=reserve_hold,
        undo_on_error=False,
        store=store if fold else None,
    )


def plain_tenant(**kw: Any) -> TenantSettings:
    return TenantSettings("t", kw.pop("budget_usd", None), DAILY_UTC, "store", **kw)


# what the admission is -> whether it is folded into one store call
@pytest.mark.parametrize(
    "case, folded",
    [
        ({}, True),  # the idle user's request: the rate step and the reservation
        ({"tenant": plain_tenant(budget_usd=5.0)}, True),  # a tenant's budget too
        ({"user": {"input_tokens_per_minute": 100}, "tokens": None}, True),  # not an inference
        ({"rate_decided": True}, False),  # its rate was decided at the head (a large body)
        ({"rpm": 0}, False),  # a limit of 0 refuses without asking the store
        ({"hold": False}, False),  # nothing to reserve
        ({"fold": False}, False),  # no store given: the steps one by one
        ({"user": {"max_concurrent_requests": 2}}, False),
        ({"tenant": plain_tenant(max_concurrent_requests=2)}, False),
        ({"user": {"output_tokens_per_minute": 100}}, False),
        ({"tenant": plain_tenant(token_limits=TokenLimits(total_tokens=1_000))}, False),
    ],
)
def test_the_admission_is_folded_only_when_it_is_the_rate_step_and_the_reservation(
    case: dict[str, Any], folded: bool
) -> None:
    store = Spy()
    checked = admit_on(store, **case)
    assert (store.calls[:1] == ["rate_hit_reserve"]) is folded
    assert ("rate_hit_reserve" in store.calls) is folded
    if folded:  # the port's default: the two calls in turn, inside it
        assert store.calls == ["rate_hit_reserve", "rate_hit", "reserve"]
    # the same outcome as the steps one by one, on a store of its own
    apart = admit_on(Spy(), **{**case, "fold": False})
    assert checked.decisions == apart.decisions
    assert (checked.admission is None) is (apart.admission is None)  # (its ids are random)
    assert checked.admission is None or not folded  # a folded admission holds no lease
    assert type(checked.reserved) is type(apart.reserved)
    if isinstance(checked.reserved, Reservation) and isinstance(apart.reserved, Reservation):
        assert replace(checked.reserved, id="", seen=None) == replace(apart.reserved, id="")


@pytest.mark.parametrize(
    "rpm, budget, outcome",
    [
        (5, 10.0, Reservation),  # admitted, reserved
        (5, 0.1, BudgetRefusal),  # admitted, the budget refuses: its request stays counted
        (1, 10.0, None),  # the second request is rate limited: nothing reserved
    ],
)
def test_a_folded_admission_answers_each_outcome(rpm: int, budget: float, outcome: type | None) -> None:
    store = Spy()
    first = admit_on(store, rpm=rpm, budget=budget)
    assert first.refusal is None and first.admission is None
    second = admit_on(store, rpm=rpm, budget=budget)
    if outcome is None:
        assert second.refusal is not None and second.refusal.kind == "requests"
        assert second.reserved is None
        assert [r.amount for r in store.active_reservations()] == [250_000_000]  # the first's
        return
    assert isinstance(second.reserved, outcome) and isinstance(first.reserved, outcome)
    assert second.decisions[0].remaining == rpm - 2  # both counted
    if outcome is BudgetRefusal:
        assert isinstance(second.reserved, BudgetRefusal)
        assert second.reserved.scope == "user" and second.reserved.estimated_cost_usd == 0.25
        assert store.active_reservations() == []
