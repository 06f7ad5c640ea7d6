"""Budget ledger: daily allowances and grants, reserved before a request and settled after it."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal, Protocol

from candela_mitm.errors import Denial, budget_exceeded
from candela_mitm.governance.periods import DAILY_UTC, BudgetPeriod
from candela_mitm.state.ids import ordered_id

# who holds a reservation, and whether it still runs (re-exported: the ledger's vocabulary)
from candela_mitm.state.liveness import default_owner as default_owner
from candela_mitm.state.liveness import process_alive as process_alive
from candela_mitm.state.ports import (
    GrantRow,
    JobRecord,
    JobStore,
    LedgerStore,
    NewReservation,
    ReserveResult,
    SettleResult,
    SpendPart,
    day_of,
    from_us,
    nano_to_usd,
    rfc3339,
    to_us,
    usd_to_nano,
    utc_now,
)


@dataclass(frozen=True)
class KeyBudget:
    """The budget of the API key a request was made with: a part of its user's, per the
    user's period, on a row shared by every key of one rotation chain."""

    key_id: str  # the key's public id (k_...), as a refusal names it
    budget_id: str  # its budget row: the key's lineage (KeyRecord.budget_id)
    budget_usd: float


@dataclass(frozen=True)
class Reservation:
    """Money held for one request until it is settled with the real cost or released."""

    id: str
    user_id: str
    tenant: str | None
    amount_usd: float
    day: str  # the UTC budget day the spend is recorded on
    request_id: str
    owner: str
    created_at: datetime
    allowance_usd: float  # held from the daily allowance
    grant_holds: Mapping[str, float] = field(default_factory=dict)  # grant id -> USD held
    tenant_hold_usd: float = 0.0  # held on the tenant's period row
    # the budgets it was judged against, as they were (budget alerts measure spend against them)
    budget_usd: float = 0.0  # the user's, per `period`
    period: BudgetPeriod = DAILY_UTC
    tenant_budget_usd: float | None = None  # None: the tenant has no budget
    tenant_period: BudgetPeriod = DAILY_UTC
    # the counters the store decided on (a shadow policy judges itself on them: governance/shadow.py)
    seen: ReserveResult | None = field(default=None, compare=False, repr=False)
    key_budget: KeyBudget | None = None  # the API key's budget it was judged against too
    key_hold_usd: float = 0.0  # held on the key's row
    # "": a reservation of its own in the store. Else a hold carved in memory from this
    # process's budget slice of that id (governance/slices.py): settled and released there
    slice: str = ""


@dataclass(frozen=True)
class BudgetRefusal:
    """Why a reserve was refused, with what the 402 budget_exceeded answer needs."""

    user_id: str
    budget_usd: float
    spent_usd: float
    remaining_usd: float
    estimated_cost_usd: float
    resets_at: str
    reserved_usd: float = 0.0
    scope: Literal["user", "tenant", "key"] = "user"  # whose budget refused
    period: str = "daily"
    tenant: str | None = None
    seen: ReserveResult | None = field(default=None, compare=False, repr=False)  # as Reservation
    key_id: str | None = None  # scope "key": the API key whose budget refused

    def denial(self) -> Denial:
        return budget_exceeded(
            self.user_id,
            self.budget_usd,
            self.spent_usd,
            self.remaining_usd,
            self.estimated_cost_usd,
            self.resets_at,
            scope=self.scope,
            period=self.period,
            tenant=self.tenant,
            key_id=self.key_id,
        )


