"""Budget alerts: which thresholds of a budget its spend has reached, claimed once per period.

Utilisation is the period's *settled* spend over the budget's amount. Reservations are left
out on purpose: a reservation is the most a request can cost (output at its maximum), most are
settled far below it, and an alert raised on held money would announce spend that never
happens. Settlement is where spend becomes real, so it is where a crossing is looked for (by
a thread, after the settle's transaction committed: observability/alerts.py). A user's grants
are not in the amount: 100% says the period's own allowance is used up. An API key with a
budget of its own (a part of its user's, per the user's period) is a third budget: its row is
shared by every key of one rotation chain, so its claims are made on that row (a rotated key
does not announce again what its predecessor announced), and an alert names the key that spent.

Each (scope, id, period, threshold) is sent at most once, whichever process sees it first: the
claim is a unique row (SQLite) or a SET NX key (Redis) in the state store (`claim_alert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from candela_mitm.governance.ledger import Reservation
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.state.ports import (
    AlertStore,
    LedgerStore,
    nano_to_usd,
    rfc3339,
    to_us,
    usd_to_nano,
)

Scope = Literal["user", "tenant", "key"]

# A claim outlives its period by this much: a request reserved in a period and settled after
# it ended (a long stream, or at the next start after a crash) lands on that period's row, and
# must still find the claim.
CLAIM_GRACE_S = 7 * 24 * 3600

# Marks this process knows are claimed (by itself or another), so that each settlement does not
# go back to the store for thresholds long passed. Past this many they are forgotten (a later
# claim of one is refused by the store: nothing is sent twice).
KNOWN_CLAIMS_MAX = 65_536


@dataclass(frozen=True)
class Watch:
    """A budget to look at after a settlement on it."""

    scope: Scope
    scope_id: str  # the user id, the tenant id, or the API key's public id (k_...)
    budget_usd: float  # per period
    period: BudgetPeriod
    at: datetime  # a moment in the period (the reservation's)
    tenant: str | None  # the tenant the spend was for (a tenant scope: itself)
    user_id: str | None = None  # whose spend it was (a tenant scope: None)
    budget_id: str = ""  # a key scope: its budget row (the rotation chain's); else scope_id

    @property
    def row(self) -> str:
        """The id of the budget row read and claimed on."""
        return self.budget_id or self.scope_id

    @property
    def period_key(self) -> str:
        return self.period.key(self.at)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.scope, self.row, self.period_key)


def watches(res: Reservation) -> list[Watch]:
    """The budgets a settled reservation spent on: its user's, its tenant's if it has one, and
    its API key's if the key has a budget of its own."""
    out = [
        Watch(
            "user", res.user_id, res.budget_usd, res.period, res.created_at, res.tenant,
            res.user_id,
        )
    ]
    if res.tenant and res.tenant_budget_usd is not None:
        out.append(
            Watch(
                "tenant", res.tenant, res.tenant_budget_usd, res.tenant_period, res.created_at,
                res.tenant,
            )
        )
    kb = res.key_budget
    if kb is not None:
        out.append(
            Watch(
                "key", kb.key_id, kb.budget_usd, res.period, res.created_at, res.tenant,
                res.user_id, kb.budget_id,
            )
        )
    return out


def reached(spent: int, budget: int, thresholds: Sequence[int]) -> list[int]:
    """The thresholds (percent, ascending) that `spent` has reached of `budget` (nano-dollars),
    exactly: spent * 100 >= budget * threshold. A budget of 0 (nothing may be spent) has none."""
    if budget <= 0:
        return []
    return sorted(t for t in set(thresholds) if spent * 100 >= budget * t)


