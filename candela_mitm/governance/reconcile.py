"""Crash reconciliation: settling, at start, the reservations that processes now gone left held,
from their requests' durable audit entries, else at their amount with an entry written first."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from candela_mitm.audit import AuditWriter
from candela_mitm.audit.actions import LLM_REQUEST
from candela_mitm.audit.query import charged_entries, sliced_entries
from candela_mitm.governance.ledger import Ledger
from candela_mitm.state.ports import (
    FINISHED_RESERVATION_TTL_S,
    US_PER_S,
    ActiveReservation,
    LedgerStore,
    SpendPart,
    from_us,
    nano_to_usd,
    to_us,
    usd_to_nano,
)

log = logging.getLogger("candela.reconcile")

DEFAULT_STALE_AGE_S = 3600.0
# How long a start waits for the audit entries of the reservations it settled to be committed.
STALE_AUDIT_WAIT_S = 10.0


@dataclass(frozen=True)
class AuditedCharge:
    """What a request's durable audit entry says it was charged (its llm_request entry)."""

    cost_usd: float
    input_tokens: int
    output_tokens: int


# The audit entries of some requests, by span id, among those of a reconcile's reservations.
AuditedCharges = Callable[[Sequence[ActiveReservation]], Mapping[str, AuditedCharge]]


@dataclass(frozen=True)
class SlicedCharge:
    """A charged llm_request entry of a request carved from a budget slice (it names the slice)."""

    cost_usd: float
    input_tokens: int
    output_tokens: int
    model: str
    provider: str


# The charged entries naming each of some slices, by slice id, in the order they were committed.
SlicedCharges = Callable[[Sequence[ActiveReservation]], Mapping[str, Sequence[SlicedCharge]]]


def unrecorded_parts(active: ActiveReservation, entries: Sequence[SlicedCharge]) -> list[SpendPart]:
    """The spend of a dead process's slice its entries name and the slice has not recorded:
    the total is exact (every recorded request had its entry first, so it is the entries' sum
    less what was recorded); each part is the entries past the `parts` recorded, by model,
    when their sum is that total (the slice recorded its requests in commit order), else one
    part of the total under the slice's model."""
    total = sum(usd_to_nano(e.cost_usd) for e in entries) - active.settled
    rest = list(entries[active.parts :])
    if total <= 0 and not rest:
        return []
    if sum(usd_to_nano(e.cost_usd) for e in rest) == total:
        grouped: dict[tuple[str, str], list[int]] = {}
        for e in rest:
            t = grouped.setdefault((e.model, e.provider), [0, 0, 0, 0])
            t[0] += usd_to_nano(e.cost_usd)
            t[1] += e.input_tokens
            t[2] += e.output_tokens
            t[3] += 1
        return [SpendPart(m, p, *t) for (m, p), t in grouped.items()]
    return [
        SpendPart(
            active.model, active.provider, max(0, total),
            sum(e.input_tokens for e in rest), sum(e.output_tokens for e in rest), len(rest),
        )
    ]


@dataclass(frozen=True)
class StaleSettlement:
    """A reservation reconcile settled at its amount: its process died (`proxy_crash`) or it
    outlived the age limit (`expired`) with its request possibly forwarded. `from_entry`: it
    was settled at the cost its durable audit entry records instead (the process died between
    the entry and its settle), and needs no entry of its own."""

    reservation_id: str
    request_id: str  # the request's span id
    owner: str
    user_id: str
    tenant: str | None
    model: str
    provider: str
    amount_usd: float
    created_at: datetime
    reason: str
    from_entry: bool = False


