"""Sessions: a WebSocket session's budget slice, its bounds, and what it did (for its audit entry).

A session has no upper bound known in advance, so it holds a slice of the user's budget at a
time (`governance.websocket.reserve_usd`, reserved at the upgrade like any request's estimate):
each usage frame settles its cost on the ledger and holds a new slice from what is left; when no
slice can be held the budget is exhausted and the session is cut. Every slice is held on the
same rows an HTTP request's estimate is (governance/admission.py `reserve`): the user's, the
tenant's budget (as the user directory says now, so an admin's change applies at the next
top-up) and the API key's own, and whichever runs out first cuts the session. A session that ends while work
is unaccounted (a client frame that asked for work was forwarded and no usage frame followed it:
the client left, the upstream cut, the proxy restarted) is charged the slice it holds, as an HTTP
request without usage is charged its reservation. One whose every frame was refused, or that
forwarded none, never reached a model and gives its slice back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from candela_mitm.governance.ledger import BudgetRefusal, KeyBudget, Ledger, Reservation
from candela_mitm.governance.periods import DAILY_UTC, BudgetPeriod
from candela_mitm.governance.ratelimit import (
    WINDOW_S,
    Admission,
    RateDecision,
    RateLimiter,
    TokenLimits,
)
from candela_mitm.governance.users import TenantSettings
from candela_mitm.providers.usage import Usage
from candela_mitm.state.ports import US_PER_S, RateStore, to_us, utc_now

# how a session ended: the client closed it, the upstream closed it, Candela cut it (budget,
# policy, a bound), or it failed (a connection error, an internal error)
EndReason = Literal[
    "client", "upstream", "budget", "policy", "frame_too_large", "rate_limited", "idle", "error"
]
CUT_REASONS: tuple[EndReason, ...] = (
    "budget", "policy", "frame_too_large", "rate_limited", "idle", "error"
)


@dataclass
class SessionBudget:
    """The slice a session holds on the ledger; every method is one store trip (run it off-loop)."""

    ledger: Ledger
    user: str
    tenant: str | None
    daily_budget_usd: float
    request_id: str
    slice_usd: float
    provider: str
    held: Reservation | None
    charged_usd: float = 0.0  # settled so far, usage frames and (at close) the held slice
    # work was asked for (a client frame forwarded) and no usage frame has reported it yet
    pending: bool = False
    charged_reservation: bool = False  # closed by charging the held slice (usage_source reserved)
    # the tenant's budget and period at each top-up (the user directory's, as HTTP requests read
    # them); None: as the first slice was judged
    tenant_settings: Callable[[str], TenantSettings] | None = None
    # as the first slice was judged: the user's period, and the API key's own budget (a session
    # opened with a budgeted key tops up within it too)
    period: BudgetPeriod = field(default=DAILY_UTC, init=False)
    key_budget: KeyBudget | None = field(default=None, init=False)
    tenant_budget_usd: float | None = field(default=None, init=False)
    tenant_period: BudgetPeriod = field(default=DAILY_UTC, init=False)
    # why the last top-up found nothing to hold: whose budget (scope user, tenant or key) ran out
    refusal: BudgetRefusal | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.held is not None:
            self.period, self.key_budget = self.held.period, self.held.key_budget
            self.tenant_budget_usd = self.held.tenant_budget_usd
            self.tenant_period = self.held.tenant_period

    def _reserve(self, amount_usd: float, model: str) -> Reservation | BudgetRefusal:
        """Hold `amount_usd` on the user's, the tenant's and the key's rows, as an HTTP request's
        estimate is held."""
        tenant_budget, tenant_period = self.tenant_budget_usd, self.tenant_period
        if self.tenant is not None and self.tenant_settings is not None:
            t = self.tenant_settings(self.tenant)
            tenant_budget, tenant_period = t.budget_usd, t.period
        return self.ledger.reserve(
            self.user, self.tenant, amount_usd, self.daily_budget_usd, self.request_id,
            model=model, provider=self.provider, period=self.period,
            tenant_budget_usd=tenant_budget if self.tenant is not None else None,
            tenant_period=tenant_period, key_budget=self.key_budget,
        )

    def settle(self, cost_usd: float, usage: Usage, model: str) -> bool:
        """Settle one usage frame's cost and hold a new slice. False: the budget is exhausted
        (nothing more is held, the session must end)."""
        res = self.held
        self.held = None
        if res is None:  # cut already, a late usage frame: recorded all the same
            got = self._reserve(0.0, model)
            assert isinstance(got, Reservation)  # a zero reservation always succeeds
            res = got
        self.ledger.settle(
            res, cost_usd, usage.input_tokens, usage.output_tokens, model, self.provider
        )
        self.charged_usd += cost_usd
        self.pending = False
        self.held = self._top_up(model)
        return self.held is not None

    def _top_up(self, model: str) -> Reservation | None:
        """A new slice, or what is left of the budgets when less than a slice is; None if
        nothing is (`refusal` then says whose budget ran out)."""
        amount = self.slice_usd
        # each refusal names one budget (user, tenant, key) and what it has left: at most one
        # smaller try per budget, the amount shrinking each time
        for _ in range(4):
            got = self._reserve(amount, model)
            if not isinstance(got, BudgetRefusal):
                self.refusal = None
                return got
            self.refusal = got
            if got.remaining_usd <= 0 or got.remaining_usd >= amount:
                return None
            amount = got.remaining_usd
        return None

    def close(self, model: str) -> float:
        """End the session's hold: charge it when work is unaccounted, else give it back.
        Returns what was charged here."""
        res = self.held
        self.held = None
        if res is None:
            return 0.0
        if not self.pending:
            self.ledger.release(res)
            return 0.0
        self.ledger.settle(res, res.amount_usd, 0, 0, model, self.provider)
        self.charged_usd += res.amount_usd
        self.charged_reservation = True
        return res.amount_usd


@dataclass
class SessionLimits:
    """A session's work counted against the per-minute limits HTTP requests count against.

    Each request for work a client frame makes (Realtime and Responses `response.create`, a Live
    turn: providers/realtime.py `asks_for_work`) is one request of the user's
    requests_per_minute, checked before the frame is forwarded, and holds one input and one
    output token in every token window that limits the user or the tenant (refused when a window
    is already full). Each usage frame's tokens replace that hold; a window they take past its
    limit ends the session after the frame. A response the provider starts on its own (server
    voice-activity detection, Live audio input) asked for nothing: it is counted as a request
    when its usage frame arrives, and a refusal then ends the session the same way. Every method
    is one store call (run it off-loop)."""

    limiter: RateLimiter
    user: str
    requests_per_minute: int
    tokens: TokenLimits
    tenant: str | None = None
    tenant_tokens: TokenLimits | None = None
    # what the requests counted and not yet reported hold, oldest first
    pending: list[Admission] = field(default_factory=list)

    def _token_limited(self) -> bool:
        return bool(self.tokens.active()) or bool(
            self.tenant is not None and self.tenant_tokens and self.tenant_tokens.active()
        )

    def admit(self) -> RateDecision | None:
        """Count a request for work; the refusing decision, or None: it may be forwarded."""
        decision = self.limiter.check(self.user, self.requests_per_minute)
        if not decision.allowed:
            return decision
        held = Admission(self.user)
        if self._token_limited():
            decisions = self.limiter.admit_tokens(
                held, self.tokens, 1, 1, tenant=self.tenant, tenant_limits=self.tenant_tokens
            )
            if decisions and not decisions[-1].allowed:
                return decisions[-1]
        self.pending.append(held)
        return None

    def count_usage(self, usage: Usage) -> RateDecision | None:
        """Record one usage frame; the decision that ends the session, or None."""
        refusal = None
        hold = self.pending.pop(0) if self.pending else None
        if hold is None:  # the provider started this response itself: it counts now
            decision = self.limiter.check(self.user, self.requests_per_minute)
            if not decision.allowed:
                refusal = decision
        if not self._token_limited():
            return refusal
        now_us = to_us(self.limiter.clock())
        # a zero entry admits whatever the windows hold and says how much they hold (remaining)
        record = Admission(self.user)
        windows = self.limiter.admit_tokens(
            record, self.tokens, 0, 0, tenant=self.tenant, tenant_limits=self.tenant_tokens
        )
        self.limiter.correct_tokens(record, usage.input_tokens, usage.output_tokens)
        if hold is not None:  # its one-token hold is replaced by what was used
            self.limiter.correct_tokens(hold, 0, 0)
        held = hold.estimated if hold is not None else {}
        used = {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
        }
        for d in windows:
            if used[d.kind] > d.remaining + held.get(d.kind, 0):
                # past the limit: the tokens counted now leave the window in a minute
                frees_at = now_us + WINDOW_S * US_PER_S
                return refusal or RateDecision(
                    False, d.limit, 0, WINDOW_S, frees_at, d.kind, d.scope
                )
        return refusal


class FrameRate:
    """Client frames per second of one session, over the current one-second window (what the
    provider answers is its own pace: a fast stream of deltas is never cut)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._window = -1
        self._count = 0

    def allow(self, now: float) -> bool:
        second = int(now)
        if second != self._window:
            self._window, self._count = second, 0
        self._count += 1
        return self._count <= self.limit