@dataclass(frozen=True)
class BudgetAlert:
    """One threshold of one budget reached in one period: what a webhook is told."""

    scope: Scope
    scope_id: str
    tenant: str | None
    period: str  # daily, weekly, monthly
    period_key: str  # the store's name for the period (the dedupe key's part)
    period_start: datetime
    resets_at: datetime
    threshold: int
    spent_usd: float
    budget_usd: float
    user_id: str | None = None  # whose budget (user scope) or key (key scope) it is

    def to_json(self) -> dict[str, Any]:
        """The generic webhook body (format: json)."""
        return {
            "type": "budget_threshold",
            "scope": self.scope,
            "id": self.scope_id,
            "user_id": self.user_id,
            "tenant": self.tenant,
            "period": self.period,
            "period_start": rfc3339(self.period_start),
            "threshold": self.threshold,
            "spent_usd": round(self.spent_usd, 9),
            "budget_usd": round(self.budget_usd, 9),
            "utilization": round(self.spent_usd / self.budget_usd, 6) if self.budget_usd else None,
            "resets_at": rfc3339(self.resets_at),
        }

    def text(self) -> str:
        if self.scope == "key":
            who = f"API key {self.scope_id} of user {self.user_id}"
        else:
            who = f"User {self.scope_id}" if self.scope == "user" else f"Tenant {self.scope_id}"
        return (
            f"{who} has used {self.threshold}% of its {self.period} budget: "
            f"${self.spent_usd:.2f} of ${self.budget_usd:.2f} "
            f"(period from {rfc3339(self.period_start)}, resets {rfc3339(self.resets_at)})"
        )

    def slack(self) -> dict[str, Any]:
        """A Slack incoming webhook's message: `text` (the notification) and `blocks`."""
        fields = [
            ("Scope", f"{self.scope} `{self.scope_id}`"),
            ("Threshold", f"{self.threshold}%"),
            ("Spent", f"${self.spent_usd:.4f} of ${self.budget_usd:.4f}"),
            ("Period", f"{self.period} from {rfc3339(self.period_start)}"),
            ("Resets", rfc3339(self.resets_at)),
        ]
        if self.tenant and self.scope != "tenant":
            fields.insert(1, ("Tenant", f"`{self.tenant}`"))
        if self.scope == "key":
            fields.insert(1, ("User", f"`{self.user_id}`"))
        return {
            "text": self.text(),
            "blocks": [
                {
                    "type": "header",
                    "text": {
                        "type": "plain_text",
                        "text": f"Budget {self.threshold}% reached: {self.scope_id}"[:150],
                    },
                },
                {"type": "section", "text": {"type": "mrkdwn", "text": self.text()}},
                {
                    "type": "section",
                    "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in fields],
                },
            ],
        }


@dataclass(frozen=True)
class Observed:
    """What one look at a budget found: its utilisation and the alerts this process claimed."""

    utilization: float | None  # spent / budget; None without a budget
    alerts: tuple[BudgetAlert, ...]


class AlertRuleStore(LedgerStore, AlertStore, Protocol):
    """What the rule needs: the budget rows it reads (LedgerStore) and the claims it makes."""


class AlertRule:
    """Reads a watched budget's period row and claims, in the store, each threshold its spend
    has reached that nobody claimed before. Blocking (store calls): run it off the event loop."""

    def __init__(self, store: AlertRuleStore) -> None:
        self.store = store
        self._known: set[tuple[str, str, str, int]] = set()

    def observe(
        self, watch: Watch, thresholds: Sequence[int], now: datetime, claim: bool = True
    ) -> Observed:
        """`claim` False: only measure (no webhook to tell)."""
        key = watch.period_key
        if watch.scope == "user":
            spent = self.store.day_totals(watch.scope_id, key).spent
        elif watch.scope == "key":
            spent = self.store.key_totals(watch.row, key).spent
        else:
            spent = self.store.tenant_totals(watch.scope_id, key).spent
        budget = usd_to_nano(watch.budget_usd)
        utilization = spent / budget if budget > 0 else None
        if not claim:
            return Observed(utilization, ())
        resets_at = watch.period.resets_at(watch.at)
        expires_us = to_us(resets_at + timedelta(seconds=CLAIM_GRACE_S))
        now_us = to_us(now)
        alerts: list[BudgetAlert] = []
        for threshold in reached(spent, budget, thresholds):
            mark = (watch.scope, watch.row, key, threshold)
            if mark in self._known:
                continue
            won = self.store.claim_alert(watch.scope, watch.row, key, threshold, now_us, expires_us)
            if len(self._known) >= KNOWN_CLAIMS_MAX:
                self._known.clear()
            self._known.add(mark)
            if won:
                alerts.append(
                    BudgetAlert(
                        scope=watch.scope,
                        scope_id=watch.scope_id,
                        tenant=watch.tenant,
                        period=watch.period.kind,
                        period_key=key,
                        period_start=watch.period.starts_at(watch.at),
                        resets_at=resets_at,
                        threshold=threshold,
                        spent_usd=nano_to_usd(spent),
                        budget_usd=watch.budget_usd,
                        user_id=watch.user_id,
                    )
                )
        return Observed(utilization, tuple(alerts))


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """The wait after failed attempt number `attempt` (1 first): doubling, capped."""
    return float(min(max_s, initial_s * 2 ** min(attempt - 1, 32)))

