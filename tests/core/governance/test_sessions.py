"""A WebSocket session's budget slice on a real ledger, its frame rate and its per-user bound."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from candela_mitm.config import State
from candela_mitm.governance.ledger import Ledger, Reservation
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.governance.ratelimit import RateLimiter, TokenLimits
from candela_mitm.governance.sessions import (
    FrameRate,
    SessionBudget,
    SessionLeases,
    SessionLimits,
    SessionTally,
    session_lease_key,
)
from candela_mitm.governance.users import TenantSettings
from candela_mitm.providers.usage import Usage
from candela_mitm.state import open_state_store

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)
U = "alice@example.com"
SLICE = 0.10


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(open_state_store(State(sqlite_path=str(tmp_path / "s.db"))), clock=lambda: T0)


def session(ledger: Ledger, budget: float) -> SessionBudget:
    first = ledger.reserve(U, None, SLICE, budget, "span-1", model="gpt-realtime", provider="openai")
    assert isinstance(first, Reservation)
    return SessionBudget(ledger, U, None, budget, "span-1", SLICE, "openai", held=first)


def test_each_usage_frame_is_settled_and_the_slice_topped_up(ledger):
    s = session(ledger, budget=1.0)
    assert s.settle(0.03, Usage(100, 10), "gpt-realtime")
    assert s.settle(0.04, Usage(100, 10), "gpt-realtime")
    st = ledger.status(U, 1.0)
    assert st.spent_usd == pytest.approx(0.07)
    assert st.reserved_usd == pytest.approx(SLICE)  # one slice held at a time
    assert s.close("gpt-realtime") == 0.0  # nothing pending: the slice is given back
    assert ledger.status(U, 1.0).reserved_usd == 0
    assert ledger.spent_today(U) == pytest.approx(0.07)


def test_the_last_slice_is_what_is_left_and_then_the_budget_is_exhausted(ledger):
    s = session(ledger, budget=0.25)
    assert s.settle(0.10, Usage(), "m")  # spent 0.10, holds 0.10
    assert s.settle(0.10, Usage(), "m")  # spent 0.20, holds the 0.05 left
    assert s.held is not None and s.held.amount_usd == pytest.approx(0.05)
    assert not s.settle(0.06, Usage(), "m")  # spent 0.26: nothing left to hold
    assert s.held is None and s.charged_usd == pytest.approx(0.26)
    assert ledger.status(U, 0.25).reserved_usd == 0


def test_a_session_ending_with_work_unreported_is_charged_its_slice(ledger):
    s = session(ledger, budget=1.0)
    s.pending = True  # a client frame was forwarded, no usage frame followed
    assert s.close("gpt-realtime") == pytest.approx(SLICE)
    assert s.charged_reservation
    assert ledger.spent_today(U) == pytest.approx(SLICE)


def test_a_session_that_forwarded_nothing_costs_nothing(ledger):
    s = session(ledger, budget=1.0)
    assert s.close("gpt-realtime") == 0.0 and not s.charged_reservation
    assert ledger.spent_today(U) == 0


def test_a_usage_frame_after_a_cut_is_still_recorded(ledger):
    s = session(ledger, budget=0.1)
    assert not s.settle(0.2, Usage(), "m")
    assert not s.settle(0.01, Usage(), "m")
    assert ledger.spent_today(U) == pytest.approx(0.21)


def test_a_session_opened_with_a_budgeted_key_tops_up_within_the_keys_budget(ledger):
    from candela_mitm.governance.ledger import KeyBudget

    key = KeyBudget("k_a", "k_a", 0.25)
    first = ledger.reserve(U, None, SLICE, 10.0, "span-1", model="m", provider="openai",
                           key_budget=key)
    assert isinstance(first, Reservation)
    s = SessionBudget(ledger, U, None, 10.0, "span-1", SLICE, "openai", held=first)
    assert s.settle(0.10, Usage(), "m")  # key: spent 0.10, holds 0.10
    assert s.settle(0.10, Usage(), "m")  # key: spent 0.20, holds the 0.05 left (user: 9.80)
    assert s.held is not None and s.held.amount_usd == pytest.approx(0.05)
    assert not s.settle(0.06, Usage(), "m")  # the key's budget is spent: the session ends
    status = ledger.key_status(key)
    assert status.spent_usd == pytest.approx(0.26) and status.reserved_usd == 0
    assert ledger.status(U, 10.0).remaining_usd == pytest.approx(9.74)  # the user has room


def tenant_session(ledger: Ledger, tenant_budget: float, **kw) -> SessionBudget:
    first = ledger.reserve(U, "t", SLICE, 10.0, "span-1", model="m", provider="openai",
                           tenant_budget_usd=tenant_budget, tenant_period=BudgetPeriod("monthly"))
    assert isinstance(first, Reservation)
    return SessionBudget(ledger, U, "t", 10.0, "span-1", SLICE, "openai", held=first, **kw)


def test_top_ups_hold_on_the_tenants_budget_and_its_end_cuts_the_session(ledger):
    s = tenant_session(ledger, 0.25)
    monthly = BudgetPeriod("monthly")
    assert s.settle(0.10, Usage(), "m")  # tenant: spent 0.10, holds 0.10
    assert ledger.tenant_status("t", 0.25, monthly).reserved_usd == pytest.approx(SLICE)
    assert s.settle(0.10, Usage(), "m")  # tenant: spent 0.20, holds the 0.05 left
    assert s.held is not None and s.held.amount_usd == pytest.approx(0.05)
    assert not s.settle(0.06, Usage(), "m")  # the tenant's budget is spent: the session ends
    assert s.refusal is not None
    assert (s.refusal.scope, s.refusal.tenant, s.refusal.period) == ("tenant", "t", "monthly")
    assert s.refusal.budget_usd == 0.25 and s.refusal.remaining_usd == 0
    status = ledger.tenant_status("t", 0.25, monthly)
    assert status.spent_usd == pytest.approx(0.26) and status.reserved_usd == 0
    assert ledger.status(U, 10.0).remaining_usd == pytest.approx(9.74)  # the user has room


def test_top_ups_read_the_tenants_budget_as_the_directory_says_now(ledger):
    budgets = {"t": 10.0}

    def tenant_settings(tenant: str) -> TenantSettings:
        return TenantSettings(tenant, budgets[tenant], BudgetPeriod("monthly"), "store")

    s = tenant_session(ledger, 10.0, tenant_settings=tenant_settings)
    assert s.settle(0.10, Usage(), "m")
    budgets["t"] = 0.15  # an admin lowers it mid-session: the next top-up holds what is left
    assert s.settle(0.02, Usage(), "m")  # tenant: spent 0.12, holds the 0.03 left
    assert s.held is not None and s.held.amount_usd == pytest.approx(0.03)
    assert not s.settle(0.03, Usage(), "m")
    assert s.refusal is not None and s.refusal.scope == "tenant" and s.refusal.budget_usd == 0.15


def test_a_top_up_shrinks_to_the_smallest_budget_left(ledger):
    from candela_mitm.governance.ledger import KeyBudget

    key = KeyBudget("k_a", "k_a", 0.27)
    first = ledger.reserve(U, "t", SLICE, 0.30, "span-1", model="m", provider="openai",
                           tenant_budget_usd=0.28, key_budget=key)
    assert isinstance(first, Reservation)
    s = SessionBudget(ledger, U, "t", 0.30, "span-1", SLICE, "openai", held=first)
    # spent 0.20 everywhere: the user has 0.10 left, the tenant 0.08, the key 0.07
    assert s.settle(0.20, Usage(), "m")
    assert s.held is not None and s.held.amount_usd == pytest.approx(0.07)
    assert s.held.tenant_hold_usd == pytest.approx(0.07) and s.held.key_hold_usd == pytest.approx(0.07)
    assert not s.settle(0.07, Usage(), "m") and s.refusal is not None
    assert s.refusal.scope == "key" and s.refusal.key_id == "k_a"


@pytest.mark.parametrize(
    "times, limit, allowed",
    [
        ([0.0, 0.1, 0.2], 2, [True, True, False]),
        ([0.0, 0.5, 1.0, 1.1], 2, [True, True, True, True]),  # a new second, a new count
        ([5.0] * 4, 3, [True, True, True, False]),
    ],
)
def test_frame_rate(times, limit, allowed):
    r = FrameRate(limit)
    assert [r.allow(t) for t in times] == allowed


def test_sessions_per_user_are_leases_on_the_store_every_process_shares(tmp_path):
    clock = [T0]
    db = str(tmp_path / "l.db")
    one = SessionLeases(open_state_store(State(sqlite_path=db)), "host:1", lambda: clock[0], 60)
    two = SessionLeases(open_state_store(State(sqlite_path=db)), "host:2", lambda: clock[0], 60)
    a = one.acquire(U, 2)
    b = two.acquire(U, 2)
    assert a and b and one.acquire(U, 2) is None and two.acquire(U, 2) is None
    assert one.acquire("bob@example.com", 2) is not None  # per user
    # a user's session key is never a user's concurrency key (its user id)
    assert {x.key for x in one.store.leases()} == {
        session_lease_key(U), session_lease_key("bob@example.com")
    }
    assert two.release(U, b) and one.acquire(U, 2) is not None


def test_a_session_lease_lives_while_it_is_renewed(tmp_path):
    clock = [T0]
    leases = SessionLeases(open_state_store(State(sqlite_path=str(tmp_path / "l.db"))),
                           "host:1", lambda: clock[0], 60)
    held = leases.acquire(U, 1)
    assert held is not None
    clock[0] = T0 + timedelta(seconds=50)
    assert leases.renew(U, held)
    clock[0] = T0 + timedelta(seconds=100)  # past the first expiry, within the renewed one
    assert leases.acquire(U, 1) is None
    clock[0] = T0 + timedelta(seconds=111)  # not renewed: a dead process's place frees itself
    assert not leases.renew(U, held)
    assert leases.acquire(U, 1) is not None


def test_the_first_end_reason_wins():
    t = SessionTally("realtime", "openai-realtime")
    t.use_model("a")
    t.use_model("b")
    t.use_model("a")
    t.end("budget", "budget_exceeded")
    t.end("upstream")
    assert (t.ended_by, t.end_code, t.models, t.model) == ("budget", "budget_exceeded", ["a", "b"], "a")


# --- requests and tokens per minute ----------------------------------------------------------


@pytest.fixture
def limiter(tmp_path: Path) -> RateLimiter:
    store = open_state_store(State(sqlite_path=str(tmp_path / "r.db")))
    return RateLimiter(store, clock=lambda: T0)


def limits(limiter: RateLimiter, rpm: int = 100, **tokens: int) -> SessionLimits:
    tenant = tokens.pop("tenant_total", None)
    return SessionLimits(
        limiter, U, rpm, TokenLimits(**tokens), "research",
        TokenLimits(total_tokens=tenant) if tenant is not None else None,
    )


def test_each_request_for_work_counts_against_requests_per_minute(limiter):
    s = limits(limiter, rpm=2)
    assert s.admit() is None and s.admit() is None
    refused = s.admit()
    assert refused is not None and refused.kind == "requests" and refused.limit == 2
    # an HTTP request of the same user shares the window: refused too
    assert not limiter.check(U, 2).allowed


def test_a_response_the_provider_started_itself_counts_at_its_usage_frame(limiter):
    s = limits(limiter, rpm=2)
    assert s.admit() is None
    assert s.count_usage(Usage(10, 5)) is None  # the admitted request's usage: no new count
    assert s.count_usage(Usage(10, 5)) is None  # started by the provider: counted now (2 of 2)
    refused = s.count_usage(Usage(10, 5))  # a third in the minute ends the session
    assert refused is not None and refused.kind == "requests"


def test_usage_taking_a_token_window_past_its_limit_ends_the_session(limiter):
    s = limits(limiter, output_tokens=100)
    assert s.admit() is None
    assert s.count_usage(Usage(1000, 60)) is None  # 60 of 100
    assert s.admit() is None
    refused = s.count_usage(Usage(1000, 50))  # 110 of 100
    assert refused is not None and (refused.kind, refused.scope) == ("output_tokens", "user")
    assert refused.retry_after_s == 60


def test_a_full_token_window_refuses_the_next_request(limiter):
    s = limits(limiter, total_tokens=100)
    assert s.admit() is None
    assert s.count_usage(Usage(60, 40)) is None  # exactly the limit: not past it
    refused = s.admit()
    assert refused is not None and refused.kind == "total_tokens"


def test_the_hold_is_replaced_by_the_usage_not_added_to_it(limiter):
    s = limits(limiter, input_tokens=10)
    for _ in range(5):
        assert s.admit() is None  # each holds one input token
    for _ in range(5):
        assert s.count_usage(Usage(2, 0)) is None  # 2 each: 10 in all, the limit
    assert s.admit() is not None


def test_the_tenants_token_limit_counts_every_session_of_its_users(limiter):
    a = limits(limiter, tenant_total=100)
    b = SessionLimits(limiter, "bob@example.com", 100, TokenLimits(), "research",
                      TokenLimits(total_tokens=100))
    assert a.admit() is None and a.count_usage(Usage(50, 10)) is None
    assert b.admit() is None
    refused = b.count_usage(Usage(30, 20))  # 110 of the tenant's 100
    assert refused is not None and (refused.kind, refused.scope) == ("total_tokens", "tenant")
    assert a.admit() is not None  # alice's next request finds the tenant's window full


def test_without_token_limits_nothing_is_held(limiter):
    s = limits(limiter)
    assert s.admit() is None and s.pending[0].token_entry is None
    assert s.count_usage(Usage(10**9, 10**9)) is None
