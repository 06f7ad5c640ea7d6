"""In-memory state store: the SQLite store's arithmetic over dicts, for one process that replays.

Policy replay and shadow evaluation (governance/replay.py, governance/shadow.py) run the real
Ledger and RateLimiter on it, so a candidate policy is judged by the same reserve, settle, rate
and token rules as live traffic: the holds and draws come from the same pure functions the
SQLite store uses (`plan_reserve`, `plan_settle_held`, `shrink_holds`, `token_fits_at`). The state
contract (tests/core/state/test_contract.py) runs against it beside SQLite and Redis, and
tests/core/state/test_memory.py runs one scripted history through this store and SQLite and
compares every answer. Nothing is shared between processes and nothing survives the object.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from candela_mitm.state.ports import (
    RECALLS_KEPT,
    ActiveReservation,
    DayTotals,
    GrantRow,
    JobRecord,
    KeyRecord,
    Lease,
    NewReservation,
    RateHit,
    RateTake,
    ReserveResult,
    SettlePlan,
    SettleResult,
    SliceRecall,
    SpendPart,
    SpendRow,
    StateStore,
    TenantRecord,
    TokenAdmit,
    UserRecord,
    WouldWait,
    from_us,
    plan_reserve,
    plan_settle_held,
    shrink_holds,
    token_fits_at,
)

T = TypeVar("T")


@dataclass
class _Reservation:
    new: NewReservation
    daily_hold: int
    grant_holds: dict[str, int]
    tenant_period: str
    tenant_hold: int
    status: str = "active"
    key_period: str = ""  # the key's row, when a key budget was named
    key_hold: int = 0
    finished_us: int | None = None
    settled: int = 0  # settle_part: the spend and requests recorded on it while held
    parts: int = 0


@dataclass
class _Row:
    spent: int = 0
    from_grants: int = 0
    reserved: int = 0


@dataclass
class _Spend:
    cost: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    requests: int = 0


@dataclass
class _Tables:
    users: dict[str, UserRecord] = field(default_factory=dict)
    reservations: dict[str, _Reservation] = field(default_factory=dict)
    days: dict[tuple[str, str], _Row] = field(default_factory=dict)  # (user, period key)
    tenant_periods: dict[tuple[str, str], _Row] = field(default_factory=dict)
    key_periods: dict[tuple[str, str], _Row] = field(default_factory=dict)  # (key lineage, period)
    grants: dict[str, GrantRow] = field(default_factory=dict)
    spend: dict[tuple[str, str, str, str, str], _Spend] = field(default_factory=dict)
    tenants: dict[str, TenantRecord] = field(default_factory=dict)
    keys: dict[str, KeyRecord] = field(default_factory=dict)  # key_id -> record
    rate_log: dict[str, list[int]] = field(default_factory=dict)
    token_log: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # entry: ts, n
    leases: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)  # owner, expiry
    jobs: dict[tuple[str, str], JobRecord] = field(default_factory=dict)  # (provider, job id)
    job_objects: dict[tuple[str, str], str] = field(default_factory=dict)  # JSON, as stored
    generation: int = 0  # changes to users, tenants, grants and keys (settings_generation)
    recalls: list[SliceRecall] = field(default_factory=list)  # slice recall marks, kept
    recall_seq: int = 0


class MemoryStateStore(StateStore):
    """Every StateStore operation over plain dicts, each atomic under one lock."""

    def __init__(self) -> None:
        self._t = _Tables()
        self._lock = threading.RLock()
        self._alerts: dict[tuple[str, str, str, int], int] = {}  # claim -> expires_us

    def call_without_waiting(self, fn: Callable[..., T], *args: Any) -> T:
        """Dicts answer at once: run here unless another thread holds the lock right now."""
        if not self._lock.acquire(blocking=False):
            raise WouldWait("another thread holds the memory store")
        try:
            return fn(*args)
        finally:
            self._lock.release()

    # -- users ---------------------------------------------------------------------------------
    def get_user(self, user_id: str, include_deleted: bool = False) -> UserRecord | None:
        rec = self._t.users.get(user_id)
        if rec is None or (rec.deleted and not include_deleted):
            return None
        return rec

    def put_user(self, record: UserRecord) -> None:
        with self._lock:
            self._t.users[record.user_id] = dataclasses.replace(
                record, deleted=False, deleted_at=None
            )
            self._t.generation += 1

    def delete_user(self, user_id: str, now_us: int) -> bool:
        with self._lock:
            rec = self._t.users.get(user_id)
            if rec is None or rec.deleted:
                return False
            self._t.users[user_id] = dataclasses.replace(
                rec, deleted=True, deleted_at=from_us(now_us)
            )
            self._t.generation += 1
            return True

    def list_users(self, include_deleted: bool = False) -> list[UserRecord]:
        return [
            r
            for _, r in sorted(self._t.users.items())
            if include_deleted or not r.deleted
        ]

    # -- ledger --------------------------------------------------------------------------------
    def _grants_free(
        self, user_id: str, now_us: int, own: Mapping[str, int] | None = None
    ) -> list[tuple[str, int]]:
        """The user's grants unexpired at `now_us` or held in `own`, earliest expiry first, with
        what is free of each."""
        own = own or {}
        rows = [
            g
            for g in self._t.grants.values()
            if g.user_id == user_id and (g.expires_us > now_us or g.grant_id in own)
        ]
        rows.sort(key=lambda g: (g.expires_us, g.grant_id))
        return [(g.grant_id, g.amount - g.used - g.held) for g in rows]

    def reserve(self, new: NewReservation) -> ReserveResult:
        with self._lock:
            period = new.user_period
            row = self._t.days.get((new.user_id, period), _Row())

            def row_of(table: dict[tuple[str, str], _Row], key: tuple[str, str]) -> tuple[int, int]:
                r = table.get(key, _Row())
                return r.spent, r.reserved

            got = plan_reserve(
                new,
                (row.spent, row.from_grants, row.reserved),
                self._grants_free(new.user_id, new.now_us),
                lambda: row_of(self._t.tenant_periods, (new.tenant, new.tenant_period)),
                lambda: row_of(self._t.key_periods, (new.key_id, new.key_period)),
            )
            if not got.ok:
                return got
            daily, holds, t_hold, k_hold = (
                got.daily_hold, got.grant_holds, got.tenant_hold, got.key_hold
            )
            if daily:
                self._t.days.setdefault((new.user_id, period), _Row()).reserved += daily
            if t_hold:
                self._t.tenant_periods.setdefault(
                    (new.tenant, new.tenant_period), _Row()
                ).reserved += t_hold
            if k_hold:
                self._t.key_periods.setdefault((new.key_id, new.key_period), _Row()).reserved += (
                    k_hold
                )
            for grant_id, take in holds.items():
                g = self._t.grants[grant_id]
                self._t.grants[grant_id] = dataclasses.replace(g, held=g.held + take)
            self._t.reservations[new.reservation_id] = _Reservation(
                new, daily, dict(holds), new.tenant_period if new.on_tenant_row else "", t_hold,
                key_period=new.key_period if new.on_key_row else "", key_hold=k_hold,
            )
            return got

    def _settle_plan(
        self, reservation_id: str, cost: int, now_us: int
    ) -> tuple[_Reservation, SettlePlan] | None:
        """An active (or reclaimed) reservation and the plan of the draw of `cost` on it (settle,
        settle_part). None: the reservation is unknown, settled or released."""
        r = self._t.reservations.get(reservation_id)
        if r is None or r.status not in ("active", "reclaimed"):
            return None
        new = r.new
        row = self._t.days.setdefault((new.user_id, new.user_period), _Row())
        plan = plan_settle_held(
            cost, r.status, r.daily_hold, r.grant_holds, new.budget,
            (row.spent, row.from_grants, row.reserved),
            lambda own: self._grants_free(new.user_id, now_us, own),
        )
        return r, plan

    def _book_settle(
        self,
        r: _Reservation,
        cost: int,
        draws: Mapping[str, int],
        daily_back: int,
        grants_back: Mapping[str, int],
        tenant_back: int,
        key_back: int,
    ) -> None:
        """Write a planned settle to the budget rows and grants: `cost` spent on each row, its
        draws used, and the holds given back (`*_back`: what each row's reservation shrinks by)."""
        new = r.new
        row = self._t.days.setdefault((new.user_id, new.user_period), _Row())
        row.spent += cost
        row.from_grants += sum(draws.values())
        row.reserved -= daily_back
        if r.tenant_period:
            t_row = self._t.tenant_periods.setdefault((new.tenant, r.tenant_period), _Row())
            t_row.spent += cost
            t_row.reserved -= tenant_back
        if r.key_period:
            k_row = self._t.key_periods.setdefault((new.key_id, r.key_period), _Row())
            k_row.spent += cost
            k_row.reserved -= key_back
        for grant_id in grants_back.keys() | draws.keys():
            g = self._t.grants[grant_id]
            self._t.grants[grant_id] = dataclasses.replace(
                g,
                used=g.used + draws.get(grant_id, 0),
                held=g.held - grants_back.get(grant_id, 0),
            )

    def settle(
        self,
        reservation_id: str,
        cost: int,
        tokens_in: int,
        tokens_out: int,
        model: str,
        provider: str,
        now_us: int,
    ) -> SettleResult:
        with self._lock:
            found = self._settle_plan(reservation_id, cost, now_us)
            if found is None:
                return SettleResult(False)
            r, plan = found
            new = r.new
            # every hold it has left goes back
            self._book_settle(
                r, cost, plan.draws, plan.own_daily, plan.own, r.tenant_hold if plan.active else 0,
                r.key_hold if plan.active else 0,
            )
            r.status, r.finished_us = "settled", now_us
            s = self._t.spend.setdefault((new.day, new.user_id, new.tenant, model, provider), _Spend())
            s.cost += cost
            s.tokens_in += tokens_in
            s.tokens_out += tokens_out
            s.requests += 1
            return SettleResult(True, cost, plan.daily, plan.draws)

    def settle_part(
        self, reservation_id: str, parts: Sequence[SpendPart], now_us: int
    ) -> SettleResult:
        cost = sum(p.cost for p in parts)
        with self._lock:
            found = self._settle_plan(reservation_id, cost, now_us)
            if found is None:
                return SettleResult(False)
            r, plan = found
            new = r.new
            # the holds shrink by what was drawn from them; the rest stays held
            used_daily, used_grants = shrink_holds(plan.own_daily, plan.own, plan.daily, plan.draws)
            t_used = min(r.tenant_hold, cost) if plan.active and r.tenant_period else 0
            k_used = min(r.key_hold, cost) if plan.active and r.key_period else 0
            self._book_settle(r, cost, plan.draws, used_daily, used_grants, t_used, k_used)
            if plan.active:
                r.daily_hold -= used_daily
                r.grant_holds = {
                    g: h - used_grants.get(g, 0)
                    for g, h in r.grant_holds.items()
                    if h - used_grants.get(g, 0) > 0
                }
            r.tenant_hold -= t_used
            r.key_hold -= k_used
            r.settled += cost
            for p in parts:
                s = self._t.spend.setdefault(
                    (new.day, new.user_id, new.tenant, p.model, p.provider), _Spend()
                )
                s.cost += p.cost
                s.tokens_in += p.tokens_in
                s.tokens_out += p.tokens_out
                s.requests += p.requests
                r.parts += p.requests
            return SettleResult(True, cost, plan.daily, plan.draws)

    def release(self, reservation_id: str, now_us: int, reclaim: bool = False) -> bool:
        with self._lock:
            r = self._t.reservations.get(reservation_id)
            if r is None or r.status != "active":
                return False
            new = r.new
            if r.daily_hold:
                self._t.days.setdefault((new.user_id, new.user_period), _Row()).reserved -= (
                    r.daily_hold
                )
            if r.tenant_period and r.tenant_hold:
                self._t.tenant_periods.setdefault(
                    (new.tenant, r.tenant_period), _Row()
                ).reserved -= r.tenant_hold
            if r.key_period and r.key_hold:
                self._t.key_periods.setdefault((new.key_id, r.key_period), _Row()).reserved -= (
                    r.key_hold
                )
            for grant_id, hold in r.grant_holds.items():
                g = self._t.grants[grant_id]
                self._t.grants[grant_id] = dataclasses.replace(g, held=g.held - hold)
            r.status = "reclaimed" if reclaim else "released"
            r.finished_us = now_us
            return True

    def active_reservations(self) -> list[ActiveReservation]:
        active = [r for r in self._t.reservations.values() if r.status == "active"]
        active.sort(key=lambda r: r.new.now_us)
        return [
            ActiveReservation(
                r.new.reservation_id, r.new.owner, r.new.now_us, r.new.user_id, r.new.tenant,
                r.new.day, r.new.amount, r.new.request_id, r.new.model, r.new.provider,
                r.settled, r.parts,
            )
            for r in active
        ]

    def purge_finished(self, before_us: int) -> int:
        with self._lock:
            gone = [
                rid
                for rid, r in self._t.reservations.items()
                if r.status != "active" and r.finished_us is not None and r.finished_us < before_us
            ]
            for rid in gone:
                del self._t.reservations[rid]
            return len(gone)

    def add_grant(self, grant: GrantRow) -> None:
        with self._lock:
            if grant.grant_id in self._t.grants:
                raise ValueError(f"grant {grant.grant_id} exists")
            self._t.grants[grant.grant_id] = grant
            self._t.generation += 1

    def grants(self, user_id: str) -> list[GrantRow]:
        rows = [g for g in self._t.grants.values() if g.user_id == user_id]
        return sorted(rows, key=lambda g: (g.expires_us, g.grant_id))

    def day_totals(self, user_id: str, day: str) -> DayTotals:
        row = self._t.days.get((user_id, day), _Row())
        return DayTotals(row.spent, row.from_grants, row.reserved)

    def tenant_totals(self, tenant: str, period: str) -> DayTotals:
        row = self._t.tenant_periods.get((tenant, period), _Row())
        return DayTotals(row.spent, 0, row.reserved)

    def key_totals(self, key_id: str, period: str) -> DayTotals:
        row = self._t.key_periods.get((key_id, period), _Row())
        return DayTotals(row.spent, 0, row.reserved)

    # -- settings generation -------------------------------------------------------------------
    def settings_generation(self) -> int:
        return self._t.generation

    # -- slice recalls -------------------------------------------------------------------------
    def recall_slices(self, scope: str, name: str, now_us: int) -> int:
        with self._lock:
            self._t.recall_seq += 1
            self._t.recalls.append(SliceRecall(self._t.recall_seq, scope, name, now_us))
            del self._t.recalls[:-RECALLS_KEPT]
            return self._t.recall_seq

    def slice_recalls(self, after: int) -> tuple[int, list[SliceRecall]]:
        with self._lock:
            return self._t.recall_seq, [m for m in self._t.recalls if m.seq > after]

    # -- API keys ------------------------------------------------------------------------------
    def put_api_key(self, record: KeyRecord) -> None:
        with self._lock:
            if record.key_id in self._t.keys or self.api_key(record.sha256) is not None:
                raise ValueError(f"key {record.key_id} exists")
            self._t.keys[record.key_id] = record
            self._t.generation += 1

    def api_key(self, sha256: str) -> KeyRecord | None:
        return next((k for k in self._t.keys.values() if k.sha256 == sha256), None)

    def api_keys(self, user_id: str | None = None) -> list[KeyRecord]:
        keys = [k for k in self._t.keys.values() if user_id is None or k.user_id == user_id]
        return sorted(keys, key=lambda k: (k.created_us, k.key_id))

    def expire_api_key(self, key_id: str, expires_us: int) -> KeyRecord | None:
        with self._lock:
            before = self._t.keys.get(key_id)
            if before is not None and (
                before.expires_us is None or expires_us < before.expires_us
            ):
                self._t.keys[key_id] = dataclasses.replace(before, expires_us=expires_us)
                self._t.generation += 1
            return before

    def revoke_api_key(self, key_id: str, now_us: int) -> KeyRecord | None:
        with self._lock:
            before = self._t.keys.get(key_id)
            if before is not None and before.revoked_us is None:
                self._t.keys[key_id] = dataclasses.replace(before, revoked_us=now_us)
                self._t.generation += 1
            return before

    # -- tenants -------------------------------------------------------------------------------
    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        return self._t.tenants.get(tenant_id)

    def put_tenant(self, record: TenantRecord) -> None:
        with self._lock:
            self._t.tenants[record.tenant_id] = record
            self._t.generation += 1

    def list_tenants(self) -> list[TenantRecord]:
        return [r for _, r in sorted(self._t.tenants.items())]

    def spend_rows(
        self,
        since_day: str | None = None,
        until_day: str | None = None,
        user_id: str | None = None,
        tenant: str | None = None,
    ) -> list[SpendRow]:
        rows = [
            SpendRow(*key, s.cost, s.tokens_in, s.tokens_out, s.requests)
            for key, s in self._t.spend.items()
            if (since_day is None or key[0] >= since_day)
            and (until_day is None or key[0] <= until_day)
            and (user_id is None or key[1] == user_id)
            and (tenant is None or key[2] == tenant)
        ]
        return sorted(rows, key=lambda r: (r.day, r.user_id, r.tenant, r.model, r.provider))

    # -- rate windows --------------------------------------------------------------------------
    def rate_hit(self, key: str, limit: int, window_us: int, now_us: int) -> RateHit:
        with self._lock:
            log = [ts for ts in self._t.rate_log.get(key, ()) if ts > now_us - window_us]
            allowed = len(log) < limit
            if allowed:
                log.append(now_us)
            if log:
                self._t.rate_log[key] = log
            else:
                self._t.rate_log.pop(key, None)
            return RateHit(allowed, len(log), min(log) if log else None)

    def rate_take(
        self, key: str, limit: int, n: int, window_us: int, now_us: int, stamp_us: int
    ) -> RateTake:
        with self._lock:
            log = [ts for ts in self._t.rate_log.get(key, ()) if ts > now_us - window_us]
            granted = max(0, min(n, limit - len(log)))
            log += [stamp_us] * granted
            if log:
                self._t.rate_log[key] = log
            else:
                self._t.rate_log.pop(key, None)
            return RateTake(granted, len(log), min(log) if log else None)

    def rate_return(self, key: str, stamp_us: int, n: int) -> int:
        with self._lock:
            log = self._t.rate_log.get(key, [])
            removed = 0
            kept = []
            for ts in log:
                if ts == stamp_us and removed < n:
                    removed += 1
                else:
                    kept.append(ts)
            if kept:
                self._t.rate_log[key] = kept
            else:
                self._t.rate_log.pop(key, None)
            return removed

    def token_admit(
        self, entry_id: str, checks: Sequence[tuple[str, int, int]], window_us: int, now_us: int
    ) -> TokenAdmit:
        with self._lock:
            used: dict[str, int] = {}
            for key, limit, amount in checks:
                entries = {
                    e: v for e, v in self._t.token_log.get(key, {}).items()
                    if v[0] > now_us - window_us
                }
                self._t.token_log[key] = entries
                total = sum(a for _, a in entries.values())
                used[key] = total
                if amount > 0 and total + amount > limit:
                    ordered = sorted((ts, e, a) for e, (ts, a) in entries.items())
                    return TokenAdmit(
                        False,
                        used,
                        key,
                        token_fits_at([(ts, a) for ts, _, a in ordered], limit, amount, window_us),
                    )
            for key, _limit, amount in checks:
                self._t.token_log.setdefault(key, {})[entry_id] = (now_us, amount)
            return TokenAdmit(True, used)

    def token_correct(self, entry_id: str, amounts: Mapping[str, int]) -> None:
        with self._lock:
            for key, amount in amounts.items():
                entries = self._t.token_log.get(key, {})
                if entry_id in entries:
                    entries[entry_id] = (entries[entry_id][0], amount)

    # -- concurrency leases --------------------------------------------------------------------
    def lease_acquire(
        self, key: str, lease_id: str, limit: int, owner: str, now_us: int, ttl_us: int
    ) -> tuple[bool, int]:
        with self._lock:
            held = {
                lid: v for lid, v in self._t.leases.get(key, {}).items() if v[1] > now_us
            }
            self._t.leases[key] = held
            if len(held) >= limit:
                return False, len(held)
            held[lease_id] = (owner, now_us + ttl_us)
            return True, len(held)

    def lease_release(self, key: str, lease_id: str) -> bool:
        with self._lock:
            return self._t.leases.get(key, {}).pop(lease_id, None) is not None

    def lease_renew(self, key: str, lease_id: str, now_us: int, ttl_us: int) -> bool:
        with self._lock:
            held = self._t.leases.get(key, {})
            lease = held.get(lease_id)
            if lease is None or lease[1] <= now_us:  # released, or expired: its place is gone
                held.pop(lease_id, None)
                return False
            held[lease_id] = (lease[0], now_us + ttl_us)
            return True

    def leases(self) -> list[Lease]:
        return [
            Lease(key, lid, owner, expires)
            for key, held in sorted(self._t.leases.items())
            for lid, (owner, expires) in sorted(held.items())
        ]

    # -- async jobs ----------------------------------------------------------------------------
    def record_job(self, job: JobRecord) -> bool:
        with self._lock:
            r = self._t.reservations.get(job.reservation_id)
            if r is None or (job.provider, job.job_id) in self._t.jobs:
                return False
            new = r.new  # the owner and the budget rows are the reservation's, as in SQLite
            self._t.jobs[(job.provider, job.job_id)] = dataclasses.replace(
                job,
                user_id=new.user_id,
                tenant=new.tenant,
                day=new.day,
                period=new.user_period,
                tenant_period=r.tenant_period,
                request_id=new.request_id,
                cost=None,
                trued_up_us=None,
            )
            return True

    def job(self, provider: str, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._t.jobs.get((provider, job_id))

    def put_job_object(self, provider: str, key: str, record: Mapping[str, Any]) -> bool:
        with self._lock:
            if (provider, key) in self._t.job_objects:
                return False
            self._t.job_objects[(provider, key)] = json.dumps(dict(record))
            return True

    def job_object(self, provider: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            raw = self._t.job_objects.get((provider, key))
        return json.loads(raw) if raw is not None else None

    def true_up_job(
        self, provider: str, job_id: str, cost: int, tokens_in: int, tokens_out: int, now_us: int
    ) -> JobRecord | None:
        with self._lock:
            job = self._t.jobs.get((provider, job_id))
            if job is None or job.trued_up_us is not None:
                return None
            delta = cost - job.charged
            self._t.jobs[(provider, job_id)] = dataclasses.replace(
                job, cost=cost, trued_up_us=now_us
            )
            row = self._t.days.get((job.user_id, job.period))
            if row is not None:
                row.spent += delta
            if job.tenant_period:
                t_row = self._t.tenant_periods.get((job.tenant, job.tenant_period))
                if t_row is not None:
                    t_row.spent += delta
            s = self._t.spend.get((job.day, job.user_id, job.tenant, job.model, job.provider))
            if s is not None:
                s.cost += delta
                s.tokens_in += tokens_in - job.tokens_in
                s.tokens_out += tokens_out - job.tokens_out
            return job

    # -- budget alerts -------------------------------------------------------------------------
    def claim_alert(
        self, scope: str, scope_id: str, period: str, threshold: int, now_us: int, expires_us: int
    ) -> bool:
        key = (scope, scope_id, period, threshold)
        with self._lock:
            held = self._alerts.get(key)
            if held is not None and held > now_us:
                return False
            self._alerts[key] = expires_us
            return True

    # -- lifecycle -----------------------------------------------------------------------------
    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
