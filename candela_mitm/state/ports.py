"""State store contract: the atomic operations budgets, grants, users and rate windows need."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

from candela_mitm.errors import StoreUnavailable

T = TypeVar("T")

# Money is kept as integer nano-dollars and time as integer microseconds since the epoch in
# every backend: sums of floats drift (0.1 * 7 > 0.7), and a budget must admit exactly what fits.
NANO_PER_USD = 1_000_000_000
US_PER_S = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Finished reservations are kept this long so that a late or repeated settle/release stays a no-op.
FINISHED_RESERVATION_TTL_S = 7 * 24 * 3600


def usd_to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


def nano_to_usd(nano: int) -> float:
    return nano / NANO_PER_USD


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no float round trip); naive datetimes are UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """Whole seconds, UTC, with a Z: the form of every timestamp Candela answers with."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def next_utc_midnight(moment: datetime) -> datetime:
    """When the budget day of `moment` ends."""
    day = date.fromisoformat(day_of(moment))
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


def day_of(moment: datetime) -> str:
    """The UTC day a moment falls on, as YYYY-MM-DD (the budget day)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).date().isoformat()


# A user's limits beside requests_per_minute, by the name config, records and the API share.
LIMIT_FIELDS = (
    "max_concurrent_requests",
    "input_tokens_per_minute",
    "output_tokens_per_minute",
    "total_tokens_per_minute",
)


TENANT_LIMIT_FIELDS = LIMIT_FIELDS  # a tenant has the same: what all its users use together


@dataclass(frozen=True)
class UserRecord:
    """A user as the admin API manages it; None fields fall back to config and defaults."""

    user_id: str
    role: str | None = None
    tenants: tuple[str, ...] = ()
    daily_budget_usd: float | None = None
    requests_per_minute: int | None = None
    deleted: bool = False
    deleted_at: datetime | None = None
    updated_at: datetime | None = None
    budget_period: str | None = None  # daily, weekly, monthly; None: config and defaults
    max_concurrent_requests: int | None = None
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None
    total_tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        # callers hand in lists (JSON, config); the record keeps an immutable, comparable tuple
        object.__setattr__(self, "tenants", tuple(self.tenants))

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "role": self.role,
            "tenants": list(self.tenants),
            "daily_budget_usd": self.daily_budget_usd,
            "requests_per_minute": self.requests_per_minute,
            "deleted": self.deleted,
            "deleted_at": to_us(self.deleted_at) if self.deleted_at else None,
            "updated_at": to_us(self.updated_at) if self.updated_at else None,
            "budget_period": self.budget_period,
            **{name: getattr(self, name) for name in LIMIT_FIELDS},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UserRecord:
        budget = data.get("daily_budget_usd")
        rpm = data.get("requests_per_minute")
        deleted_at = data.get("deleted_at")
        updated_at = data.get("updated_at")
        return cls(
            user_id=str(data["user_id"]),
            role=None if data.get("role") is None else str(data["role"]),
            tenants=tuple(str(t) for t in data.get("tenants") or ()),
            daily_budget_usd=None if budget is None else float(budget),
            requests_per_minute=None if rpm is None else int(rpm),
            deleted=bool(data.get("deleted")),
            deleted_at=None if deleted_at is None else from_us(int(deleted_at)),
            updated_at=None if updated_at is None else from_us(int(updated_at)),
            budget_period=None if data.get("budget_period") is None else str(data["budget_period"]),
            **{
                name: None if data.get(name) is None else int(data[name])
                for name in LIMIT_FIELDS
            },
        )


@dataclass(frozen=True)
class NewReservation:
    """What the ledger asks the store to hold; amounts in nano-dollars, times in microseconds."""

    reservation_id: str
    user_id: str
    tenant: str
    day: str
    amount: int
    budget: int
    request_id: str
    owner: str
    now_us: int
    # what the request is for: the spend row a settle made without its owner (at the next
    # start, after a crash) is recorded under
    model: str = ""
    provider: str = ""
    # the user's budget row: the period key (governance/periods.py); "" means `day`
    period: str = ""
    # the tenant's budget, nano-dollars, for the tenant's period row `tenant_period`; None: the
    # tenant has no budget (its spend is still counted on that row, when it is named)
    tenant_budget: int | None = None
    tenant_period: str = ""
    # the budget of the API key the request was made with, nano-dollars, on the key's row
    # (`key_id`: the key's lineage, kept by rotation) for `key_period` (the user's period key);
    # "" or None: no key budget, and no key row is touched
    key_id: str = ""
    key_budget: int | None = None
    key_period: str = ""

    @property
    def user_period(self) -> str:
        return self.period or self.day

    @property
    def on_tenant_row(self) -> bool:
        """Whether it counts on a tenant's period row (a tenant and its period are named)."""
        return bool(self.tenant and self.tenant_period)

    @property
    def on_key_row(self) -> bool:
        """Whether it counts on an API key's row (a key and its period are named)."""
        return bool(self.key_id and self.key_period)