def reconcile_stale(
    ledger: Ledger,
    owner_alive: Callable[[str], bool] | None = None,
    max_age_s: float | None = DEFAULT_STALE_AGE_S,
    now: datetime | None = None,
    audited: AuditedCharges | None = None,
    record: Callable[[list[StaleSettlement]], set[str]] | None = None,
    sliced: SlicedCharges | None = None,
) -> list[StaleSettlement]:
    """Settle the reservations of dead owners or older than `max_age_s`; returns what was
    settled (for the audit trail).

    Run at start. A reservation still held was taken for a request that may have reached
    the provider (the reservation is its forwarded mark: see `Ledger.reserve`). The spend of a
    request follows its durable audit entry (addons/budget.py), so one whose entry was
    committed before its process died is settled at the cost the entry records
    (`audited`: the entries of these reservations' requests); one without an entry (its
    dead process never read its usage) is charged its reservation, never released for
    free. `max_age_s` must exceed the longest request (a streamed answer included): a live
    request settled this way is charged its reservation, and its own settle is then a
    no-op. Also forgets reservations finished more than a week ago.

    `record`: makes the entries of those without one durable first and returns the ids of
    the reservations whose entry was committed; only those are settled (the entry before
    the spend: a crash in between leaves an entry the next start settles from). Without
    it the caller writes the entries of what this returns, after the settle.

    A budget slice (governance/slices.py; its request_id starts with `slice:`) held by a dead
    process is first settled with the spend its requests' entries name past what it
    recorded (`sliced`: those entries; `unrecorded_parts`; returned `from_entry`), then
    charged what is left of it, as a reservation without an entry is: its requests in
    flight at the crash are among it and which ones cannot be known, so nothing forwarded
    goes free (the overcharge is bounded by the slice's size: governance.budgets.slices).
    That remainder gets its entry first (`record`; span id the slice's request_id, so a
    crash before its settle leaves an entry the next start settles from, via `audited`).
    """
    store = ledger.store
    now_us = to_us(now or ledger.clock())
    cutoff = None if max_age_s is None else now_us - round(max_age_s * US_PER_S)
    verdicts: dict[str, bool] = {ledger.owner: True}  # never our own
    stale: list[tuple[ActiveReservation, str]] = []
    for active in store.active_reservations():
        old = cutoff is not None and active.created_us < cutoff
        why = "expired"
        if not old and owner_alive is not None:
            if active.owner not in verdicts:
                try:
                    verdicts[active.owner] = owner_alive(active.owner)
                except Exception:
                    verdicts[active.owner] = True  # unsure: leave it to the age limit
            old = not verdicts[active.owner]
            why = "proxy_crash"
        if old:
            stale.append((active, why))
    slices = [(a, why) for a, why in stale if a.request_id.startswith("slice:")]
    done, left = _settle_dead_slices(store, slices, sliced, now_us)
    # a dead slice is charged what is left of it, as a reservation without an entry is
    # (or at its remainder's entry, when a start died between that entry and its settle)
    entries = audited([a for a, _ in stale]) if audited is not None and stale else {}
    planned: list[tuple[ActiveReservation, StaleSettlement, tuple[int, int]]] = []
    for active, why in stale:
        charge = entries.get(active.request_id) if active.request_id else None
        if charge is not None:
            amount = usd_to_nano(charge.cost_usd)
            tokens = (charge.input_tokens, charge.output_tokens)
        elif active.request_id.startswith("slice:"):
            amount, tokens = left.get(active.reservation_id, 0), (0, 0)
            if amount <= 0:  # its entries named all of it: nothing is left to charge
                store.release(active.reservation_id, now_us)
                continue
        else:
            amount, tokens = active.amount, (0, 0)
        planned.append((active, _settlement(active, why, amount, charge is not None), tokens))
    if record is not None:
        durable = record([s for _, s, _ in planned if not s.from_entry])
        planned = [p for p in planned if p[1].from_entry or p[1].reservation_id in durable]
    settled: list[StaleSettlement] = done
    for active, s, tokens in planned:
        result = store.settle(
            active.reservation_id,
            usd_to_nano(s.amount_usd),
            *tokens,
            active.model,
            active.provider,
            now_us,
        )
        if result.applied:
            settled.append(s)
    store.purge_finished(now_us - FINISHED_RESERVATION_TTL_S * US_PER_S)
    return settled


def _settlement(active: ActiveReservation, why: str, amount: int, from_entry: bool) -> StaleSettlement:
    """What settling `active` at `amount` (nano-dollars) for `why` is reported as."""
    return StaleSettlement(
        reservation_id=active.reservation_id,
        request_id=active.request_id,
        owner=active.owner,
        user_id=active.user_id,
        tenant=active.tenant or None,
        model=active.model,
        provider=active.provider,
        amount_usd=nano_to_usd(amount),
        created_at=from_us(active.created_us),
        reason=why,
        from_entry=from_entry,
    )


