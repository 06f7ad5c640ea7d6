"""The state contract of settle_part (a budget slice's spend recorded while it stays held), on
SQLite, Redis and memory."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from candela_mitm.state.ports import (
    ActiveReservation,
    DayTotals,
    GrantRow,
    NewReservation,
    SpendPart,
    StateStore,
    shrink_holds,
    to_us,
)

T0_US = to_us(datetime(2026, 5, 17, 12, 0, tzinfo=UTC))
DAY = "2026-05-17"
P = "monthly:2026-05-01"


def slice_of(rid: str, amount: int, budget: int = 10_000, **kw: object) -> NewReservation:
    return NewReservation(
        rid, "u", "t", DAY, amount, budget, "slice:" + rid, "host:1", T0_US, **kw  # type: ignore[arg-type]
    )


def part(cost: int, model: str = "gpt-4o", requests: int = 1) -> SpendPart:
    return SpendPart(model, "openai", cost, 10 * requests, 20 * requests, requests)


def test_shrink_holds() -> None:
    assert shrink_holds(100, {}, 30, {}) == (30, {})
    assert shrink_holds(100, {}, 130, {}) == (100, {})  # an overdraw past the hold
    assert shrink_holds(10, {"g1": 50, "g2": 5}, 10, {"g1": 20, "g3": 4}) == (10, {"g1": 20})


def test_a_slice_records_its_parts_and_stays_held(store: StateStore) -> None:
    assert store.reserve(slice_of("s", 4_000)).ok
    done = store.settle_part("s", [part(300), part(200, "gpt-4o-mini"), part(100)], T0_US + 1)
    assert done.applied and done.cost == 600 and done.from_allowance == 600
    assert store.day_totals("u", DAY) == DayTotals(600, 0, 3_400)
    (active,) = store.active_reservations()
    assert (active.reservation_id, active.settled, active.parts) == ("s", 600, 3)
    rows = {(r.model, r.cost, r.tokens_in, r.tokens_out, r.requests) for r in store.spend_rows()}
    assert rows == {("gpt-4o", 400, 20, 40, 2), ("gpt-4o-mini", 200, 10, 20, 1)}
    # bundled parts count every request they stand for
    assert store.settle_part("s", [part(1_000, requests=4)], T0_US + 2).applied
    assert store.day_totals("u", DAY) == DayTotals(1_600, 0, 2_400)
    assert store.active_reservations()[0].parts == 7
    # returned: what is left of it is free again; nothing more is recorded on it
    assert store.release("s", T0_US + 3)
    assert store.day_totals("u", DAY) == DayTotals(1_600, 0, 0)
    assert not store.settle_part("s", [part(1)], T0_US + 4).applied
    assert store.day_totals("u", DAY) == DayTotals(1_600, 0, 0)
    assert not store.settle_part("missing", [part(1)], T0_US + 4).applied
    # what the budget has left: 8,400, exactly
    assert not store.reserve(slice_of("t", 8_401)).ok
    assert store.reserve(slice_of("u", 8_400)).ok


def test_spend_past_the_slice_overdraws_it_and_leaves_no_hold(store: StateStore) -> None:
    assert store.reserve(slice_of("s", 1_000)).ok
    assert store.reserve(slice_of("other", 2_000)).ok
    assert store.settle_part("s", [part(1_500)], T0_US + 1).applied
    # its own 1,000 and 500 of the free allowance: the other slice's hold is untouched
    assert store.day_totals("u", DAY) == DayTotals(1_500, 0, 2_000)
    assert store.release("s", T0_US + 2)
    assert store.day_totals("u", DAY) == DayTotals(1_500, 0, 2_000)


def test_a_slice_on_a_grant_draws_its_own_grant_hold(store: StateStore) -> None:
    store.add_grant(GrantRow("g1", "u", 5_000, 0, 0, T0_US + 10**9, "bonus", "admin", T0_US))
    # the allowance (1,000) and 3,000 of the grant
    got = store.reserve(slice_of("s", 4_000, budget=1_000))
    assert got.ok and got.daily_hold == 1_000 and got.grant_holds == {"g1": 3_000}
    done = store.settle_part("s", [part(2_500)], T0_US + 1)
    assert done.applied and done.from_allowance == 1_000 and done.from_grants == {"g1": 1_500}
    (g,) = store.grants("u")
    assert (g.used, g.held) == (1_500, 1_500)
    assert store.day_totals("u", DAY) == DayTotals(2_500, 1_500, 0)
    assert store.release("s", T0_US + 2)
    (g,) = store.grants("u")
    assert (g.used, g.held) == (1_500, 0)
    # 3,500 of the grant is left, and no allowance
    assert not store.reserve(slice_of("t", 3_501, budget=1_000)).ok
    assert store.reserve(slice_of("t", 3_500, budget=1_000)).ok


def test_a_slice_shrinks_its_tenant_and_key_holds(store: StateStore) -> None:
    new = slice_of(
        "s", 600, budget=10**9, period=P, tenant_budget=1_000, tenant_period=P,
        key_id="k_a", key_budget=900, key_period=P,
    )
    assert store.reserve(new).ok
    assert store.settle_part("s", [part(250), part(150)], T0_US + 1).applied
    assert store.tenant_totals("t", P) == DayTotals(400, 0, 200)
    assert store.key_totals("k_a", P) == DayTotals(400, 0, 200)
    assert store.day_totals("u", P) == DayTotals(400, 0, 200)
    assert store.release("s", T0_US + 2)
    assert store.tenant_totals("t", P) == DayTotals(400, 0, 0)
    assert store.key_totals("k_a", P) == DayTotals(400, 0, 0)
    assert store.day_totals("u", P) == DayTotals(400, 0, 0)


def test_a_reclaimed_slice_still_records_spend(store: StateStore) -> None:
    assert store.reserve(slice_of("s", 3_000)).ok
    assert store.settle_part("s", [part(1_000)], T0_US + 1).applied
    assert store.release("s", T0_US + 2, reclaim=True)
    assert store.day_totals("u", DAY) == DayTotals(1_000, 0, 0)
    assert store.settle_part("s", [part(700)], T0_US + 3).applied
    assert store.day_totals("u", DAY) == DayTotals(1_700, 0, 0)
    assert store.active_reservations() == []


def test_active_reservations_name_what_a_slice_recorded(store: StateStore) -> None:
    assert store.reserve(slice_of("s", 3_000)).ok
    assert store.active_reservations() == [
        ActiveReservation("s", "host:1", T0_US, "u", "t", DAY, 3_000, "slice:s", "", "", 0, 0)
    ]
    assert store.settle_part("s", [part(5), part(7, "m2", requests=2)], T0_US + 1).applied
    (a,) = store.active_reservations()
    assert (a.amount, a.settled, a.parts) == (3_000, 12, 3)


def test_a_settle_after_parts_charges_exactly_the_rest(store: StateStore) -> None:
    """A dead process's slice (governance/reconcile.py): its parts recorded, then a settle of
    what is left of it charges that, releases its holds and nothing else."""
    new = slice_of(
        "s", 4_000, budget=10**9, period=P, tenant_budget=10_000, tenant_period=P,
        key_id="k_a", key_budget=9_000, key_period=P,
    )
    assert store.reserve(new).ok
    assert store.reserve(dataclasses.replace(slice_of("other", 500, budget=10**9), period=P)).ok
    assert store.settle_part("s", [part(1_000), part(500, "gpt-4o-mini")], T0_US + 1).applied
    (a,) = [x for x in store.active_reservations() if x.reservation_id == "s"]
    rest = a.amount - a.settled
    assert rest == 2_500
    done = store.settle("s", rest, 0, 0, "", "", T0_US + 2)
    assert done.applied and done.cost == 2_500
    # spent: the parts and the rest, its whole size; held: the other reservation's only
    assert store.day_totals("u", P) == DayTotals(4_000, 0, 500)
    assert store.tenant_totals("t", P) == DayTotals(4_000, 0, 0)
    assert store.key_totals("k_a", P) == DayTotals(4_000, 0, 0)
    assert [x.reservation_id for x in store.active_reservations()] == ["other"]
    assert sum(r.cost for r in store.spend_rows()) == 4_000
    # a repeat charges nothing more
    assert not store.settle("s", rest, 0, 0, "", "", T0_US + 3).applied
    assert store.day_totals("u", P) == DayTotals(4_000, 0, 500)


def test_a_settle_after_parts_on_a_grant_frees_the_grants_hold(store: StateStore) -> None:
    store.add_grant(GrantRow("g1", "u", 5_000, 0, 0, T0_US + 10**9, "bonus", "admin", T0_US))
    assert store.reserve(slice_of("s", 4_000, budget=1_000)).ok  # 1,000 allowance, 3,000 grant
    assert store.settle_part("s", [part(1_500)], T0_US + 1).applied
    assert store.settle("s", 2_500, 0, 0, "", "", T0_US + 2).applied
    (g,) = store.grants("u")
    assert (g.used, g.held) == (3_000, 0)
    assert store.day_totals("u", DAY) == DayTotals(4_000, 3_000, 0)
    # 2,000 of the grant is left, and no allowance
    assert not store.reserve(slice_of("t", 2_001, budget=1_000)).ok
    assert store.reserve(slice_of("t", 2_000, budget=1_000)).ok