@dataclass(frozen=True)
class ReserveResult:
    """The outcome of one atomic check-and-reserve, with the totals the decision was made on."""

    ok: bool
    daily_hold: int
    grant_holds: Mapping[str, int]
    spent: int  # spent today, every source
    from_grants: int  # the part of `spent` drawn from grants
    reserved: int  # daily allowance held by other active reservations today
    grants_free: int  # unexpired grant money neither used nor held
    scope: str = "user"  # which budget refused: "user", "tenant" or "key" (when not ok)
    tenant_spent: int = 0  # the tenant's period row, when a tenant period was named
    tenant_reserved: int = 0
    tenant_hold: int = 0  # held on the tenant's row by this reservation
    key_spent: int = 0  # the key's period row, when a key budget was named
    key_reserved: int = 0
    key_hold: int = 0  # held on the key's row by this reservation


@dataclass(frozen=True)
class SettleResult:
    applied: bool
    cost: int = 0
    from_allowance: int = 0
    from_grants: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DayTotals:
    spent: int = 0
    from_grants: int = 0
    reserved: int = 0


@dataclass(frozen=True)
class TenantRecord:
    """A tenant's budget as the admin API set it; None fields fall back to config."""

    tenant_id: str
    budget_usd: float | None = None
    budget_period: str | None = None
    updated_at: datetime | None = None
    # TENANT_LIMIT_FIELDS; None: no limit (a record holds them all)
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None
    total_tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "budget_usd": self.budget_usd,
            "budget_period": self.budget_period,
            "updated_at": to_us(self.updated_at) if self.updated_at else None,
            **{name: getattr(self, name) for name in TENANT_LIMIT_FIELDS},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TenantRecord:
        budget = data.get("budget_usd")
        period = data.get("budget_period")
        updated_at = data.get("updated_at")
        return cls(
            tenant_id=str(data["tenant_id"]),
            budget_usd=None if budget is None else float(budget),
            budget_period=None if period is None else str(period),
            updated_at=None if updated_at is None else from_us(int(updated_at)),
            **{
                name: None if data.get(name) is None else int(data[name])
                for name in TENANT_LIMIT_FIELDS
            },
        )


@dataclass(frozen=True)
class KeyRecord:
    """An API key minted through the admin API: only its SHA-256 is ever stored."""

    key_id: str  # its public name ("k_..."), for listing and revoking
    sha256: str
    user_id: str
    name: str
    actor: str  # who minted it
    created_us: int
    expires_us: int | None = None
    revoked_us: int | None = None
    # model names or patterns the key is narrowed to, besides its user's policy; (): the user's
    models: tuple[str, ...] = ()
    # a part of its user's budget (per the user's period) the key may spend; None: the user's
    budget_usd: float | None = None
    # the id of the first key of its rotation chain ("": this key is the first): a rotated key
    # spends from the same budget row as the key it replaced
    lineage: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))  # JSON and callers hand lists

    @property
    def budget_id(self) -> str:
        """The key's budget row: shared by every key of one rotation chain."""
        return self.lineage or self.key_id

    def valid_at(self, now_us: int) -> bool:
        return self.revoked_us is None and (self.expires_us is None or now_us < self.expires_us)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "models": list(self.models)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyRecord:
        def opt(name: str) -> int | None:
            return None if data.get(name) is None else int(data[name])

        return cls(
            key_id=str(data["key_id"]),
            sha256=str(data["sha256"]),
            user_id=str(data["user_id"]),
            name=str(data.get("name") or ""),
            actor=str(data.get("actor") or ""),
            created_us=int(data["created_us"]),
            expires_us=opt("expires_us"),
            revoked_us=opt("revoked_us"),
            models=tuple(str(m) for m in data.get("models") or ()),
            budget_usd=None if data.get("budget_usd") is None else float(data["budget_usd"]),
            lineage=str(data.get("lineage") or ""),
        )


