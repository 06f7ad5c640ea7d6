"""Sessions: a WebSocket session's budget slice, its bounds, and what it did (for its audit entry).

A session has no upper bound known in advance, so it holds a slice of the user's budget at a
time (`governance.websocket.reserve_usd`, reserved at the upgrade like any request's estimate):
each usage frame settles its cost on the ledger and holds a new slice from what is left; when no
slice can be held the budget is exhausted and the session is cut. A session that ends while work
is unaccounted (a client frame that asked for work was forwarded and no usage frame followed it:
the client left, the upstream cut, the proxy restarted) is charged the slice it holds, as an HTTP
request without usage is charged its reservation. One whose every frame was refused, or that
forwarded none, never reached a model and gives its slice back.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from candela_mitm.governance.ledger import BudgetRefusal, KeyBudget, Ledger, Reservation
from candela_mitm.governance.periods import DAILY_UTC, BudgetPeriod
from candela_mitm.providers.usage import Usage

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
    # as the first slice was judged: the user's period, and the API key's own budget (a session
    # opened with a budgeted key tops up within it too)
    period: BudgetPeriod = field(default=DAILY_UTC, init=False)
    key_budget: KeyBudget | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.held is not None:
            self.period, self.key_budget = self.held.period, self.held.key_budget

    def settle(self, cost_usd: float, usage: Usage, model: str) -> bool:
        """Settle one usage frame's cost and hold a new slice. False: the budget is exhausted
        (nothing more is held, the session must end)."""
        res = self.held
        self.held = None
        if res is None:  # cut already, a late usage frame: recorded all the same
            got = self.ledger.reserve(
                self.user, self.tenant, 0.0, self.daily_budget_usd, self.request_id,
                model=model, provider=self.provider, period=self.period,
                key_budget=self.key_budget,
            )
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
        """A new slice, or what is left of the budget when less than a slice is; None if nothing is."""
        amount = self.slice_usd
        for _ in range(2):
            got = self.ledger.reserve(
                self.user, self.tenant, amount, self.daily_budget_usd, self.request_id,
                model=model, provider=self.provider, period=self.period,
                key_budget=self.key_budget,
            )
            if not isinstance(got, BudgetRefusal):
                return got
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


class OpenSessions:
    """Sessions open per user in this process, bounded by governance.websocket.max_sessions_per_user."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = defaultdict(int)

    def acquire(self, user: str, limit: int) -> bool:
        with self._lock:
            if self._open[user] >= limit:
                return False
            self._open[user] += 1
            return True

    def add(self, user: str) -> None:
        """Count a session admitted earlier (at its upgrade, by `count`)."""
        with self._lock:
            self._open[user] += 1

    def release(self, user: str) -> None:
        with self._lock:
            if self._open.get(user, 0) > 0:
                self._open[user] -= 1
                if self._open[user] == 0:
                    del self._open[user]

    def count(self, user: str) -> int:
        with self._lock:
            return self._open.get(user, 0)

    def total(self) -> int:
        with self._lock:
            return sum(self._open.values())


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
    cut: bool = False  # Candela is closing it: no frame passes any more
    ended: bool = False  # websocket_end ran: settled and audited
