"""Crash reconciliation (governance/reconcile.py) over every state store backend: what a dead
process or an expired request left held is settled from its durable entry, else at its amount
with its entry first; a dead process's budget slice from its requests' entries, then the rest."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from candela_mitm.audit import AuditWriter
from candela_mitm.audit.actions import LLM_REQUEST
from candela_mitm.audit.query import charged_entries
from candela_mitm.config import Audit
from candela_mitm.errors import StoreUnavailable
from candela_mitm.governance.ledger import (
    Ledger,
    Reservation,
    UsageRow,
    default_owner,
    process_alive,
)
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.governance.reconcile import (
    AuditedCharge,
    SlicedCharge,
    StaleSettlement,
    audited_charges,
    reconcile_stale,
    record_stale_entries,
    sliced_charges,
    unrecorded_parts,
)
from candela_mitm.governance.slices import SliceRules, Slices
from candela_mitm.state import StateStore
from candela_mitm.state.liveness import host_id
from candela_mitm.state.ports import ActiveReservation, SpendPart, nano_to_usd, to_us, usd_to_nano
from candela_mitm.state.sqlite import SqliteStateStore

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)
U = "alice@example.com"
DAILY = BudgetPeriod("daily", "UTC")
RULES = SliceRules(requests=10, headroom=4, flush_s=0.05, idle_s=5.0)


def fixed(moment: datetime) -> Any:
    return lambda: moment


def reserve(ledger: Ledger, amount: float, budget: float = 10.0) -> Any:
    return ledger.reserve(U, "research-team", amount, budget, "req-1")


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_process_alive() -> None:
    me = default_owner()
    host = host_id()
    assert me.startswith(f"{host}:{os.getpid()}:")  # the pid, then its boot and start time
    assert process_alive(me) is True
    assert process_alive(f"{host}:{dead_pid()}") is False
    assert process_alive(f"{socket.gethostname()}[1]:{dead_pid()}") is True  # other namespace
    assert process_alive(f"another-host:{dead_pid()}") is True  # cannot tell: alive
    assert process_alive("garbage") is True


def test_reconcile_settles_dead_owners_at_their_reservation(store: StateStore) -> None:
    host = host_id()
    dead_owner = f"{host}:{dead_pid()}"
    crashed = Ledger(store, clock=fixed(T0), owner=dead_owner)
    other_host = Ledger(store, clock=fixed(T0), owner="elsewhere:1")
    me = Ledger(store, clock=fixed(T0))

    lost = crashed.reserve(U, "research-team", 6.0, 10.0, "span-1", model="gpt-4o", provider="openai")
    kept = reserve(other_host, 1.0)
    mine = reserve(me, 1.0)
    assert all(isinstance(r, Reservation) for r in (lost, kept, mine))
    assert me.status(U, 10.0).remaining_usd == 2.0

    settled = reconcile_stale(me, process_alive, max_age_s=3600)
    # the dead process's request may have reached the provider: charged its reservation, not freed
    assert [(s.reservation_id, s.request_id, s.reason) for s in settled] == [
        (lost.id, "span-1", "proxy_crash")
    ]
    (s,) = settled
    assert (s.user_id, s.tenant, s.model, s.provider, s.owner) == (
        U, "research-team", "gpt-4o", "openai", dead_owner
    )
    assert s.amount_usd == 6.0 and s.created_at == T0
    assert me.spent_today(U) == 6.0
    assert me.status(U, 10.0).reserved_usd == 2.0  # the live owners' holds stay
    assert me.status(U, 10.0).remaining_usd == 2.0
    assert me.usage(user=U) == [UsageRow("gpt-4o", "openai", 6.0, 0, 0, 1)]
    assert reconcile_stale(me, process_alive, max_age_s=3600) == []  # nothing left to settle

    # a late settle by the owner (it was not dead after all) changes nothing: charged once
    assert not me.settle(lost, 5.0, 1, 1, "gpt-4o", "openai").applied
    assert not me.release(lost)
    assert me.spent_today(U) == 6.0
    assert me.release(kept) and me.release(mine)


def held_by_a_dead_process(store: StateStore, *amounts: float) -> tuple[Ledger, list[Reservation]]:
    """This process's ledger, and reservations of `amounts` (spans span-a, span-b, ...; gpt-4o
    on openai, a 10.0 budget) held by a process now dead."""
    crashed = Ledger(store, clock=fixed(T0), owner=f"{host_id()}:{dead_pid()}")
    held = [
        crashed.reserve(U, None, amount, 10.0, f"span-{chr(97 + i)}", model="gpt-4o",
                        provider="openai")
        for i, amount in enumerate(amounts)
    ]
    assert all(isinstance(r, Reservation) for r in held)
    return Ledger(store, clock=fixed(T0)), cast(list[Reservation], held)


def test_reconcile_settles_from_the_durable_entry_when_there_is_one(store: StateStore) -> None:
    """Issue 16: the spend follows the request's audit entry; a process that died between the
    two is settled at the entry's cost (and needs no entry of its own), one that died before
    its entry at its reservation."""
    me, _ = held_by_a_dead_process(store, 4.0, 3.0)
    asked: list[set[str]] = []

    def audited(reservations: Any) -> dict[str, AuditedCharge]:
        asked.append({r.request_id for r in reservations})
        return {"span-a": AuditedCharge(1.25, 100, 20), "span-other": AuditedCharge(9.0, 1, 1)}

    settled = {s.request_id: s for s in reconcile_stale(me, process_alive, audited=audited)}
    assert asked == [{"span-a", "span-b"}]  # one look at the audit log, for the stale ones only
    assert (settled["span-a"].amount_usd, settled["span-a"].from_entry) == (1.25, True)
    assert (settled["span-b"].amount_usd, settled["span-b"].from_entry) == (3.0, False)
    assert me.spent_today(U) == pytest.approx(4.25)
    assert me.usage(user=U) == [UsageRow("gpt-4o", "openai", 4.25, 100, 20, 2)]
    assert me.status(U, 10.0).reserved_usd == 0
    assert reconcile_stale(me, process_alive, audited=audited) == []  # once
    assert len(asked) == 1  # nothing stale: the audit log is not read


def test_reconcile_writes_the_entry_before_the_spend(store: StateStore) -> None:
    """With `record`, the entries of what is settled at its amount are made durable first, and
    only a reservation whose entry was committed is settled: no crash point leaves a spend
    without its entry."""
    me, (a, _) = held_by_a_dead_process(store, 2.0, 3.0)
    seen: list[tuple[list[str], float]] = []

    def record(planned: Any) -> set[str]:
        seen.append((sorted(p.request_id for p in planned), me.spent_today(U)))
        return {a.id}  # b's entry failed (a full disk)

    settled = reconcile_stale(me, process_alive, record=record)
    assert seen == [(["span-a", "span-b"], 0.0)]  # both entries asked for before any spend
    assert [s.request_id for s in settled] == ["span-a"]
    assert me.spent_today(U) == 2.0
    assert me.status(U, 10.0).reserved_usd == 3.0  # b stays held: no entry, no spend
    (again,) = reconcile_stale(me, process_alive, record=lambda planned: {p.reservation_id for p in planned})
    assert again.request_id == "span-b" and me.spent_today(U) == 5.0


def test_reconcile_settles_by_age(store: StateStore) -> None:
    old = Ledger(store, clock=fixed(T0 - timedelta(hours=2)))
    young = Ledger(store, clock=fixed(T0 - timedelta(minutes=10)))
    now = Ledger(store, clock=fixed(T0))
    assert isinstance(reserve(old, 3.0), Reservation)
    assert isinstance(reserve(young, 3.0), Reservation)

    def unsure(owner: str) -> bool:
        raise OSError("cannot tell")

    assert reconcile_stale(now, unsure, max_age_s=None) == []  # unsure is alive
    (settled,) = reconcile_stale(now, None, max_age_s=3600)
    assert settled.reason == "expired" and settled.amount_usd == 3.0
    assert now.spent_today(U) == 3.0
    assert now.status(U, 10.0).remaining_usd == 4.0  # 3 spent, 3 still held by the young one


def test_reconcile_settles_grant_holds_as_spend(store: StateStore) -> None:
    host = host_id()
    crashed = Ledger(store, clock=fixed(T0), owner=f"{host}:{dead_pid()}")
    me = Ledger(store, clock=fixed(T0))
    g = me.add_grant(U, 5.0, T0 + timedelta(days=1), "launch", "admin@example.com")
    assert isinstance(reserve(crashed, 12.0), Reservation)  # 10 from the allowance, 2 from g
    assert len(reconcile_stale(me, process_alive)) == 1
    (after,) = me.list_grants(U)
    assert after.id == g.id and after.used_usd == 2.0 and after.held_usd == 0.0
    assert me.status(U, 10.0).remaining_usd == 3.0


def test_reconcile_forgets_old_finished_reservations(store: StateStore) -> None:
    then = Ledger(store, clock=fixed(T0 - timedelta(days=8)))
    r = reserve(then, 1.0)
    assert isinstance(r, Reservation)
    then.settle(r, 1.0, 1, 1, "gpt-4o", "openai")
    reconcile_stale(Ledger(store, clock=fixed(T0)), None, max_age_s=None)
    assert store.purge_finished(to_us(T0)) == 0  # reconcile purged it already


def test_a_store_failure_propagates(tmp_path: Any) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    ledger = Ledger(store, clock=fixed(T0))
    store.close()
    with pytest.raises(StoreUnavailable):
        reconcile_stale(ledger, process_alive)


# -- a dead process's budget slice -------------------------------------------------------------


def a_dead_slice(store: StateStore) -> tuple[Slices, Ledger]:
    """A process now dead that held a reservation of its own (1.0, span-own) and a budget slice
    taken after it (a budget reserving twice within idle_s asks for one); and this process's
    ledger."""
    crashed = Ledger(store, clock=lambda: T0, owner=f"{host_id()}:{dead_pid()}")
    slices = Slices(crashed, RULES, clock=lambda: T0)
    own = crashed.reserve(U, None, 1.0, 100.0, "span-own", model="gpt-4o", provider="openai")
    assert isinstance(own, Reservation)
    ask = slices.ask(own) or slices.ask(own)
    assert ask is not None and slices.took(ask, ask.reserve())
    return slices, Ledger(store, clock=lambda: T0)


def the_slice(store: StateStore) -> ActiveReservation:
    (sl,) = [x for x in store.active_reservations() if x.request_id.startswith("slice:")]
    return sl


def test_a_dead_owners_slice_is_settled_from_its_entries_and_charged_the_rest(
    store: StateStore,
) -> None:
    slices, me = a_dead_slice(store)
    k = slices.key_of(U, 100.0, DAILY, None, None, DAILY, None, T0)
    a, b, c, d = (slices.carve(k, 1.0, f"span-{i}") for i in range(4))
    assert a and b and c and d
    slices.settle(a, 0.5, 10, 1, "gpt-4o", "openai")
    slices.flush()  # a's spend recorded; b, c settled after the crash's last flush; d in flight
    sl = the_slice(store)
    assert (sl.settled, sl.parts) == (usd_to_nano(0.5), 1)
    size = nano_to_usd(sl.amount)
    assert size == 10.0  # requests (10) of the 1.0 hold
    asked: list[set[str]] = []

    def sliced(active: Any) -> dict[str, list[SlicedCharge]]:
        asked.append({x.reservation_id for x in active})
        return {a.slice: [SlicedCharge(0.5, 10, 1, "gpt-4o", "openai"),
                          SlicedCharge(0.25, 20, 2, "gpt-4o", "openai"),
                          SlicedCharge(0.75, 30, 3, "gpt-4o-mini", "openai")]}

    recorded: list[StaleSettlement] = []

    def record(planned: list[StaleSettlement]) -> set[str]:
        # the entry comes first: nothing is charged yet
        assert me.status(U, 100.0).reserved_usd == pytest.approx(1.0 + size - 1.5)
        recorded.extend(planned)
        return {s.reservation_id for s in planned}

    settled = reconcile_stale(me, process_alive, audited=lambda _: {}, sliced=sliced, record=record)
    assert asked == [{a.slice}]
    mine = {x.from_entry: x for x in settled if x.reservation_id == a.slice}
    # the spend its entries name past what it recorded, from the entries (b and c)
    assert mine[True].amount_usd == pytest.approx(1.0) and mine[True].reason == "proxy_crash"
    # what is left of it (d in flight among it) charged as a reservation without an entry
    rest = size - 1.5
    assert mine[False].amount_usd == pytest.approx(rest) and mine[False].reason == "proxy_crash"
    assert mine[False].request_id == sl.request_id
    assert {s.reservation_id: s.amount_usd for s in recorded} == pytest.approx(
        {a.slice: rest, sl_own(settled, a.slice): 1.0}
    )
    # the own reservation: charged at its amount (no entry); the slice: its whole size
    assert me.spent_today(U) == pytest.approx(size + 1.0)
    assert me.status(U, 100.0).reserved_usd == 0
    usage = {(r.model, r.requests) for r in me.usage(user=U)}
    # 1 flushed + 1 replayed + the own one; 1 replayed; the rest, under no model
    assert usage == {("gpt-4o", 3), ("gpt-4o-mini", 1), ("", 1)}
    assert store.active_reservations() == []


def sl_own(settled: list[StaleSettlement], slice_id: str) -> str:
    (other,) = {s.reservation_id for s in settled if s.reservation_id != slice_id}
    return other


def test_a_dead_slice_whose_entries_name_all_of_it_is_released(store: StateStore) -> None:
    _, me = a_dead_slice(store)
    sl = the_slice(store)
    size = nano_to_usd(sl.amount)
    entries = [SlicedCharge(size / 2, 1, 1, "gpt-4o", "openai")] * 2

    def nothing_to_record(planned: list[StaleSettlement]) -> set[str]:
        assert all(s.reservation_id != sl.reservation_id for s in planned)
        return {s.reservation_id for s in planned}

    settled = reconcile_stale(me, process_alive, audited=lambda _: {},
                              sliced=lambda _: {sl.reservation_id: entries},
                              record=nothing_to_record)
    assert [s.from_entry for s in settled if s.reservation_id == sl.reservation_id] == [True]
    assert me.spent_today(U) == pytest.approx(size + 1.0)
    assert me.status(U, 100.0).reserved_usd == 0
    assert store.active_reservations() == []


def test_a_dead_slices_rest_whose_entry_was_made_is_settled_from_it(store: StateStore) -> None:
    """A start that died between the rest's entry and its settle: the next settles from it."""
    _, me = a_dead_slice(store)
    sl = the_slice(store)
    size = nano_to_usd(sl.amount)

    def audited(active: Any) -> dict[str, AuditedCharge]:
        assert sl.request_id in {x.request_id for x in active}
        return {sl.request_id: AuditedCharge(size - 2.0, 0, 0)}

    def no_entry_for_it(planned: list[StaleSettlement]) -> set[str]:
        assert all(s.reservation_id != sl.reservation_id for s in planned)
        return {s.reservation_id for s in planned}

    settled = reconcile_stale(
        me, process_alive, audited=audited, record=no_entry_for_it,
        sliced=lambda _: {sl.reservation_id: [SlicedCharge(2.0, 1, 1, "gpt-4o", "openai")]},
    )
    assert sorted(
        (s.from_entry, s.amount_usd) for s in settled if s.reservation_id == sl.reservation_id
    ) == [(True, 2.0), (True, size - 2.0)]
    assert me.spent_today(U) == pytest.approx(size + 1.0)
    assert me.status(U, 100.0).reserved_usd == 0