def _settle_dead_slices(
    store: LedgerStore,
    slices: list[tuple[ActiveReservation, str]],
    sliced: SlicedCharges | None,
    now_us: int,
) -> tuple[list[StaleSettlement], dict[str, int]]:
    """Dead processes' slices: the spend their entries name past what they recorded,
    settled (`unrecorded_parts`); returns those settlements and, by slice id, what is left
    of each (nano-dollars; the caller charges it)."""
    if not slices:
        return [], {}
    entries = sliced([a for a, _ in slices]) if sliced is not None else {}
    done: list[StaleSettlement] = []
    left: dict[str, int] = {}
    for active, why in slices:
        parts = unrecorded_parts(active, entries.get(active.reservation_id, ()))
        recorded = active.settled
        if parts:
            result = store.settle_part(active.reservation_id, parts, now_us)
            if not result.applied:
                continue  # settled or released meanwhile: nothing is left of it
            recorded += result.cost
            done.append(_settlement(active, why, result.cost, from_entry=True))
        left[active.reservation_id] = max(0, active.amount - recorded)
    return done, left


def audited_charges(
    audit_db: str, reservations: Sequence[ActiveReservation]
) -> dict[str, AuditedCharge]:
    """What the durable audit entries of these reservations' requests charged, by span id: the
    audit log's tail since the oldest of them (reconcile_stale settles from it)."""
    since = from_us(min(r.created_us for r in reservations)) - timedelta(seconds=1)
    spans = {r.request_id for r in reservations if r.request_id}
    return {
        span: AuditedCharge(
            float(f.get("cost_usd") or 0.0),
            int(f.get("input_tokens") or 0),
            int(f.get("output_tokens") or 0),
        )
        for span, f in charged_entries(audit_db, spans, since).items()
    }


def sliced_charges(
    audit_db: str, slices: Sequence[ActiveReservation]
) -> dict[str, list[SlicedCharge]]:
    """The charged entries of the requests carved from these budget slices, by slice id, in
    commit order (reconcile_stale settles a dead process's slice from them)."""
    since = from_us(min(r.created_us for r in slices)) - timedelta(seconds=1)
    out: dict[str, list[SlicedCharge]] = {}
    for slice_id, entries in sliced_entries(audit_db, {r.reservation_id for r in slices}, since).items():
        seen: set[str] = set()
        for f in entries:
            span = str(f.get("span_id") or "")
            if span in seen:
                continue
            seen.add(span)
            out.setdefault(slice_id, []).append(
                SlicedCharge(
                    float(f.get("cost_usd") or 0.0),
                    int(f.get("input_tokens") or 0),
                    int(f.get("output_tokens") or 0),
                    str(f.get("model") or ""),
                    str(f.get("provider") or ""),
                )
            )
    return out


def stale_settlement_entry(s: StaleSettlement) -> dict[str, Any]:
    """The llm_request entry of a request whose process died before it was accounted: charged
    its reservation at the next start (`usage_source: reserved`, `reason: proxy_crash`)."""
    return {
        "user_id": s.user_id,
        "tenant_id": s.tenant,
        "provider": s.provider or None,
        "model": s.model or None,
        "route": "proxy",
        "decision": "error",
        "reason": s.reason,
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_tokens": 0,
        "cost_usd": round(s.amount_usd, 10),
        "estimate_usd": round(s.amount_usd, 10),
        "usage_source": "reserved",
        "span_id": s.request_id,
        "reservation_id": s.reservation_id,
        "owner": s.owner,  # the process that died: <host><pid namespace>:<pid>:<boot>.<start>
        "started_at": s.created_at.isoformat(),
    }


def record_stale_entries(audit: AuditWriter, planned: list[StaleSettlement]) -> set[str]:
    """The audit entries of the reservations a start is about to settle at their amount, made
    durable before the settle (reconcile_stale(record=...)); the ids whose entry was
    committed. The entry comes first: a crash between the two leaves an entry the next start
    settles from, never a spend without its entry."""
    futures = [
        (s.reservation_id, audit.record_durable(LLM_REQUEST, **stale_settlement_entry(s)))
        for s in planned
    ]
    durable: set[str] = set()
    deadline = time.monotonic() + STALE_AUDIT_WAIT_S
    for reservation_id, fut in futures:
        try:
            fut.result(max(0.0, deadline - time.monotonic()))
            durable.add(reservation_id)
        except Exception as e:
            log.error("reservation %s kept held: its audit entry failed (%s)", reservation_id, e)
    return durable