@dataclass(frozen=True)
class GrantRow:
    grant_id: str
    user_id: str
    amount: int
    used: int
    held: int
    expires_us: int
    reason: str
    actor: str
    created_us: int


@dataclass(frozen=True)
class ActiveReservation:
    reservation_id: str
    owner: str
    created_us: int
    user_id: str = ""
    tenant: str = ""
    day: str = ""
    amount: int = 0
    request_id: str = ""
    model: str = ""
    provider: str = ""
    # a budget slice's (governance/slices.py): the spend and requests recorded on it so far
    settled: int = 0
    parts: int = 0


@dataclass(frozen=True)
class SpendPart:
    """Spend recorded on a reservation that stays held (a budget slice): the requests of one
    (model, provider) settled together, nano-dollars."""

    model: str
    provider: str
    cost: int
    tokens_in: int
    tokens_out: int
    requests: int = 1


@dataclass(frozen=True)
class SpendRow:
    day: str
    user_id: str
    tenant: str
    model: str
    provider: str
    cost: int
    tokens_in: int
    tokens_out: int
    requests: int


@dataclass(frozen=True)
class JobRecord:
    """An asynchronous job created through Candela (a background response, a queued run, a
    batch): who owns it and what its creation was charged, until its result is read.

    `day`, `period` and `tenant_period` are the budget rows the creation's charge landed on
    (copied from its reservation by the store): a true-up corrects those rows.
    """

    provider: str  # the route it was created on
    job_id: str  # the provider's id, from the creation answer
    user_id: str
    tenant: str
    model: str
    reservation_id: str
    charged: int  # nano-dollars charged at creation (its reservation, at least)
    tokens_in: int  # the tokens recorded at creation
    tokens_out: int
    created_us: int
    day: str = ""
    period: str = ""
    tenant_period: str = ""
    cost: int | None = None  # the real cost, once trued up
    trued_up_us: int | None = None
    request_id: str = ""  # the span id of the request that created it (its reservation's)


@dataclass(frozen=True)
class RateHit:
    allowed: bool
    count: int  # requests in the window after this one was (or was not) counted
    oldest_us: int | None  # the oldest request still in the window


@dataclass(frozen=True)
class RateTake:
    """A block of requests taken from a rate window at once (a rate lease)."""

    granted: int  # entries added (0 to the number asked for)
    count: int  # entries in the window after the step
    oldest_us: int | None


@dataclass(frozen=True)
class TokenAdmit:
    """The outcome of one token-window admission over several keys (all or nothing)."""

    allowed: bool
    used: Mapping[str, int]  # per key: the window's tokens before this entry
    refused_key: str | None = None  # the first key that could not hold its amount
    # when enough of the refused key's window has left for the amount to fit; None: never
    # (the amount alone exceeds the limit)
    fits_at_us: int | None = None


@dataclass(frozen=True)
class Lease:
    """One request in flight counted against a concurrency limit."""

    key: str
    lease_id: str
    owner: str
    expires_us: int


def token_fits_at(
    entries: Sequence[tuple[int, int]], limit: int, amount: int, window_us: int
) -> int | None:
    """When `amount` fits under `limit` in a window of (ts, amount) entries (oldest first): the
    moment enough of them have left it; None if it never can (amount > limit).

    Both stores answer a refusal's retry time with this rule (Redis in its script)."""
    if amount > limit:
        return None
    excess = sum(a for _, a in entries) + amount - limit
    for ts, a in entries:
        excess -= a
        if excess <= 0:
            return ts + window_us
    return None


def _split(
    amount: int, daily_free: int, grants_free: Sequence[tuple[str, int]]
) -> tuple[int, int, dict[str, int]]:
    """`amount` over the daily allowance first, then grants in the order given: (from the
    allowance, what neither covers, {grant id: take})."""
    daily = min(amount, max(0, daily_free))
    rest = amount - daily
    takes: dict[str, int] = {}
    for grant_id, free in grants_free:
        if rest <= 0:
            break
        take = min(rest, max(0, free))
        if take:
            takes[grant_id] = take
            rest -= take
    return daily, rest, takes


def plan_holds(
    amount: int, daily_free: int, grants_free: Sequence[tuple[str, int]]
) -> tuple[int, dict[str, int]] | None:
    """Split `amount` over the daily allowance, then grants in the order given; None if short.

    A negative `daily_free` (today's overspend) counts against the grants too, which keeps
    `spendable = daily_free + sum(grants_free)` the single rule.
    """
    total_grants = sum(max(0, free) for _, free in grants_free)
    if amount > 0 and daily_free + total_grants < amount:
        return None
    daily, _, holds = _split(amount, daily_free, grants_free)
    return daily, holds