def test_a_dead_slices_rest_stays_held_until_its_entry_is_durable(store: StateStore) -> None:
    """The entry before the charge: a start whose audit cannot commit the rest's entry leaves
    the slice held (its entries' spend recorded); the next charges it, once."""
    _, me = a_dead_slice(store)
    sl = the_slice(store)
    size = nano_to_usd(sl.amount)
    entries = {sl.reservation_id: [SlicedCharge(3.0, 1, 1, "gpt-4o", "openai")]}
    reconcile_stale(me, process_alive, audited=lambda _: {}, sliced=lambda _: entries,
                    record=lambda planned: set())
    # both kept held: the slice and the own reservation (no entry could be made for either)
    assert sorted(x.request_id for x in store.active_reservations()) == sorted(
        [sl.request_id, "span-own"]
    )
    assert me.spent_today(U) == pytest.approx(3.0)
    assert me.status(U, 100.0).reserved_usd == pytest.approx(1.0 + size - 3.0)
    settled = reconcile_stale(me, process_alive, audited=lambda _: {},
                              sliced=lambda _: entries,
                              record=lambda planned: {s.reservation_id for s in planned})
    rest = [s for s in settled if s.reservation_id == sl.reservation_id]
    assert [(s.from_entry, s.amount_usd) for s in rest] == [(False, size - 3.0)]
    assert me.spent_today(U) == pytest.approx(size + 1.0)
    assert me.status(U, 100.0).reserved_usd == 0
    assert store.active_reservations() == []