# A session's lease is renewed every third of this while it lives: a process that dies without
# a restart frees its users' places within it (a restart frees them at once: reconcile_leases).
SESSION_LEASE_TTL_S = 180


def session_lease_key(user: str) -> str:
    """The lease key of a user's WebSocket sessions: never a user's concurrency key (a user id)."""
    return f"\x1esession\x1f{user}"


class SessionLeases:
    """WebSocket sessions open per user across every process sharing the state store, bounded by
    governance.websocket.max_sessions_per_user: one lease per session (the store's leases, as
    max concurrent requests use), taken at the upgrade and given back when the session ends.
    Every method is one store call (run it off-loop)."""

    def __init__(
        self,
        store: RateStore,
        owner: str,
        clock: Callable[[], datetime] = utc_now,
        ttl_s: float = SESSION_LEASE_TTL_S,
    ) -> None:
        self.store = store
        self.owner = owner
        self.clock = clock
        self.ttl_us = int(ttl_s * US_PER_S)

    def acquire(self, user: str, limit: int) -> str | None:
        """A lease for one more session of `user`, or None: `limit` are open already."""
        lease = "ws_" + uuid.uuid4().hex
        taken, _ = self.store.lease_acquire(
            session_lease_key(user), lease, limit, self.owner, to_us(self.clock()), self.ttl_us
        )
        return lease if taken else None

    def renew(self, user: str, lease: str) -> bool:
        """Hold the session's place another TTL; False if it was lost (expired)."""
        return self.store.lease_renew(
            session_lease_key(user), lease, to_us(self.clock()), self.ttl_us
        )

    def release(self, user: str, lease: str) -> bool:
        return self.store.lease_release(session_lease_key(user), lease)