def tenant_admits(amount: int, budget: int | None, spent: int, reserved: int) -> bool:
    """Whether a tenant's period row can hold `amount` more (no budget: always; 0: always).

    The Redis reserve script makes the same test; tests/core/state/test_contract.py runs one
    table through this function and through both stores."""
    return budget is None or amount <= 0 or budget - spent - reserved >= amount


# An API key's budget row admits by the same rule as a tenant's (the same table tests both).
key_admits = tenant_admits


def plan_reserve(
    new: NewReservation,
    day: tuple[int, int, int],
    grants_free: Sequence[tuple[str, int]],
    tenant_row: Callable[[], tuple[int, int]],
    key_row: Callable[[], tuple[int, int]],
) -> ReserveResult:
    """Reserve's decision over the rows a store read: the user's row (`day`: spent, from grants,
    reserved) and its unexpired grants, earliest expiry first (plan_holds); then, when named,
    the tenant's and the key's rows, each (spent, reserved) read by its callable only once
    every row before it admitted. A refusal names the scope that refused; an admission carries
    the holds the store then writes. The Redis reserve script decides the same in Lua."""
    spent, from_grants, reserved = day
    daily_free = new.budget - (spent - from_grants) - reserved
    grants_total = sum(max(0, free) for _, free in grants_free)
    plan = plan_holds(new.amount, daily_free, grants_free)
    if plan is None:
        return ReserveResult(False, 0, {}, spent, from_grants, reserved, grants_total)
    tracked, keyed = new.on_tenant_row, new.on_key_row
    t_spent = t_reserved = k_spent = k_reserved = 0
    refused = ""
    if tracked:
        t_spent, t_reserved = tenant_row()
        if not tenant_admits(new.amount, new.tenant_budget, t_spent, t_reserved):
            refused = "tenant"
    if keyed and not refused:
        k_spent, k_reserved = key_row()
        if not key_admits(new.amount, new.key_budget, k_spent, k_reserved):
            refused = "key"
    if refused:
        return ReserveResult(
            False, 0, {}, spent, from_grants, reserved, grants_total, scope=refused,
            tenant_spent=t_spent, tenant_reserved=t_reserved,
            key_spent=k_spent, key_reserved=k_reserved,
        )
    daily, holds = plan
    return ReserveResult(
        True, daily, holds, spent, from_grants, reserved, grants_total,
        tenant_spent=t_spent, tenant_reserved=t_reserved,
        tenant_hold=new.amount if tracked else 0,
        key_spent=k_spent, key_reserved=k_reserved,
        key_hold=new.amount if keyed else 0,
    )


def shrink_holds(
    own_daily: int, own_grants: Mapping[str, int], daily: int, draws: Mapping[str, int]
) -> tuple[int, dict[str, int]]:
    """What a reservation's holds drop by when a cost is drawn while it stays held (settle_part):
    the allowance drawn comes out of its own allowance hold first, each grant's draw out of its
    own hold of that grant. Returns (allowance hold used, {grant id: hold used})."""
    grants = {g: min(h, draws.get(g, 0)) for g, h in own_grants.items() if draws.get(g, 0) > 0}
    return min(own_daily, daily), grants


def plan_settle(
    cost: int, daily_free: int, grants_free: Sequence[tuple[str, int]]
) -> tuple[int, dict[str, int]]:
    """Draw a real cost: daily allowance first, then grants by earliest expiry, the rest overdraws
    the daily allowance (recorded, never dropped)."""
    daily, rest, draws = _split(cost, daily_free, grants_free)
    return daily + rest, draws


class SettlePlan(NamedTuple):
    """How a settle (or settle_part) draws its cost on a reservation: the holds it still has
    (`own_daily`, `own`), then the draw (plan_settle)."""

    active: bool
    own_daily: int
    own: dict[str, int]
    daily: int  # from the allowance, overdraw included
    draws: dict[str, int]


