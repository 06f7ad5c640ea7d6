"""A WebSocket session's budget slice on a real ledger, its frame rate and its per-user bound."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from candela_mitm.config import State
from candela_mitm.governance.ledger import Ledger, Reservation
from candela_mitm.governance.sessions import FrameRate, OpenSessions, SessionBudget, SessionTally
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


def test_open_sessions_per_user():
    o = OpenSessions()
    assert o.acquire("a", 2) and o.acquire("a", 2) and not o.acquire("a", 2)
    assert o.acquire("b", 2) and o.total() == 3
    o.release("a")
    assert o.count("a") == 1 and o.acquire("a", 2)
    o.release("nobody")  # never below zero
    assert o.count("nobody") == 0


def test_the_first_end_reason_wins():
    t = SessionTally("realtime", "openai-realtime")
    t.use_model("a")
    t.use_model("b")
    t.use_model("a")
    t.end("budget", "budget_exceeded")
    t.end("upstream")
    assert (t.ended_by, t.end_code, t.models, t.model) == ("budget", "budget_exceeded", ["a", "b"], "a")
