"""Budget slices: a process holds part of a budget in one reservation and carves requests'
holds from it in memory, recording their spend in the store in bulk.

Why: a request's reservation and its settle are one store transaction each (86 and 56 µs warm
on SQLite, more on Redis: bench/README.md, issue 21). A slice is one reservation owned by this
process (state/liveness.py names it, as any reservation), taken when a request's own
reservation showed the budget with ample room: `size` = `requests` of that request's holds,
never more than what is left divided by `headroom`, so near its end a budget is never sliced
and every request there reserves on its own, exactly, with its 402 decided by the store.

- carve: a request whose every budget (the user's, the tenant's, the API key's, as one
  reservation holds them) has a slice of the same budgets and periods with room for its hold
  takes it from there (no store call); otherwise it reserves on its own as before.
- settle / release: in memory; the spend is queued and `flush` records it with settle_part
  (one store call per slice with spend), after the request's durable audit entry, as a
  request's own settle is: a slice in use every `record_ms`, a slice retired at the next flush
  (every `flush_ms`), before it is returned. The slice's reservation holds the money until
  then: recording spend moves it from held to spent, so the cadence delays only the spent
  figure (status, usage rows, budget alerts), never a budget's decision.
- the next slice is asked before this one runs out (`ask_next`, after a request carved from it,
  in the background as any slice is taken, a quarter of the user's gap between requests
  later, at most half a second: governance/ahead.py): when less than a quarter of it is free,
  or it is within a tenth of MAX_AGE_S of it, or a gap and a half between the user's requests
  if longer (`age_margin`: an idle user's next request may come after MAX_AGE_S; the pace
  seen on a slice carries over to the next one in use, `carry`). At most one ask is in flight
  per budgets (`_taking`). It is sized by the
  demand seen on the slice in use: what its requests carved per second times `demand_s`, at
  least `paced` (what that demand spends over MAX_AGE_S, between two and `requests` holds)
  and at most `max_requests` of the asking request's hold, and never more
  than what was left outside the slice in use (as the store counted it when that one was
  taken) divided by `headroom`. The store's reservation refuses a slice the budget cannot
  hold, and one it holds but with less than `headroom` times its size left beside it (the
  store's own counters, read in the same step) is returned unused: near a budget's end no
  slice is taken and requests reserve on their own, the store deciding the 402.
- the slice taken ahead waits (`_next`) until a request does not fit the one in use: that one
  is retired then (its requests in flight settle into it, what is left of it, less than that
  request's hold, is returned at the next flush) and the request is carved from the next. So
  for a while one process holds two slices of the same budgets: both are reservations in the
  store, each bounded and accounted, the second sized on what was left beside the first. A
  change that retires the one in use (an admin change, a new budget, idle, shutdown) retires
  the one waiting too.
- a slice is returned (what is left released) when a request did not fit it, when idle for
  `idle_s`, when older than MAX_AGE_S, when a refusal recalls it (below), at shutdown, and
  when an admin change in this process (`retire_all`) or a changed budget seen in a request's
  settings makes it stale; once its requests in flight have settled. A slice asked before a `retire_all` is returned unused when
  it comes (`_epoch`).
- idle users: a budget is sliced once it reserved on its own twice within `idle_s` (30 s: a
  user sending a request every few seconds, the common LLM pattern, keeps its slice across
  its gaps, and its requests are carved from the second on; a one-off request takes none).
  Its slice is sized to the pace of those two reservations (`paced`: what it spends over a
  slice's life, MAX_AGE_S, at least two holds, at most `requests`): a crash charges an idle
  user a few holds, not `requests` of them.
  A process holds at most `max_held` slices (`_full`): past it none is asked, and the other
  budgets' requests reserve on their own; the flush's work is bounded by it.
- a refusal: a request's own reservation refused while this process holds money of that
  budget unused in a slice (`holding`: in use, taken ahead, or retired and waiting for the
  next flush, as a slice asked ahead and returned unused near the budget's end does) is not a
  402 for it: the request is carved from a slice of its budgets with room (`carve_held`,
  retired ones too) or, none having room, those slices are returned at once (`return_now`,
  those with requests in flight at the next flush) and it reserves again (addons/budget.py
  `_second_look`). A refusal that stands returns this process's slices of the budget
  that refused it (`refused`: the user's, or every slice of the tenant), and
  leaves a recall mark in the store (`recall_mark`, `recall`: SliceRecallStore) that every
  process holding a slice reads at its next flush (`_recalls`), returning its slices of that
  budget: the cross-process window in which an unused slice elsewhere refuses requests near a
  budget's end is a flush or two, not `idle_s`.
- a process that dies holding a slice: the next start settles the spend its requests' audit
  entries name past what the slice recorded, then charges what is left of it (its requests in
  flight at the crash are among it and which ones cannot be known: nothing forwarded is free;
  the overcharge is bounded by the slice's size, which `requests` (`max_requests` for one
  taken ahead: about `demand_s` of the demand) and `headroom` cap; a slice taken ahead and
  still waiting is charged whole, as the one in use), with an audit entry of its own written
  first (governance/reconcile.py).

Not thread-safe on its own: carve, settle and release run on the event loop; flush and take
run where store calls run, so every method takes the lock.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from candela_mitm.governance.ahead import ask_after
from candela_mitm.governance.ledger import BudgetRefusal, KeyBudget, Ledger, Reservation
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.state.ports import (
    Call,
    Outcome,
    ReserveResult,
    SliceRecall,
    SpendPart,
    StateStore,
    day_of,
    nano_to_usd,
    run_calls,
    to_us,
    usd_to_nano,
    utc_now,
)

if TYPE_CHECKING:
    from candela_mitm.config import BudgetSlices

log = logging.getLogger("candela.slices")

SLICE_PREFIX = "slice:"  # a slice's request_id in the store: reconcile knows it by this
MAX_AGE_S = 60.0  # a slice is taken afresh at least this often (far below the stale age limit)
ASKED_MAX = 10_000  # budgets remembered as reserving on their own (the least recent forgotten)
RECALL_EVERY_S = 1.0  # a process leaves a recall mark for one budget at most this often
# A mark recalls the slices taken before it, no later: a slice taken after a mark is not the
# one that refused (a skew allowance of 1 s recalled fresh slices on stale marks, read at the
# first flush after a process took a slice again: its unused part sat retired until the next
# flush while its requests reserved on their own and were refused, under-admission seen in
# tests/e2e/test_slices.py). A mark made on a host whose clock runs behind misses slices taken
# there just before it: those return after `idle_s`, as without marks.
RECALL_SKEW_US = 0


@dataclass(frozen=True)
class SliceRules:
    """governance.budgets.slices, as the manager reads it."""

    requests: int = 32  # a slice holds this many of the hold that asked for it (the least)
    headroom: int = 8  # never more than what the budget has left / headroom
    flush_s: float = 0.05
    idle_s: float = 30.0  # an idle user's slice lives across its gaps (a request every few s)
    enabled: bool = True  # False: no slice is taken or carved (those held are returned)
    max_requests: int = 1024  # a slice asked ahead covers demand_s of the demand, up to this
    demand_s: float = 1.0
    record_s: float = 0.0  # a slice in use has its spend recorded this often (at least flush_s)
    max_held: int = 4096  # slices held (or being taken) at once, at most; past it none is taken

    @classmethod
    def of(cls, cfg: BudgetSlices) -> SliceRules:
        return cls(
            cfg.requests, cfg.headroom, cfg.flush_ms / 1000, cfg.idle_s, cfg.enabled,
            cfg.max_requests, cfg.demand_ms / 1000, cfg.record_ms / 1000, cfg.max_held,
        )


@dataclass(frozen=True)
class SliceKey:
    """The budgets a slice was judged against: a request uses a slice of the same key only."""

    user_id: str
    tenant: str | None
    key_id: str  # the key's budget row ("": no key budget)
    budget_nano: int
    period: str  # the user's period key
    tenant_budget_nano: int | None
    tenant_period: str
    key_budget_nano: int | None
    day: str

    @property
    def holder(self) -> tuple[str, str | None, str]:
        return self.user_id, self.tenant, self.key_id


@dataclass
class Slice:
    reservation: Reservation  # the store's, held by this process
    key: SliceKey
    size: int  # nano-dollars
    taken_at: float
    used_at: float
    carved: int = 0  # holds of requests in flight
    inflight: int = 0
    spent: int = 0  # settled here (recorded in the store or not)
    pending: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (model, provider)
    retiring: bool = False
    demand: int = 0  # the holds carved from it so far (its demand per second: / since `since`)
    since: float = 0.0  # when it came into use (or the one before it: `carry`)
    gap: float = 0.0  # the time between the last two requests carved (from it or the one before)
    largest: int = 0  # the largest hold carved from it (or the ones before it in use: `carry`)
    recorded_at: float = 0.0  # when its spend was last recorded (or it was taken)
    returning: bool = False  # a flush is returning it: nothing more is carved from it

    @property
    def free(self) -> int:
        return self.size - self.spent - self.carved


@dataclass(frozen=True)
class Ask:
    """What a request's own reservation says about its budgets: enough to take a slice."""

    key: SliceKey
    amount_usd: float  # the slice's size
    reserve: Callable[[], Reservation | BudgetRefusal]  # the slice's reservation (a store call)
    ahead: bool = False  # asked before the slice in use ran out (`ask_next`)
    epoch: int = 0  # retire_all's count when asked: a slice asked before one is returned
    after_s: float = 0.0  # the take may wait this long (governance/ahead.py)
    hold: int = 0  # the hold it is sized in (the largest seen lately): its `largest` to start