@dataclass(frozen=True)
class ReserveAsk:
    """A reservation asked of the store (`new`) and the budgets its answer is judged on: made by
    Ledger.ask, answered by the store's reserve (alone, or after the rate step in the same
    call: rate_hit_reserve), turned by `outcome` into the reservation or the refusal."""

    new: NewReservation
    user: str
    tenant: str | None
    amount_usd: float
    daily_budget_usd: float
    now: datetime
    period: BudgetPeriod = DAILY_UTC
    tenant_budget_usd: float | None = None
    tenant_period: BudgetPeriod = DAILY_UTC
    key_budget: KeyBudget | None = None

    def outcome(self, result: ReserveResult) -> Reservation | BudgetRefusal:
        """The store's answer as the reservation, or as the refusal naming the scope that
        refused (its budget and period, what it has spent and holds, what it has left)."""
        new, key_budget = self.new, self.key_budget
        if not result.ok:
            # the user's allowance counts its grants too
            scope: Literal["user", "tenant", "key"]
            if result.scope == "key" and key_budget is not None:
                scope, budget_usd, refused_period = "key", key_budget.budget_usd, self.period
                spent, held = result.key_spent, result.key_reserved
                free = usd_to_nano(budget_usd) - spent - held
            elif result.scope == "tenant" and self.tenant_budget_usd is not None:
                scope, budget_usd = "tenant", self.tenant_budget_usd
                refused_period = self.tenant_period
                spent, held = result.tenant_spent, result.tenant_reserved
                free = usd_to_nano(budget_usd) - spent - held
            else:
                scope, budget_usd, refused_period = "user", self.daily_budget_usd, self.period
                spent, held = result.spent, result.reserved
                free = new.budget - (spent - result.from_grants) - held + result.grants_free
            return BudgetRefusal(
                user_id=self.user,
                budget_usd=budget_usd,
                spent_usd=nano_to_usd(spent),
                remaining_usd=nano_to_usd(max(0, free)),
                estimated_cost_usd=self.amount_usd,
                resets_at=rfc3339(refused_period.resets_at(self.now)),
                reserved_usd=nano_to_usd(held),
                scope=scope,
                period=refused_period.kind,
                tenant=self.tenant,
                seen=result,
                key_id=key_budget.key_id if scope == "key" and key_budget else None,
            )
        return Reservation(
            id=new.reservation_id,
            user_id=self.user,
            tenant=self.tenant,
            amount_usd=self.amount_usd,
            day=new.day,
            request_id=new.request_id,
            owner=new.owner,
            created_at=from_us(new.now_us),
            allowance_usd=nano_to_usd(result.daily_hold),
            grant_holds={g: nano_to_usd(v) for g, v in result.grant_holds.items()},
            tenant_hold_usd=nano_to_usd(result.tenant_hold),
            budget_usd=self.daily_budget_usd,
            period=self.period,
            tenant_budget_usd=self.tenant_budget_usd if self.tenant else None,
            tenant_period=self.tenant_period,
            seen=result,
            key_budget=key_budget,
            key_hold_usd=nano_to_usd(result.key_hold),
        )


@dataclass(frozen=True)
class Settlement:
    """How a settle drew the real cost; applied is False when it was a repeat (a no-op)."""

    reservation_id: str
    applied: bool
    cost_usd: float = 0.0
    from_allowance_usd: float = 0.0
    from_grants: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrueUp:
    """A job's charge corrected to its real cost, once: `adjustment_usd` is what it added (a
    negative amount is a refund)."""

    job: JobRecord  # as it was at creation
    charged_usd: float  # at creation: its reservation (or more, if more was observed)
    cost_usd: float  # the real cost, from the usage its result reported
    tokens_in: int
    tokens_out: int

    @property
    def adjustment_usd(self) -> float:
        return self.cost_usd - self.charged_usd


@dataclass(frozen=True)
class Grant:
    """A one-time bonus on top of the daily allowance, spendable until it expires."""

    id: str
    user_id: str
    amount_usd: float
    used_usd: float
    held_usd: float  # held by active reservations
    remaining_usd: float  # amount - used while unexpired; 0 once expired
    expires_at: datetime
    reason: str
    actor: str
    created_at: datetime
    expired: bool


@dataclass(frozen=True)
class BudgetStatus:
    user_id: str
    day: str  # the UTC day of the moment asked about
    budget_usd: float
    spent_usd: float  # this period, every source
    reserved_usd: float  # held by active reservations (allowance and grants)
    remaining_usd: float  # what a reserve could take now, never below 0
    grants: tuple[Grant, ...]  # unexpired grants with money left
    resets_at: str
    period: str = "daily"
    period_starts_at: str = ""


@dataclass(frozen=True)
class TenantBudgetStatus:
    tenant: str
    budget_usd: float | None  # None: no tenant budget (spend is still counted)
    period: str
    spent_usd: float
    reserved_usd: float
    remaining_usd: float | None
    period_starts_at: str
    resets_at: str


@dataclass(frozen=True)
class KeyBudgetStatus:
    key_id: str
    budget_usd: float
    period: str  # its user's
    spent_usd: float  # by every key of its rotation chain, this period
    reserved_usd: float
    remaining_usd: float
    resets_at: str