@dataclass
class SessionTally:
    """What one session did, for its `llm_session` audit entry and its span."""

    operation: str
    protocol: str
    started: float = field(default_factory=time.monotonic)
    models: list[str] = field(default_factory=list)  # every model the session used, in order
    model: str | None = None  # the model in force
    frames_from_client: int = 0
    frames_from_server: int = 0
    usage_frames: int = 0
    usage: Usage = field(default_factory=Usage)
    ended_by: EndReason | None = None
    end_code: str | None = None  # Candela's error code when it cut the session
    last_activity: float = field(default_factory=time.monotonic)

    def use_model(self, model: str) -> None:
        self.model = model
        if model not in self.models:
            self.models.append(model)

    def end(self, reason: EndReason, code: str | None = None) -> None:
        """The first reason wins: a cut followed by the close it causes stays a cut."""
        if self.ended_by is None:
            self.ended_by, self.end_code = reason, code

    def duration_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0


@dataclass
class Session:
    """One open WebSocket session: what it did, its budget slice (None: nothing to charge, a
    local model or no reservation), its frame rate, and whether Candela has cut it."""

    tally: SessionTally
    budget: SessionBudget | None
    rate: FrameRate
    user: str
    limits: SessionLimits | None = None  # None: nothing to count (no user settings)
    lease: str | None = None  # its place among the user's sessions (SessionLeases)
    cut: bool = False  # Candela is closing it: no frame passes any more
    ended: bool = False  # websocket_end ran: settled and audited