def free_after(seen: ReserveResult, key: SliceKey, amount: int) -> int:
    """What the budgets had left once a reservation of `amount` was taken: the least over the
    user's (allowance and grants), the tenant's and the key's rows it was judged on."""
    free = (
        key.budget_nano - (seen.spent - seen.from_grants) - seen.reserved + seen.grants_free
        - amount
    )
    if key.tenant_budget_nano is not None:
        free = min(free, key.tenant_budget_nano - seen.tenant_spent - seen.tenant_reserved - amount)
    if key.key_budget_nano is not None:
        free = min(free, key.key_budget_nano - seen.key_spent - seen.key_reserved - amount)
    return free


def in_one_transaction(store: object, calls: list[Call]) -> list[Outcome]:
    """`run_calls` on a state store (one transaction, each call atomic on its own); else the
    calls one by one (a ledger over a store of its own, in tests)."""
    if isinstance(store, StateStore):
        return run_calls(store, calls)
    out: list[Outcome] = []
    for fn, args in calls:
        try:
            out.append((True, fn(*args)))
        except Exception as e:
            out.append((False, e))
    return out


def spend_parts(pending: dict[tuple[str, str], list[int]]) -> list[SpendPart]:
    return [SpendPart(m, p, c, i, o, n) for (m, p), (c, i, o, n) in pending.items()]