@dataclass(frozen=True)
class UsageRow:
    model: str
    provider: str
    spend_usd: float
    tokens_in: int
    tokens_out: int
    requests: int


@dataclass(frozen=True)
class LeaderboardRow:
    key: str | None  # tenant or user id; None for spend without a tenant
    spend_usd: float
    tokens_in: int
    tokens_out: int
    requests: int


DayBound = date | datetime | str | None


def _day_bound(value: DayBound) -> str | None:
    """A UTC day from a date, a datetime or an ISO/RFC 3339 string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return date.fromisoformat(value).isoformat()
        except ValueError:
            value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return day_of(value)
    return value.isoformat()


def _settlement(reservation_id: str, result: SettleResult) -> Settlement:
    """A store's settle (or settle_part) in dollars."""
    if not result.applied:
        return Settlement(reservation_id, False)
    return Settlement(
        reservation_id=reservation_id,
        applied=True,
        cost_usd=nano_to_usd(result.cost),
        from_allowance_usd=nano_to_usd(result.from_allowance),
        from_grants={g: nano_to_usd(v) for g, v in result.from_grants.items()},
    )


def _check_usd(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite amount >= 0, got {value!r}")


class BudgetStore(LedgerStore, JobStore, Protocol):
    """What the ledger needs: the budget rows and spend (LedgerStore) and the async jobs whose
    charge it trues up (JobStore)."""


class Ledger:
    """Per-user daily budgets (UTC days) and grants over a BudgetStore (ledger and jobs).

    spendable = daily_budget - allowance spent today - allowance held by active reservations
                + the unheld remainder of every unexpired grant.
    Spend draws the daily allowance first, then grants by earliest expiry (waterfall); what no
    source covers overdraws the allowance, so an underestimated request is recorded in full.
    Every change (reserve, settle, release, a grant) is one atomic store operation; every method
    raises StoreUnavailable when the store fails, and callers deny (governance fails closed).
    Methods block on the store: call them from a worker thread, or from the event loop only
    through Runtime.store_call (which runs them there only if the store need not wait).
    """

    def __init__(
        self,
        store: BudgetStore,
        clock: Callable[[], datetime] = utc_now,
        owner: str | None = None,
    ):
        self.store = store
        self.clock = clock
        self._owner = owner

    @property
    def owner(self) -> str:
        """Resolved on use: a ledger built before a fork() names the worker, not its parent."""
        return self._owner or default_owner()

    def reserve(
        self,
        user: str,
        tenant: str | None,
        amount_usd: float,
        daily_budget_usd: float,
        request_id: str,
        now: datetime | None = None,
        *,
        model: str = "",
        provider: str = "",
        period: BudgetPeriod = DAILY_UTC,
        tenant_budget_usd: float | None = None,
        tenant_period: BudgetPeriod = DAILY_UTC,
        key_budget: KeyBudget | None = None,
    ) -> Reservation | BudgetRefusal:
        """Atomically check the user's budget (`daily_budget_usd` is the amount per `period`),
        the tenant's (`tenant_budget_usd` per `tenant_period`; None: none) and the API key's
        (`key_budget`, per `period`; None: none), and hold `amount_usd` on each; an amount of 0
        always succeeds. The user's budget is judged first, then the tenant's, then the key's:
        a refusal names the first scope that cannot hold the amount.

        The reservation is also the durable mark that the request may have been forwarded: it is
        taken in one store transaction just before the request leaves, and a request that ends
        without leaving releases it explicitly. One still held by a dead process is settled at
        its amount, under `model` and `provider` (governance/reconcile.py).
        """
        ask = self.ask(
            user, tenant, amount_usd, daily_budget_usd, request_id, now,
            model=model, provider=provider, period=period, tenant_budget_usd=tenant_budget_usd,
            tenant_period=tenant_period, key_budget=key_budget,
        )
        return ask.outcome(self.store.reserve(ask.new))

    def ask(
        self,
        user: str,
        tenant: str | None,
        amount_usd: float,
        daily_budget_usd: float,
        request_id: str,
        now: datetime | None = None,
        *,
        model: str = "",
        provider: str = "",
        period: BudgetPeriod = DAILY_UTC,
        tenant_budget_usd: float | None = None,
        tenant_period: BudgetPeriod = DAILY_UTC,
        key_budget: KeyBudget | None = None,
    ) -> ReserveAsk:
        """What `reserve` asks of the store (validated, with its id), before the store is
        asked: `ask.outcome` judges the store's answer. Apart so the admission's call can ask
        it in the same store trip as the rate step (governance/admission.py)."""
        _check_usd("amount_usd", amount_usd)
        _check_usd("daily_budget_usd", daily_budget_usd)
        if tenant_budget_usd is not None:
            _check_usd("tenant_budget_usd", tenant_budget_usd)
        if key_budget is not None:
            _check_usd("key_budget.budget_usd", key_budget.budget_usd)
        now = now or self.clock()
        new = NewReservation(
            reservation_id=ordered_id("r_"),  # time first: inserted and settled on hot pages
            user_id=user,
            tenant=tenant or "",
            day=day_of(now),
            amount=usd_to_nano(amount_usd),
            budget=usd_to_nano(daily_budget_usd),
            request_id=request_id,
            owner=self.owner,
            now_us=to_us(now),
            model=model,
            provider=provider,
            period=period.key(now),
            tenant_budget=None if tenant_budget_usd is None else usd_to_nano(tenant_budget_usd),
            tenant_period=tenant_period.key(now) if tenant else "",
            key_id=key_budget.budget_id if key_budget else "",
            key_budget=usd_to_nano(key_budget.budget_usd) if key_budget else None,
            key_period=period.key(now) if key_budget else "",
        )
        return ReserveAsk(
            new, user, tenant, amount_usd, daily_budget_usd, now, period, tenant_budget_usd,
            tenant_period, key_budget,
        )

    def settle(
        self,
        reservation: Reservation,
        actual_cost_usd: float,
        tokens_in: int,
        tokens_out: int,
        model: str,
        provider: str,
        now: datetime | None = None,
    ) -> Settlement:
        """Replace the hold with the real cost (which may exceed it); a repeat is a no-op.

        The spend lands on the reservation's day and tenant. One that reconcile already settled
        at its amount (its owner was thought dead) stays as reconcile charged it; one an older
        Candela took back (`reclaimed`) is still settled: its money was really spent.
        """
        _check_usd("actual_cost_usd", actual_cost_usd)
        if tokens_in < 0 or tokens_out < 0:
            raise ValueError("token counts must be >= 0")
        now = now or self.clock()
        result = self.store.settle(
            reservation.id,
            usd_to_nano(actual_cost_usd),
            tokens_in,
            tokens_out,
            model,
            provider,
            to_us(now),
        )
        return _settlement(reservation.id, result)

    def release(self, reservation: Reservation, now: datetime | None = None) -> bool:
        """Give the hold back (the request never cost anything); False if already finished."""
        return self.store.release(reservation.id, to_us(now or self.clock()))

    def settle_part(
        self, reservation: Reservation, parts: Sequence[SpendPart], now: datetime | None = None
    ) -> Settlement:
        """Record the spend of requests carved from a budget slice on it, the slice staying held
        (governance/slices.py); a slice settled or released already records nothing."""
        result = self.store.settle_part(reservation.id, parts, to_us(now or self.clock()))
        return _settlement(reservation.id, result)

    # -- asynchronous jobs ---------------------------------------------------------------------
    def record_job(
        self,
        reservation: Reservation,
        provider: str,
        job_id: str,
        model: str,
        charged_usd: float,
        tokens_in: int,
        tokens_out: int,
        now: datetime | None = None,
    ) -> bool:
        """Remember a job created under `reservation` and charged `charged_usd`: its owner is
        the reservation's user (and tenant). False if it was known already."""
        _check_usd("charged_usd", charged_usd)
        return self.store.record_job(
            JobRecord(
                provider=provider,
                job_id=job_id,
                user_id=reservation.user_id,
                tenant=reservation.tenant or "",
                model=model,
                reservation_id=reservation.id,
                charged=usd_to_nano(charged_usd),
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                created_us=to_us(now or self.clock()),
            )
        )

    def job(self, provider: str, job_id: str) -> JobRecord | None:
        return self.store.job(provider, job_id)

    def record_job_object(self, provider: str, key: str, record: Mapping[str, object]) -> bool:
        """Remember what a job is made from or makes (an uploaded batch file: its owner and the
        most its requests can cost; a batch's output file: its batch); the first record stays."""
        return self.store.put_job_object(provider, key, record)

    def job_object(self, provider: str, key: str) -> dict[str, object] | None:
        return self.store.job_object(provider, key)

    def true_up_job(
        self,
        provider: str,
        job_id: str,
        cost_usd: float,
        tokens_in: int,
        tokens_out: int,
        now: datetime | None = None,
    ) -> TrueUp | None:
        """Correct a job's charge to its real cost, exactly once (None: unknown, or done already).

        The difference, either way, lands on the budget rows the creation's charge landed on: a
        refund returns it to that period's allowance, an extra charge overdraws it (as a settle
        over its reservation does). The spend row keeps one request, with the real tokens.
        """
        _check_usd("cost_usd", cost_usd)
        if tokens_in < 0 or tokens_out < 0:
            raise ValueError("token counts must be >= 0")
        job = self.store.true_up_job(
            provider, job_id, usd_to_nano(cost_usd), tokens_in, tokens_out,
            to_us(now or self.clock()),
        )
        if job is None:
            return None
        return TrueUp(job, nano_to_usd(job.charged), nano_to_usd(usd_to_nano(cost_usd)),
                      tokens_in, tokens_out)

    # -- grants --------------------------------------------------------------------------------
    def add_grant(
        self,
        user: str,
        amount_usd: float,
        expires_at: datetime,
        reason: str,
        actor: str,
        now: datetime | None = None,
    ) -> Grant:
        now = now or self.clock()
        row = self.new_grant(user, amount_usd, expires_at, reason, actor, now)
        self.store.add_grant(row)
        return self._grant(row, to_us(now))

    def new_grant(
        self,
        user: str,
        amount_usd: float,
        expires_at: datetime,
        reason: str,
        actor: str,
        now: datetime | None = None,
    ) -> GrantRow:
        """The one place a grant is made (validated, with its id), before anything stores it: the
        admin API audits it first, then stores it."""
        if not math.isfinite(amount_usd) or amount_usd <= 0:
            raise ValueError(f"amount_usd must be a finite amount > 0, got {amount_usd!r}")
        if expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone")
        now = now or self.clock()
        if expires_at <= now:
            raise ValueError("expires_at is not in the future")
        return GrantRow(
            grant_id="g_" + uuid.uuid4().hex,
            user_id=user,
            amount=usd_to_nano(amount_usd),
            used=0,
            held=0,
            expires_us=to_us(expires_at),
            reason=reason,
            actor=actor,
            created_us=to_us(now),
        )

    def list_grants(
        self, user: str, now: datetime | None = None, include_expired: bool = True
    ) -> list[Grant]:
        """A user's grants, earliest expiry first."""
        now_us = to_us(now or self.clock())
        grants = [self._grant(row, now_us) for row in self.store.grants(user)]
        return grants if include_expired else [g for g in grants if not g.expired]

    @staticmethod
    def grant_view(row: GrantRow, now: datetime) -> Grant:
        """A stored (or about to be stored) grant as the API shows it at `now`."""
        return Ledger._grant(row, to_us(now))

    @staticmethod
    def _grant(row: GrantRow, now_us: int) -> Grant:
        expired = row.expires_us <= now_us
        return Grant(
            id=row.grant_id,
            user_id=row.user_id,
            amount_usd=nano_to_usd(row.amount),
            used_usd=nano_to_usd(row.used),
            held_usd=nano_to_usd(row.held),
            remaining_usd=0.0 if expired else nano_to_usd(max(0, row.amount - row.used)),
            expires_at=from_us(row.expires_us),
            reason=row.reason,
            actor=row.actor,
            created_at=from_us(row.created_us),
            expired=expired,
        )

    # -- queries -------------------------------------------------------------------------------
    def spent_today(self, user: str, now: datetime | None = None) -> float:
        """Spend on the UTC day of `now`, whatever the user's budget period."""
        day = day_of(now or self.clock())
        return nano_to_usd(sum(r.cost for r in self.store.spend_rows(day, day, user)))

    def status(
        self,
        user: str,
        daily_budget_usd: float,
        now: datetime | None = None,
        period: BudgetPeriod = DAILY_UTC,
    ) -> BudgetStatus:
        """The user's budget in the period holding `now` (`daily_budget_usd` per period)."""
        now = now or self.clock()
        now_us = to_us(now)
        day = day_of(now)
        totals = self.store.day_totals(user, period.key(now))
        rows = [r for r in self.store.grants(user) if r.expires_us > now_us]
        budget = usd_to_nano(daily_budget_usd)
        spendable = (
            budget
            - (totals.spent - totals.from_grants)
            - totals.reserved
            + sum(max(0, r.amount - r.used - r.held) for r in rows)
        )
        return BudgetStatus(
            user_id=user,
            day=day,
            budget_usd=daily_budget_usd,
            spent_usd=nano_to_usd(totals.spent),
            reserved_usd=nano_to_usd(totals.reserved + sum(r.held for r in rows)),
            remaining_usd=nano_to_usd(max(0, spendable)),
            grants=tuple(self._grant(r, now_us) for r in rows if r.amount > r.used),
            resets_at=rfc3339(period.resets_at(now)),
            period=period.kind,
            period_starts_at=rfc3339(period.starts_at(now)),
        )

    def tenant_status(
        self,
        tenant: str,
        budget_usd: float | None,
        period: BudgetPeriod = DAILY_UTC,
        now: datetime | None = None,
    ) -> TenantBudgetStatus:
        """A tenant's budget in the period holding `now`."""
        now = now or self.clock()
        totals = self.store.tenant_totals(tenant, period.key(now))
        remaining = None
        if budget_usd is not None:
            free = usd_to_nano(budget_usd) - totals.spent - totals.reserved
            remaining = nano_to_usd(max(0, free))
        return TenantBudgetStatus(
            tenant=tenant,
            budget_usd=budget_usd,
            period=period.kind,
            spent_usd=nano_to_usd(totals.spent),
            reserved_usd=nano_to_usd(totals.reserved),
            remaining_usd=remaining,
            period_starts_at=rfc3339(period.starts_at(now)),
            resets_at=rfc3339(period.resets_at(now)),
        )

    def key_status(
        self, key: KeyBudget, period: BudgetPeriod = DAILY_UTC, now: datetime | None = None
    ) -> KeyBudgetStatus:
        """An API key's budget in the (user's) period holding `now`."""
        now = now or self.clock()
        totals = self.store.key_totals(key.budget_id, period.key(now))
        free = usd_to_nano(key.budget_usd) - totals.spent - totals.reserved
        return KeyBudgetStatus(
            key_id=key.key_id,
            budget_usd=key.budget_usd,
            period=period.kind,
            spent_usd=nano_to_usd(totals.spent),
            reserved_usd=nano_to_usd(totals.reserved),
            remaining_usd=nano_to_usd(max(0, free)),
            resets_at=rfc3339(period.resets_at(now)),
        )

    def usage(
        self,
        user: str | None = None,
        tenant: str | None = None,
        since: DayBound = None,
        until: DayBound = None,
    ) -> list[UsageRow]:
        """Spend, tokens and requests per (model, provider); `since`/`until` are inclusive UTC days."""
        totals: dict[tuple[str, str], list[int]] = {}
        for row in self.store.spend_rows(_day_bound(since), _day_bound(until), user, tenant):
            t = totals.setdefault((row.model, row.provider), [0, 0, 0, 0])
            t[0] += row.cost
            t[1] += row.tokens_in
            t[2] += row.tokens_out
            t[3] += row.requests
        rows = [
            UsageRow(model, provider, nano_to_usd(c), i, o, n)
            for (model, provider), (c, i, o, n) in totals.items()
        ]
        return sorted(rows, key=lambda r: (-r.spend_usd, r.model, r.provider))

    def leaderboard(
        self,
        by: Literal["tenant", "user"] = "tenant",
        since: DayBound = None,
        until: DayBound = None,
        limit: int | None = None,
    ) -> list[LeaderboardRow]:
        """Spend ranking by tenant or user, highest first."""
        if by not in ("tenant", "user"):
            raise ValueError(f"by must be 'tenant' or 'user', got {by!r}")
        totals: dict[str, list[int]] = {}
        for row in self.store.spend_rows(_day_bound(since), _day_bound(until)):
            t = totals.setdefault(row.tenant if by == "tenant" else row.user_id, [0, 0, 0, 0])
            t[0] += row.cost
            t[1] += row.tokens_in
            t[2] += row.tokens_out
            t[3] += row.requests
        rows = sorted(totals.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return [
            LeaderboardRow(key or None, nano_to_usd(c), i, o, n)
            for key, (c, i, o, n) in rows[:limit]
        ]