def plan_settle_held(
    cost: int,
    status: str,
    daily_hold: int,
    grant_holds: dict[str, int],
    budget: int,
    day: tuple[int, int, int],
    grants_free: Callable[[Mapping[str, int]], Sequence[tuple[str, int]]],
) -> SettlePlan:
    """Plan the draw of `cost` on a reservation of `status` "active" or "reclaimed", holding
    `daily_hold` of its user's allowance and `grant_holds` of grants: what it holds is free to
    it. A reclaimed one gave its holds back already (it holds nothing); its spend still counts.
    `day`: the user's row (spent, from grants, reserved); `grants_free(own)`: the user's grants
    unexpired or held in `own`, earliest expiry first, with what is free of each (the Redis
    settle scripts plan the same in Lua)."""
    active = status == "active"
    own_daily = daily_hold if active else 0
    own = grant_holds if active else {}
    spent, from_grants, reserved = day
    daily_free = budget - (spent - from_grants) - (reserved - own_daily)
    grants = [(gid, free + own.get(gid, 0)) for gid, free in grants_free(own)]
    daily, draws = plan_settle(cost, daily_free, grants)
    return SettlePlan(active, own_daily, own, daily, draws)


class StoreUnreachable(StoreUnavailable):
    """The store could not be reached (refused, or its timeout spent), as opposed to a call it
    answered with an error: the calls queued after one that found it so fail with it at once
    (state/calls.py run_apart)."""


class WouldWait(Exception):
    """The store cannot answer this call without waiting (its lock is held): nothing changed.

    Raised only by `StateStore.call_without_waiting`; the caller tries again a moment later
    (`busy`: the lock is held now) or runs the call where waiting is allowed (a worker thread).
    """

    def __init__(self, why: str, busy: bool = True) -> None:
        super().__init__(why)
        self.busy = busy  # False: this store never answers without waiting (a remote store)


class BatchAborted(Exception):
    """A call inside a batch could not be undone on its own: the whole batch must roll back."""


# -- the ports ---------------------------------------------------------------------------------
# One port per concern, so that each rule names what it needs of the store: the ledger a
# LedgerStore, the rate limiter a RateStore, the user directory a UserStore and a TenantStore.
# They are Protocols (a caller that needs two says so with a Protocol of both); every backend
# implements StateStore, which is all of them plus transactions and lifecycle.


class UserStore(Protocol):
    """Users as the admin API manages them."""

    @abstractmethod
    def get_user(self, user_id: str, include_deleted: bool = False) -> UserRecord | None: ...

    @abstractmethod
    def put_user(self, record: UserRecord) -> None:
        """Create or replace a user (the caller merges partial updates); clears `deleted`."""

    @abstractmethod
    def delete_user(self, user_id: str, now_us: int) -> bool:
        """Mark a user deleted; grants and spend history stay. False if there was none."""

    @abstractmethod
    def list_users(self, include_deleted: bool = False) -> list[UserRecord]: ...


class TenantStore(Protocol):
    """Tenants' budgets and limits as the admin API set them."""

    @abstractmethod
    def get_tenant(self, tenant_id: str) -> TenantRecord | None: ...

    @abstractmethod
    def put_tenant(self, record: TenantRecord) -> None: ...

    @abstractmethod
    def list_tenants(self) -> list[TenantRecord]: ...


class LedgerStore(Protocol):
    """Budgets: reservations held before forwarding and settled on real usage, grants, the
    per-period rows they are checked against, and the spend history."""

    @abstractmethod
    def reserve(self, new: NewReservation) -> ReserveResult: ...

    @abstractmethod
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
        """Turn an active (or reclaimed) reservation into spend; anything else is a no-op."""

    @abstractmethod
    def settle_part(
        self, reservation_id: str, parts: Sequence[SpendPart], now_us: int
    ) -> SettleResult:
        """Record `parts` as spend on an active (or reclaimed) reservation that stays as it is
        (a budget slice): their total is drawn as a settle draws it (the reservation's own
        holds first, then the allowance, grants by earliest expiry, the rest overdrawn), the
        reservation's holds shrink by what was drawn from them, each part adds a spend row of
        its requests, and the reservation counts the spend and requests recorded on it. One
        atomic step; a reservation settled or released already records nothing."""

    @abstractmethod
    def release(self, reservation_id: str, now_us: int, reclaim: bool = False) -> bool:
        """Free an active reservation's holds. `reclaim` marks it as taken back by reconcile:
        a later settle still records its spend."""

    @abstractmethod
    def active_reservations(self) -> list[ActiveReservation]: ...

    @abstractmethod
    def purge_finished(self, before_us: int) -> int:
        """Forget finished reservations older than `before_us` (housekeeping)."""

    @abstractmethod
    def add_grant(self, grant: GrantRow) -> None: ...

    @abstractmethod
    def grants(self, user_id: str) -> list[GrantRow]:
        """Every grant of a user, earliest expiry first."""

    @abstractmethod
    def day_totals(self, user_id: str, day: str) -> DayTotals:
        """A user's budget row: `day` is the period key (a UTC day for daily UTC budgets)."""

    @abstractmethod
    def tenant_totals(self, tenant: str, period: str) -> DayTotals:
        """A tenant's budget row for a period key (from_grants is always 0)."""

    @abstractmethod
    def key_totals(self, key_id: str, period: str) -> DayTotals:
        """An API key's budget row (`key_id`: its lineage) for a period key (from_grants: 0)."""

    @abstractmethod
    def spend_rows(
        self,
        since_day: str | None = None,
        until_day: str | None = None,
        user_id: str | None = None,
        tenant: str | None = None,
    ) -> list[SpendRow]:
        """Spend per (day, user, tenant, model, provider), days inclusive."""