def next_size(rules: SliceRules, hold: int, demand_per_s: float, free: int) -> int:
    """The size of the slice asked ahead of the one in use: `demand_s` of the demand seen on
    it, between `requests` and `max_requests` of `hold`, never more than `free` (left beside
    the slice in use) / headroom; 0: take none."""
    if hold <= 0:
        return 0
    want = min(max(int(demand_per_s * rules.demand_s), paced(rules, hold, demand_per_s)),
               max(rules.max_requests, rules.requests) * hold)
    size = min(want, free // rules.headroom) // hold * hold  # whole holds (see slice_size)
    return size if size >= 2 * hold else 0


def paced(rules: SliceRules, hold: int, demand_per_s: float) -> int:
    """The least a slice holds at a demand of `demand_per_s` (nano-dollars a second): what
    that pace spends over a slice's life (MAX_AGE_S), in whole holds, at least two, at most
    `requests` of them. A busy budget gets `requests` holds as before; an idle user's (a
    request every few seconds) no more than its pace uses before the slice is taken afresh
    anyway: what a crash charges of a slice's unused part (governance/reconcile.py) and what
    `reserved_usd` shows of it stay near what the user spends, not `requests` holds."""
    if hold <= 0:
        return 0
    holds = int(demand_per_s * MAX_AGE_S / hold) + 1
    return max(2, min(rules.requests, holds)) * hold


def slice_size(rules: SliceRules, hold: int, free: int) -> int:
    """A slice's size for a hold of `hold` with `free` left after it; 0: take none (the budget
    is near its end, or the slice would hold fewer than two such requests). Whole holds:
    requests like the one that asked spend it exactly, leaving no fraction of a hold held
    beside a budget's end until the slice is returned (a request reserving on its own there
    would be refused for it)."""
    if hold <= 0:
        return 0
    size = min(rules.requests * hold, free // rules.headroom) // hold * hold
    return size if size >= 2 * hold else 0


def age_margin(gap_s: float) -> float:
    """How long before MAX_AGE_S the next slice is asked: a tenth of it, or a gap and a half
    between the user's requests if longer (at most half of it): an idle user's next request
    may come seconds after the one in use is too old, and a slice taken ahead waits in
    `_next` until then (scenario 3: a request every ~17 s found its slices past MAX_AGE_S
    and reserved on its own every few requests)."""
    return min(max(MAX_AGE_S * 0.1, 1.5 * gap_s), MAX_AGE_S / 2)


def carry(prev: Slice, s: Slice, now: float) -> None:
    """`s` comes into use after `prev`: the pace seen on `prev` carries over (its demand over
    at most the last MAX_AGE_S, and the gap between requests), so that the next slice asked
    right away is sized on what the user spends, not on a single request in no time."""
    span = now - prev.since
    if span > MAX_AGE_S:
        s.demand, s.since = int(prev.demand * MAX_AGE_S / span), now - MAX_AGE_S
    else:
        s.demand, s.since = prev.demand, prev.since
    s.gap, s.used_at = prev.gap, prev.used_at
    s.largest = max(s.largest, prev.largest)


def carved_from(res: Reservation, **changes: object) -> Reservation:
    """`dataclasses.replace(res, **changes)` without its walk over the fields on every call
    (4.4 -> 0.9 µs; once per carved request): Reservation is a frozen dataclass with a
    `__dict__` and no `__post_init__` (tests/core/governance/test_slices.py holds both)."""
    new = object.__new__(Reservation)
    new.__dict__.update(res.__dict__, **changes)
    return new


def recalls(mark: SliceRecall, s: Slice) -> bool:
    """Whether a recall mark returns slice `s`: one of its budgets (the user's: its user's
    slices; the tenant's: every slice of that tenant), taken before the mark was made."""
    mine = s.key.tenant == mark.name if mark.scope == "tenant" else s.key.user_id == mark.name
    return mine and to_us(s.reservation.created_at) <= mark.at_us + RECALL_SKEW_US


class Slices:
    """This process's budget slices (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        rules: SliceRules,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.rules = rules
        self.clock = clock
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._by_key: dict[SliceKey, Slice] = {}
        self._by_holder: dict[tuple[str, str | None, str], Slice] = {}  # the one in use
        self._next: dict[SliceKey, Slice] = {}  # taken ahead: used once the one in use is spent
        self._by_id: dict[str, Slice] = {}  # every slice still held, retiring ones too
        self._taking: set[SliceKey] = set()
        self._epoch = 0  # retire_all calls: a slice asked before one is returned, never used
        # when each budget last reserved on its own: a slice is taken only for one used again
        # within idle_s (a budget used less often would return each slice unused)
        self._asked: dict[SliceKey, float] = {}
        # recall marks (SliceRecallStore): the newest read, and the budgets this process left a
        # mark for lately (scope, name) -> when
        self._recall_seen = 0
        self._recalled: dict[tuple[str, str], float] = {}

    # -- the request path (memory only) --------------------------------------------------------
    @staticmethod
    def key_of(
        user_id: str,
        budget_usd: float,
        period: BudgetPeriod,
        tenant: str | None,
        tenant_budget_usd: float | None,
        tenant_period: BudgetPeriod,
        key: KeyBudget | None,
        now: datetime,
    ) -> SliceKey:
        return SliceKey(
            user_id=user_id,
            tenant=tenant,
            key_id=key.budget_id if key else "",
            budget_nano=usd_to_nano(budget_usd),
            period=period.key(now),
            tenant_budget_nano=(
                usd_to_nano(tenant_budget_usd) if tenant and tenant_budget_usd is not None else None
            ),
            tenant_period=tenant_period.key(now) if tenant else "",
            key_budget_nano=usd_to_nano(key.budget_usd) if key else None,
            day=day_of(now),
        )

    def carve(self, key: SliceKey, amount_usd: float, request_id: str) -> Reservation | None:
        """The request's hold, taken from this process's slice of its budgets; None: there is
        none with room (the request reserves on its own; a slice it did not fit is returned)."""
        amount = usd_to_nano(amount_usd)
        with self._lock:
            s = self._by_key.get(key)
            if s is None:
                old = self._by_holder.get(key.holder)
                if old is not None:  # its budgets changed (an admin change, a new period)
                    self._retire_both(old)
                return None
            if not self.rules.enabled:
                self._retire_both(s)
                return None
            now = self.monotonic()
            if s.free < amount or now - s.taken_at > MAX_AGE_S:
                prev = s
                self._retire(s)
                s = self._next.pop(key, None)  # the slice taken ahead, if any
                if s is None:
                    return None
                if s.free < amount or now - s.taken_at > MAX_AGE_S:
                    self._retire(s)
                    return None
                carry(prev, s, now)
                self._by_key[key] = s
                self._by_holder[key.holder] = s
            s.demand += amount
            s.largest = max(s.largest, amount)
            s.gap = now - s.used_at  # from the request before (or the take it asked)
            s.used_at = now
            return self._hold_on(s, amount, request_id)

    def _hold_on(self, s: Slice, amount: int, request_id: str) -> Reservation:
        """A request's hold of `amount` taken from `s` (the lock held)."""
        s.carved += amount
        s.inflight += 1
        return carved_from(
            s.reservation,
            amount_usd=nano_to_usd(amount),
            request_id=request_id,
            created_at=self.clock(),
            seen=None,
            slice=s.reservation.id,
        )

    def retire_stale(self, key: SliceKey) -> None:
        """A request's budgets changed (an admin change, a new period): the slices of the same
        holder judged on other budgets are returned."""
        with self._lock:
            s = self._by_holder.get(key.holder)
            if s is not None and s.key != key:
                self._retire_both(s)

    def settle(
        self, res: Reservation, cost_usd: float, tokens_in: int, tokens_out: int, model: str,
        provider: str,
    ) -> None:
        """A carved request's spend: kept for the next flush."""
        cost = usd_to_nano(cost_usd)
        with self._lock:
            s = self._by_id[res.slice]
            s.carved -= usd_to_nano(res.amount_usd)
            s.inflight -= 1
            s.spent += cost
            t = s.pending.setdefault((model, provider), [0, 0, 0, 0])
            t[0] += cost
            t[1] += tokens_in
            t[2] += tokens_out
            t[3] += 1

    def release(self, res: Reservation) -> None:
        """A carved request that charged nothing gives its hold back to the slice."""
        with self._lock:
            s = self._by_id[res.slice]
            s.carved -= usd_to_nano(res.amount_usd)
            s.inflight -= 1

    # -- taking a slice (a store call, off the request path) -----------------------------------
    def ask(self, res: Reservation) -> Ask | None:
        """After a request's own reservation: a slice of its budgets to take, if they have
        ample room (`slice_size`), reserved on their own before within `idle_s` (used often
        enough for a slice to be used before it idles), and none is held or being taken."""
        if res.seen is None or res.slice or not self.rules.enabled:
            return None
        key = self.key_of(
            res.user_id, res.budget_usd, res.period, res.tenant, res.tenant_budget_usd,
            res.tenant_period, res.key_budget, res.created_at,
        )
        hold = usd_to_nano(res.amount_usd)
        size = slice_size(self.rules, hold, free_after(res.seen, key, hold))
        if not size:
            return None
        now = self.monotonic()
        with self._lock:
            last = self._asked.pop(key, None)
            self._asked[key] = now  # last in the dict's order: the least recent come first
            while len(self._asked) > ASKED_MAX:  # many budgets: forget the least recent
                del self._asked[next(iter(self._asked))]
            if last is None or now - last > self.rules.idle_s:
                return None
            if key in self._by_key or key in self._next or key in self._taking:
                return None
            if self._full():
                return None
            self._taking.add(key)
        # sized to the pace of the two reservations (an idle user's: a few holds, `paced`)
        size = min(size, paced(self.rules, hold, hold / max(now - last, 0.001)))
        return self._ask(res, key, size, ahead=False, after_s=ask_after(now - last), hold=hold)

    def ask_next(self, res: Reservation) -> Ask | None:
        """After a request carved from a slice (`res`): the next slice of its budgets to take
        now, before this one runs out (see the module docstring), or None."""
        if not res.slice or not self.rules.enabled:
            return None
        now = self.monotonic()
        with self._lock:
            s = self._by_id.get(res.slice)
            if s is None or s.retiring or s.key in self._taking or s.key in self._next or (
                self._by_key.get(s.key) is not s
            ):
                return None
            # whole holds of the largest request seen lately, not only of this one: a user
            # whose requests vary (max_tokens 16, 128, 512 in turn) would not fit the next
            # slice with its largest, and reserve on its own
            hold = max(usd_to_nano(res.amount_usd), s.largest)
            if 4 * s.free >= s.size and s.free >= 2 * hold and (
                now - s.taken_at < MAX_AGE_S - age_margin(s.gap)
            ):
                return None  # ample left, and time for the next request before MAX_AGE_S
            seen = s.reservation.seen
            if seen is None:
                return None
            size = next_size(
                self.rules, hold, s.demand / max(now - s.since, 0.001),
                free_after(seen, s.key, s.size),
            )
            if not size or self._full():
                return None
            self._taking.add(s.key)
            key, gap = s.key, s.gap
        return self._ask(res, key, size, ahead=True, after_s=ask_after(gap), hold=hold)

    def _full(self) -> bool:
        """Whether `max_held` slices are held or being taken (the lock held): no other is
        asked until one is returned. Not the least recently used returned to make room: past
        the bound that would cost a store call per slice taken and thrash (more budgets in use
        than slices allowed: every request would reserve on its own, take a slice and return
        another), where refusing costs nothing: the budgets sliced keep their slices, the rest
        reserve on their own as they would without slices, and a slice idle for `idle_s` makes
        room."""
        return len(self._by_id) + len(self._taking) >= self.rules.max_held

    def _ask(
        self, res: Reservation, key: SliceKey, size: int, ahead: bool, after_s: float = 0.0,
        hold: int = 0,
    ) -> Ask:
        """The reservation of a slice of `size` nano-dollars of `res`'s budgets, to be made
        where store calls are made."""
        amount = nano_to_usd(size)

        def reserve() -> Reservation | BudgetRefusal:
            return self.ledger.reserve(
                res.user_id, res.tenant, amount, res.budget_usd, SLICE_PREFIX + uuid.uuid4().hex,
                period=res.period, tenant_budget_usd=res.tenant_budget_usd,
                tenant_period=res.tenant_period, key_budget=res.key_budget,
            )

        return Ask(
            key, amount, reserve, ahead=ahead, epoch=self._epoch, after_s=after_s, hold=hold
        )

    def took(self, ask: Ask, got: Reservation | BudgetRefusal | None) -> bool:
        """The outcome of an Ask's reservation (None: the store call failed). A slice taken is
        used from now on; one the budget could not hold was a refusal: nothing is held. A
        slice asked ahead that left less than `headroom` times its size beside it in the
        store is returned unused (the budget nears its end: requests reserve on their own)."""
        with self._lock:
            self._taking.discard(ask.key)
            if not isinstance(got, Reservation):
                return False
            now = self.monotonic()
            size = usd_to_nano(got.amount_usd)
            s = Slice(got, ask.key, size, now, now, since=now, recorded_at=now, largest=ask.hold)
            self._by_id[got.id] = s
            if ask.epoch != self._epoch:  # an admin change since it was asked
                s.retiring = True
                return True
            if ask.ahead:
                cur = self._by_key.get(ask.key)
                if got.seen is None or free_after(got.seen, ask.key, 0) < size * self.rules.headroom:
                    s.retiring = True  # returned at the next flush, never carved from
                    return True
                if cur is not None and ask.key not in self._next:
                    self._next[ask.key] = s  # carved from once the one in use is spent
                    return True
            old = self._by_key.get(ask.key)
            if old is not None:
                self._retire_both(old)
            old = self._by_holder.get(ask.key.holder)
            if old is not None:
                self._retire_both(old)
            self._by_key[ask.key] = s
            self._by_holder[ask.key.holder] = s
            return True

    # -- background: record spend, return slices -----------------------------------------------
    def _retire(self, s: Slice) -> None:
        s.retiring = True
        if self._by_key.get(s.key) is s:
            del self._by_key[s.key]
        if self._by_holder.get(s.key.holder) is s:
            del self._by_holder[s.key.holder]
        if self._next.get(s.key) is s:
            del self._next[s.key]

    def _retire_both(self, s: Slice) -> None:
        """`s` and the slice of the same budgets taken ahead of it, if any."""
        nxt = self._next.get(s.key)
        self._retire(s)
        if nxt is not None:
            self._retire(nxt)

    def refused(self, refusal: BudgetRefusal) -> int:
        """A request's own reservation was refused: every slice this process holds of the
        budget that refused it (the user's: its slices; the key's: its user's, a superset, as a
        key's budget is a part of its user's; the tenant's: every slice of that tenant) is
        retired now and returned at the next flush, so the money they hold unused is back in
        the store for the next request instead of after `idle_s`. Returns how many were
        retired. A scan of the slices held (at most `max_held`), on refusals only."""
        with self._lock:
            if refusal.scope == "tenant":
                mine = [
                    s for s in [*self._by_key.values(), *self._next.values()]
                    if s.key.tenant == refusal.tenant
                ]
            else:
                mine = [
                    s for s in [*self._by_key.values(), *self._next.values()]
                    if s.key.user_id == refusal.user_id
                ]
            for s in mine:
                self._retire(s)
            return len(mine)

    # -- a refusal while this process holds part of the budget (Budget._second_look) ----------
    @staticmethod
    def _of(refusal: BudgetRefusal, s: Slice) -> bool:
        """Whether `s` holds part of the budget that refused (as `refused` reads it)."""
        if refusal.scope == "tenant":
            return s.key.tenant == refusal.tenant
        return s.key.user_id == refusal.user_id

    def holding(self, refusal: BudgetRefusal) -> bool:
        """Whether this process holds money of the budget that refused a request unused, in a
        slice still held (in use, taken ahead, or retired and not yet returned: a slice asked
        ahead near the budget's end is returned unused at the next flush, and requests that
        come before it reserve on their own beside it). A scan of the slices held (at most
        `max_held`), on refusals only."""
        with self._lock:
            return any(s.free > 0 and self._of(refusal, s) for s in self._by_id.values())

    def carve_held(self, key: SliceKey, amount_usd: float, request_id: str) -> Reservation | None:
        """After the store refused the request: its hold carved from any slice of its budgets
        still held with room for it, retired ones too (their money is this process's until a
        flush returns it), or None. Not one a flush is returning, nor one past MAX_AGE_S."""
        amount = usd_to_nano(amount_usd)
        now = self.monotonic()
        with self._lock:
            for s in self._by_id.values():
                if (
                    s.key == key and s.free >= amount and not s.returning
                    and now - s.taken_at <= MAX_AGE_S
                ):
                    s.used_at = now
                    return self._hold_on(s, amount, request_id)
        return None

    def return_now(self, refusal: BudgetRefusal) -> tuple[bool, list[Reservation]]:
        """Blocking (store calls), after a refusal no slice had room for: this process's slices
        of the budget that refused are retired (`refused`) and those whose requests have all
        settled returned now (a flush), not at the next one. First: whether one of them holding
        money unused was returned (by this flush or a flush beside it), and the request can
        reserve again; then the slices whose spend the flush recorded (as `flush`)."""
        self.refused(refusal)
        with self._lock:
            unused = [  # those a flush can return now: no request of theirs in flight
                rid for rid, s in self._by_id.items()
                if s.free > 0 and s.inflight == 0 and not s.returning and self._of(refusal, s)
            ]
        if not unused:
            return False, []  # no flush: a refused client retrying costs no store call here
        recorded = self.flush()
        with self._lock:
            return any(rid not in self._by_id for rid in unused), recorded

    def recall_mark(self, refusal: BudgetRefusal) -> tuple[str, str] | None:
        """The recall mark to leave in the store after `refusal` (`recall`, off the loop), so
        that the other processes return their slices of the refused budget at their next
        flush; None: none needed, as nothing else was held on that budget when it refused, or
        this process left one for it within RECALL_EVERY_S (a user retrying at its budget's
        end writes a mark a second, not one per request)."""
        if refusal.reserved_usd <= 0:
            return None
        mark = ("tenant", refusal.tenant or "") if refusal.scope == "tenant" else (
            "user", refusal.user_id)
        now = self.monotonic()
        with self._lock:
            last = self._recalled.pop(mark, None)
            if last is not None and now - last < RECALL_EVERY_S:
                self._recalled[mark] = last
                return None
            self._recalled[mark] = now
            while len(self._recalled) > ASKED_MAX:
                del self._recalled[next(iter(self._recalled))]
        return mark

    def recall(self, mark: tuple[str, str]) -> None:
        """Blocking (a store call): leave the mark `recall_mark` made."""
        if isinstance(self.ledger.store, StateStore):
            self.ledger.store.recall_slices(mark[0], mark[1], to_us(self.clock()))

    def _recalls(self) -> None:
        """Blocking (a store read, at each flush while a slice is held, not retiring): the
        recall marks left since the last read retire this process's slices of their budgets
        taken before the mark (RECALL_SKEW_US: no later, by the wall clocks); they are
        returned in the same flush. Marks missed (more than the store keeps since the last
        read) retire every slice. A read that fails is logged: the slices stay until they
        idle, as without marks."""
        store = self.ledger.store
        if not isinstance(store, StateStore):
            return
        with self._lock:
            if not self._by_key and not self._next:
                return
            seen = self._recall_seen
        try:
            newest, marks = store.slice_recalls(seen)
        except Exception as e:
            log.warning("could not read the slice recall marks: %s", e)
            return
        with self._lock:
            self._recall_seen = newest
            if newest < seen:  # the store was replaced or emptied: nothing to act on
                return
            held = [*self._by_key.values(), *self._next.values()]
            if marks and marks[0].seq > seen + 1 and seen > 0:
                log.warning("slice recall marks missed: every slice returned")
                for s in held:
                    self._retire(s)
                return
            for m in marks:
                for s in held:
                    if not s.retiring and recalls(m, s):
                        self._retire(s)

    def retire_all(self) -> None:
        """Every slice is returned (once its requests have settled): an admin change."""
        with self._lock:
            self._epoch += 1
            for s in [*self._by_key.values(), *self._next.values()]:
                self._retire(s)

    def held(self) -> int:
        """Slices still held in the store (retiring ones too)."""
        with self._lock:
            return len(self._by_id)

    def due(self) -> bool:
        """Whether a flush has anything to do."""
        with self._lock:
            return bool(self._by_id)

    def flush(self, everything: bool = False) -> list[Reservation]:
        """Blocking (store calls): read the recall marks left since the last flush
        (`_recalls`), record the spend settled since the last flush (one settle_part per slice
        with spend: a slice in use every `record_s`) and release the slices retired, recalled,
        idle (`idle_s`) or, with `everything` (shutdown), all of them once their requests have
        settled: the marks' read and at most two transactions (one on Redis per slice). Returns the slices whose spend was recorded
        (budget alerts look at them). Spend a store call could not record stays queued for the
        next flush, and a slice that could not be returned is tried again."""
        self._recalls()
        now = self.monotonic()
        with self._lock:
            if everything:
                for s in [*self._by_key.values(), *self._next.values()]:
                    self._retire(s)
            for s in list(self._by_key.values()):
                if now - s.used_at > self.rules.idle_s and s.inflight == 0:
                    self._retire_both(s)
            work = [
                (s, s.pending) for s in self._by_id.values()
                if s.retiring or (s.pending and now - s.recorded_at >= self.rules.record_s)
            ]
            for s, _ in work:
                s.pending = {}
                s.recorded_at = now
        # every slice's spend in one transaction (SQLite; one script each on Redis), each
        # slice's atomic on its own; then the slices to return, once their spend is recorded
        spent = [(s, p) for s, p in work if p]
        calls: list[Call] = [
            (self.ledger.settle_part, (s.reservation, spend_parts(p))) for s, p in spent
        ]
        outcomes: list[Outcome] = []
        if calls:
            try:
                outcomes = in_one_transaction(self.ledger.store, calls)
            except Exception as e:  # the transaction failed: none was recorded
                outcomes = [(False, e)] * len(calls)
        recorded: list[Reservation] = []
        for (s, pending), (ok, done) in zip(spent, outcomes, strict=True):
            if not ok:
                log.error("could not record the spend of slice %s: %s", s.reservation.id, done)
                with self._lock:  # kept for the next flush
                    for k, t in pending.items():
                        mine = s.pending.setdefault(k, [0, 0, 0, 0])
                        for j in range(4):
                            mine[j] += t[j]
            elif done.applied:
                recorded.append(s.reservation)
            else:
                log.error(
                    "slice %s was settled without this process: %d requests' spend not "
                    "recorded", s.reservation.id, sum(t[3] for t in pending.values()),
                )
        with self._lock:
            returning = [
                s for s, _ in work
                if s.retiring and s.inflight == 0 and not s.pending and not s.returning
            ]
            for s in returning:
                s.returning = True  # not carved from by carve_held, nor returned by a flush beside
        if returning:
            releases: list[Call] = [(self.ledger.release, (s.reservation,)) for s in returning]
            try:
                freed = in_one_transaction(self.ledger.store, releases)
            except Exception as e:
                freed = [(False, e)] * len(releases)
            with self._lock:
                for s, (ok, _) in zip(returning, freed, strict=True):
                    if ok:
                        self._by_id.pop(s.reservation.id, None)
                    else:
                        s.returning = False
                        log.error("could not return slice %s (tried again)", s.reservation.id)
        return recorded