def test_unrecorded_parts_out_of_order_keep_the_total() -> None:
    active = ActiveReservation("s", "o", 0, "u", "", "d", 10, "slice:s", "m", "p",
                               settled=usd_to_nano(0.75), parts=1)
    # the slice recorded the second entry first: the rest's sum is not the total
    entries = [SlicedCharge(0.25, 1, 1, "a", "p"), SlicedCharge(0.75, 2, 2, "b", "p")]
    assert unrecorded_parts(active, entries) == [SpendPart("m", "p", usd_to_nano(0.25), 2, 2, 1)]
    assert unrecorded_parts(
        ActiveReservation("s", "o", 0, settled=0, parts=0), entries
    ) == [SpendPart("a", "p", usd_to_nano(0.25), 1, 1, 1), SpendPart("b", "p", usd_to_nano(0.75), 2, 2, 1)]
    assert unrecorded_parts(ActiveReservation("s", "o", 0), []) == []


# -- the audit log's side: the entries it reads and writes -------------------------------------


def test_the_entries_a_start_writes_are_the_charges_it_reads_back(tmp_path: Any) -> None:
    """record_stale_entries makes a settlement's llm_request entry durable (charged at its
    amount, in the dead process's name); audited_charges reads it back by span id, and
    sliced_charges the entries naming a slice, each request once, in commit order. A writer
    that cannot commit leaves the reservation out (kept held)."""
    db = str(tmp_path / "audit.db")
    audit = AuditWriter(Audit(sqlite_path=db))
    audit.start()
    since = to_us(datetime.now(UTC) - timedelta(minutes=1))
    try:
        lost = StaleSettlement("r_1", "span-1", "h:1", U, "team", "gpt-4o", "openai", 0.75,
                               datetime.now(UTC), "proxy_crash")
        assert record_stale_entries(audit, [lost]) == {"r_1"}
        for span, cost in (("span-a", 0.5), ("span-a", 0.5), ("span-b", 0.25)):  # a, twice
            audit.record_durable(
                LLM_REQUEST, span_id=span, slice_id="r_s", usage_source="reported",
                cost_usd=cost, input_tokens=10, output_tokens=2, model="gpt-4o",
                provider="openai",
            ).result(10)
        audit.record_durable(LLM_REQUEST, span_id="span-c", slice_id="r_s").result(10)  # uncharged
    finally:
        audit.close()
    held = [ActiveReservation("r_1", "h:1", since, request_id="span-1"),
            ActiveReservation("r_2", "h:1", since, request_id="span-none")]
    assert audited_charges(db, held) == {"span-1": AuditedCharge(0.75, 0, 0)}
    (entry,) = charged_entries(db, {"span-1"}, datetime(2000, 1, 1, tzinfo=UTC)).values()
    assert (entry["reason"], entry["usage_source"], entry["owner"]) == ("proxy_crash", "reserved", "h:1")
    assert sliced_charges(db, [ActiveReservation("r_s", "h:1", since)]) == {
        "r_s": [SlicedCharge(0.5, 10, 2, "gpt-4o", "openai"),
                SlicedCharge(0.25, 10, 2, "gpt-4o", "openai")]
    }
    assert record_stale_entries(audit, [lost]) == set()  # closed: nothing is durable