class KeyStore(Protocol):
    """API keys minted through the admin API (their digests)."""

    @abstractmethod
    def put_api_key(self, record: KeyRecord) -> None:
        """Store a new key (its id and digest are new)."""

    @abstractmethod
    def api_key(self, sha256: str) -> KeyRecord | None:
        """The key with this digest, revoked or not."""

    @abstractmethod
    def api_keys(self, user_id: str | None = None) -> list[KeyRecord]:
        """Every key (of one user), oldest first."""

    @abstractmethod
    def expire_api_key(self, key_id: str, expires_us: int) -> KeyRecord | None:
        """Bring a key's expiry forward to `expires_us` (never later than it was); the key as it
        was before, or None if there is no such key."""

    @abstractmethod
    def revoke_api_key(self, key_id: str, now_us: int) -> KeyRecord | None:
        """Mark a key revoked; the key as it was before, or None if there is no such key.
        A key revoked already keeps its first revocation time."""


class JobStore(Protocol):
    """Asynchronous jobs created through Candela (their owner and creation charge) and the
    objects they are made from or make."""

    @abstractmethod
    def record_job(self, job: JobRecord) -> bool:
        """Record a job created under `job.reservation_id` (whose user, tenant and budget rows
        it copies, ignoring the record's own); False if the job is known already or that
        reservation is not."""

    @abstractmethod
    def job(self, provider: str, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def put_job_object(self, provider: str, key: str, record: Mapping[str, Any]) -> bool:
        """Keep a small JSON record about an object a job is made from or makes (a batch's
        uploaded input file, its output file), unless one is kept under `key` already."""

    @abstractmethod
    def job_object(self, provider: str, key: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def true_up_job(
        self, provider: str, job_id: str, cost: int, tokens_in: int, tokens_out: int, now_us: int
    ) -> JobRecord | None:
        """Once per job, atomically: correct its creation's charge to `cost` (the difference,
        either way, on the user's period row, the tenant's and the spend row the charge landed
        on; the request count unchanged) and its tokens to those given. Returns the job as it
        was before (its `charged`), or None: unknown, or trued up already (a no-op)."""


class RateStore(Protocol):
    """Rate windows (requests, tokens) and concurrency leases."""

    @abstractmethod
    def rate_hit(self, key: str, limit: int, window_us: int, now_us: int) -> RateHit:
        """Sliding log: forget entries at or before now - window, count, add one if under limit."""

    @abstractmethod
    def rate_take(
        self, key: str, limit: int, n: int, window_us: int, now_us: int, stamp_us: int
    ) -> RateTake:
        """A rate lease (governance/rate_leases.py): forget entries at or before now - window,
        then add up to `n` entries stamped `stamp_us` (>= now: they count until stamp + window)
        while the window holds fewer than `limit`. One atomic step."""

    @abstractmethod
    def rate_return(self, key: str, stamp_us: int, n: int) -> int:
        """Remove up to `n` entries stamped exactly `stamp_us` (a lease's unused part: entries
        of one stamp are alike); returns how many were removed."""

    @abstractmethod
    def token_admit(
        self, entry_id: str, checks: Sequence[tuple[str, int, int]], window_us: int, now_us: int
    ) -> TokenAdmit:
        """Token windows: forget entries at or before now - window; admit only if every
        (key, limit, amount) fits (window's sum + amount <= limit), then record `entry_id` with
        its amount under every key. One atomic step: nothing is recorded on a refusal."""

    @abstractmethod
    def token_correct(self, entry_id: str, amounts: Mapping[str, int]) -> None:
        """Replace the amounts `entry_id` counts under each key (its real usage); an entry
        that has left its window is not brought back."""

    # -- concurrency leases --------------------------------------------------------------------
    @abstractmethod
    def lease_acquire(
        self, key: str, lease_id: str, limit: int, owner: str, now_us: int, ttl_us: int
    ) -> tuple[bool, int]:
        """Forget expired leases of `key`; take one if fewer than `limit` are held.
        Returns (taken, leases held after the step)."""

    @abstractmethod
    def lease_release(self, key: str, lease_id: str) -> bool:
        """Give a lease back; False if it was not held (already released or expired)."""

    @abstractmethod
    def lease_renew(self, key: str, lease_id: str, now_us: int, ttl_us: int) -> bool:
        """Hold a lease until now + ttl (a WebSocket session's, while it lives); False if it is
        no longer held (released, or expired: its place may have been taken)."""

    @abstractmethod
    def leases(self) -> list[Lease]:
        """Every lease held (for reconcile at start: those of dead processes go)."""


class AdmissionStore(LedgerStore, RateStore, Protocol):
    """An idle request's admission in one call: its rate step, then its budget reservation."""

    @abstractmethod
    def rate_hit_reserve(
        self, key: str, limit: int, window_us: int, now_us: int, new: NewReservation
    ) -> tuple[RateHit, ReserveResult | None]:
        """rate_hit, then, only when it admitted, reserve(new): the answers of the two in turn
        (None: the rate step refused, nothing was reserved). A budget refusal leaves the rate
        entry counted, as the two calls in turn do."""


class LoopAdmissionStore(Protocol):
    """A store that answers rate_hit_reserve on the event loop, awaited (an asyncio client of a
    remote store: Redis), rather than from a thread of the pool."""

    @abstractmethod
    async def rate_hit_reserve_async(
        self, key: str, limit: int, window_us: int, now_us: int, new: NewReservation
    ) -> tuple[RateHit, ReserveResult | None]:
        """rate_hit_reserve's answer, awaited; raises as it does (StoreUnreachable when the
        store is refused or its timeout is spent: the caller denies)."""


class AlertStore(Protocol):
    """Budget alert claims: each sent once across every process."""

    @abstractmethod
    def claim_alert(
        self, scope: str, scope_id: str, period: str, threshold: int, now_us: int, expires_us: int
    ) -> bool:
        """Mark the alert (scope, scope_id, period key, threshold %) as due for sending: True
        only for the first caller, across every thread and process sharing the store. The mark
        is kept until `expires_us` (after the period's end), then forgotten."""


class GenerationStore(Protocol):
    """A count of the changes to what the admin API sets, which every proxy process polls to
    know when to forget the settings it remembers (governance.settings_watch)."""

    @abstractmethod
    def settings_generation(self) -> int:
        """How many times users, tenants, grants or API keys were changed: put_user,
        delete_user, put_tenant, add_grant, put_api_key, expire_api_key and revoke_api_key add
        one when they change something, in the same atomic step as the change (a reader that
        sees the new count reads the change). Only ever grows; 0 for a store nobody changed."""


RECALLS_KEPT = 1024  # slice recall marks a store keeps (the newest; older ones are dropped)


@dataclass(frozen=True)
class SliceRecall:
    """A mark a refused reservation leaves for the processes holding slices of its budget."""

    seq: int  # its number: 1, 2, ... in the order made
    scope: str  # "user" or "tenant"
    name: str  # the user's or the tenant's id
    at_us: int  # when it was made (the maker's clock)


class SliceRecallStore(Protocol):
    """Marks that ask every process holding a budget slice of a refused budget to return it
    (governance/slices.py): written by the process whose reservation was refused, read by the
    holders at their flush."""

    @abstractmethod
    def recall_slices(self, scope: str, name: str, now_us: int) -> int:
        """Add a mark, numbered one past the newest, in one atomic step; keep the newest
        RECALLS_KEPT. Returns its number."""

    @abstractmethod
    def slice_recalls(self, after: int) -> tuple[int, list[SliceRecall]]:
        """The newest mark's number (0: none ever made) and the marks kept numbered past
        `after`, oldest first, in one read."""


class StateStore(
    AdmissionStore,
    UserStore,
    TenantStore,
    LedgerStore,
    KeyStore,
    JobStore,
    RateStore,
    AlertStore,
    GenerationStore,
    SliceRecallStore,
    ABC,
):
    """Governance state shared by every worker: every port, each method one atomic step.

    Every failure to read or write raises candela_mitm.errors.StoreUnavailable: callers deny.
    """

    # Whether batch() really makes one transaction of several calls and savepoint() undoes one
    # of them: then the proxy runs the store calls of one event-loop turn together.
    joins_calls = False
    # Methods that only read, each in one read transaction of its own: a turn whose calls are
    # all of these runs them without the write transaction batch() takes (run_calls).
    reads: frozenset[str] = frozenset()

    # -- how calls run -------------------------------------------------------------------------
    def batch(self) -> AbstractContextManager[None]:
        """Run the store calls inside the block as one transaction, where the backend can.

        Either all of their changes happen or none (an exception rolls the block back). A
        backend without multi-call transactions runs each call atomically on its own.
        """
        return nullcontext()

    def savepoint(self) -> AbstractContextManager[None]:
        """Inside batch(): the block's changes are undone alone if it raises (the batch goes
        on). Raises BatchAborted when they cannot be: the whole batch must then roll back."""
        return nullcontext()

    def in_batch(self) -> bool:
        """True inside batch() on this thread (a nested batch() joins the outer one)."""
        return False

    def call_without_waiting(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` (store calls) on this thread if the store can answer it at once.

        Raises WouldWait, with nothing changed, when it cannot (a lock held by another
        thread or process, a remote store): run it again on a thread that may wait. For the
        event loop: a SQLite transaction takes tens of microseconds, a hop to a thread pool
        and back costs more than that in CPU. `fn` may make any number of reads and at most
        one write transaction (use `batch` to group writes).
        """
        raise WouldWait("this store is always called from a thread that may wait", busy=False)

    def rate_hit_reserve(
        self, key: str, limit: int, window_us: int, now_us: int, new: NewReservation
    ) -> tuple[RateHit, ReserveResult | None]:
        """The two calls in turn: one transaction inside the caller's batch (SQLite's admission
        call runs in one: state/calls.py), a lock each (memory). Redis overrides it with one
        script, one round trip."""
        hit = self.rate_hit(key, limit, window_us, now_us)
        return hit, self.reserve(new) if hit.allowed else None

    def loop_admission(self) -> LoopAdmissionStore | None:
        """This store's folded admission on the event loop, if it has one (None: the call goes
        to the thread pool, or runs on the loop through call_without_waiting: SQLite)."""
        return None

    # -- lifecycle -----------------------------------------------------------------------------
    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Call = tuple[Callable[..., Any], tuple[Any, ...]]
Outcome = tuple[bool, Any]  # (True, result) or (False, the exception it raised)


def reads_only(store: StateStore, calls: Sequence[Call]) -> bool:
    """Whether every call is one of `store`'s own methods that only read (`store.reads`)."""
    reads = store.reads
    return bool(reads) and all(
        getattr(fn, "__self__", None) is store and getattr(fn, "__name__", "") in reads
        for fn, _ in calls
    )


def run_calls(store: StateStore, calls: Sequence[Call]) -> list[Outcome]:
    """Run store calls in one transaction, each atomic on its own (a savepoint).

    One call failing undoes only its own changes and becomes its outcome; the others commit
    together. A failure of the transaction itself (it cannot begin, or commit) raises, except
    for a lone call, whose outcome it is.
    """
    if not store.in_batch() and reads_only(store, calls):
        # Reads alone (a minted key's lookup, a user's settings): each in its own read
        # transaction, not under the write lock and the write gate batch() takes (SQLite: BEGIN
        # rather than BEGIN IMMEDIATE, no flock): about a third of a lone read's cost.
        return [_outcome(call) for call in calls]
    if len(calls) == 1 and not store.in_batch():
        # One call: the transaction is its own, no savepoint (two statements fewer). Its failure,
        # or the transaction's, rolls it back and is its outcome (SQLite errors come out of the
        # batch as StoreUnavailable). Half of all turns hold one call, and at low concurrency
        # all of them.
        return [_outcome(calls[0], store.batch)]
    with store.batch():
        outcomes = [_outcome(call, store.savepoint) for call in calls]
    return outcomes


def _outcome(
    call: Call, within: Callable[[], AbstractContextManager[None]] = nullcontext
) -> Outcome:
    """One call's outcome inside `within()`: its answer, or the error it raised. A wait or an
    aborted batch is not an outcome: it ends the whole run (run it again elsewhere, or fail)."""
    fn, args = call
    try:
        with within():
            return True, fn(*args)
    except (WouldWait, BatchAborted):
        raise
    except Exception as e:
        return False, e
