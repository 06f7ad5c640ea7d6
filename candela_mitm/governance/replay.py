"""Policy replay: a candidate configuration judged against the requests the audit log recorded.

Each recorded `llm_request` a governance gate judged is passed again, in the order the requests
started, through the candidate's gates in the pipeline's order: model policy
(`ModelPolicy.check`), requests per minute, requests in flight and tokens per minute
(`RateLimiter` over an in-memory store), budgets of the user and the tenant with their periods
(`Ledger.reserve`, then `Ledger.settle` when the request ended). The rules are the live ones,
not a copy: the limiter and ledger run on `state/memory.py`, which holds and draws with the
same pure functions the SQLite store uses. A request the candidate denies holds and spends
nothing, so it does not count against the requests after it.

What the log does not say is approximated, and the report says so:
- a request's admission is judged when it started (its entry's time minus its duration) and
  settled when it ended, at its recorded cost; its token windows hold its recorded usage;
- a request the live policy refused never ran: if the candidate admits it, its cost is its
  recorded estimate (0 when a gate before the budget refused it) and its tokens are unknown (0);
- users and tenants set through the admin API are state, not configuration: judged only when
  given (`candela policy replay --state`); grants never are (their use then is not known);
- intercepted requests are judged without their workload's own model policy.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from candela_mitm.audit.actions import LLM_REQUEST
from candela_mitm.config import Config
from candela_mitm.errors import Denial, model_not_allowed
from candela_mitm.governance.ledger import BudgetRefusal, Ledger, Reservation
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.governance.policy import ModelPolicy
from candela_mitm.governance.ratelimit import WINDOW_S, Admission, RateLimiter
from candela_mitm.governance.users import TenantSettings, UserDirectory, UserSettings
from candela_mitm.providers.specs import SPECS
from candela_mitm.state.memory import MemoryStateStore
from candela_mitm.state.ports import TenantRecord, UserRecord, nano_to_usd, to_us, usd_to_nano

# The refusals a candidate policy can change; a request refused for anything else (no
# credential, a malformed body, an ungoverned endpoint...) would be refused again: not judged.
GATE_CODES = frozenset({"model_not_allowed", "rate_limited", "budget_exceeded"})
_OWNER = "replay:0"
_CACHE_MAX = 4096

Change = Literal["newly_denied", "newly_allowed"]


# -- the candidate -------------------------------------------------------------------------------


class Candidate:
    """A candidate configuration's rules: its model policy and each user's and tenant's settings,
    resolved by the live UserDirectory from the configuration, and from the users and tenants
    the admin API set when they are given (their records win over the configuration, as live)."""

    def __init__(
        self,
        config: Config,
        source: str = "",
        users: Iterable[UserRecord] = (),
        tenants: Iterable[TenantRecord] = (),
    ) -> None:
        self.config = config
        self.source = source
        g = config.governance
        self.policy = ModelPolicy(g.models, g.workloads)
        records = MemoryStateStore()
        for user in users:
            records.put_user(user)
        for tenant in tenants:
            records.put_tenant(tenant)
        self._directory = UserDirectory(config, records)
        self._users: dict[str, UserSettings] = {}
        self._tenants: dict[str, TenantSettings] = {}

    def user(self, user: str) -> UserSettings:
        s = self._users.get(user)
        if s is None:
            if len(self._users) >= _CACHE_MAX:
                self._users.clear()
            s = self._users[user] = self._directory.settings(user)
        return s

    def tenant(self, tenant: str) -> TenantSettings:
        t = self._tenants.get(tenant)
        if t is None:
            if len(self._tenants) >= _CACHE_MAX:
                self._tenants.clear()
            t = self._tenants[tenant] = self._directory.tenant_settings(tenant)
        return t

    def model_denial(
        self, model: str, tenant: str | None, workload: int | None = None
    ) -> Denial | None:
        d = self.policy.check(model, tenant, workload)
        return None if d.allowed else model_not_allowed(d.model, tenant, d.policy_mode)

    def periods(self) -> set[BudgetPeriod]:
        """Every budget period the candidate uses (for the replay's warm-up)."""
        g = self.config.governance
        kinds = {g.budgets.period}
        kinds |= {u.budget_period for u in self.config.users.values() if u.budget_period}
        kinds |= {t.period for t in g.tenants.values() if t.period}
        return {BudgetPeriod(k, g.budgets.time_zone) for k in kinds}

    def warmup_start(self, since: datetime) -> datetime:
        """Where a replay reporting from `since` starts reading: the start of the earliest budget
        period holding `since` (its spend counts against the budgets), less one rate window."""
        start = min(p.starts_at(since) for p in self.periods())
        return start - timedelta(seconds=WINDOW_S)


# -- verdicts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A gate's answer: allowed, or denied with the code (and what refused) the client gets."""

    decision: Literal["allowed", "denied"]
    code: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)  # scope, limit_kind, period, policy

    @classmethod
    def of(cls, denial: Denial | None) -> Verdict:
        if denial is None:
            return ALLOWED
        keep = ("scope", "limit_kind", "period", "policy")
        return cls("denied", denial.error, {k: denial.fields[k] for k in keep if k in denial.fields})

    def to_json(self) -> dict[str, Any]:
        return {"decision": self.decision, "code": self.code, **self.detail}

    def describe(self) -> str:
        if self.code is None:
            return self.decision
        extra = ",".join(str(v) for v in self.detail.values() if v is not None)
        return f"{self.decision} {self.code}" + (f" ({extra})" if extra else "")


ALLOWED = Verdict("allowed")


# -- the recorded requests -----------------------------------------------------------------------


def _moment(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def iso(moment: datetime) -> str:
    """UTC, to the millisecond, with a Z: how the report names a moment."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


@dataclass(frozen=True)
class Recorded:
    """One `llm_request` entry, as the replay needs it."""

    seq: int
    started: datetime
    ended: datetime
    user: str
    tenant: str | None
    model: str | None
    provider: str
    verdict: Verdict  # what the live policy decided
    input_tokens: int
    output_tokens: int
    cost_usd: float
    estimate_usd: float
    shadow: Mapping[str, Any] | None = None  # the shadow verdict recorded live, if any

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Recorded | None:
        """None for an entry no gate judged: another action, no user, no route plan, or a
        refusal a policy cannot change."""
        if entry.get("action") != LLM_REQUEST:
            return None
        f = entry.get("fields") or {}
        user = entry.get("user_id") or f.get("user_id")
        if not user or not f.get("provider"):
            return None
        decision, reason = f.get("decision"), f.get("reason")
        if decision == "denied":
            if reason not in GATE_CODES:
                return None
            verdict = Verdict("denied", str(reason))
        else:  # allowed, or an error after the gates admitted it (upstream, crash)
            verdict = ALLOWED
        ended = _moment(entry["ts"])
        if f.get("started_at"):  # settled after a crash: its start is recorded
            started = _moment(f["started_at"])
        else:
            started = ended - timedelta(milliseconds=max(0.0, _num(f.get("duration_ms"))))
        tenant = entry.get("tenant_id") or f.get("tenant_id")
        return cls(
            seq=int(entry.get("seq") or 0),
            started=min(started, ended),
            ended=ended,
            user=str(user),
            tenant=str(tenant) if tenant else None,
            model=str(f["model"]) if f.get("model") else None,
            provider=str(f["provider"]),
            verdict=verdict,
            input_tokens=max(0, int(_num(f.get("input_tokens")))),
            output_tokens=max(0, int(_num(f.get("output_tokens")))),
            cost_usd=max(0.0, _num(f.get("cost_usd"))),
            estimate_usd=max(0.0, _num(f.get("estimate_usd"))),
            shadow=f.get("shadow") if isinstance(f.get("shadow"), dict) else None,
        )


@dataclass(frozen=True)
class Judged:
    request: Recorded
    verdict: Verdict  # the candidate's
    reported: bool  # False for a warm-up request (before --since): counted, not reported

    @property
    def change(self) -> Change | None:
        live = self.request.verdict.decision
        if live == "allowed" and self.verdict.decision == "denied":
            return "newly_denied"
        if live == "denied" and self.verdict.decision == "allowed":
            return "newly_allowed"
        return None

    def to_json(self) -> dict[str, Any]:
        r = self.request
        return {
            "seq": r.seq,
            "started_at": iso(r.started),
            "user_id": r.user,
            "tenant_id": r.tenant,
            "model": r.model,
            "provider": r.provider,
            "recorded": r.verdict.to_json(),
            "candidate": self.verdict.to_json(),
            "change": self.change,
            "cost_usd": r.cost_usd,
            "estimate_usd": r.estimate_usd,
        }


# -- the report ----------------------------------------------------------------------------------


@dataclass
class ScopeRow:
    """What changes for one user acting for one tenant (None: no tenant)."""

    user: str
    tenant: str | None
    judged: int = 0
    newly_denied: int = 0
    newly_allowed: int = 0
    recorded_spend_nano: int = 0
    avoided_nano: int = 0  # the recorded cost of the requests newly denied
    added_nano: int = 0  # the recorded estimate of the requests newly allowed

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user,
            "tenant_id": self.tenant,
            "judged": self.judged,
            "newly_denied": self.newly_denied,
            "newly_allowed": self.newly_allowed,
            "recorded_spend_usd": nano_to_usd(self.recorded_spend_nano),
            "spend_avoided_usd": nano_to_usd(self.avoided_nano),
            "estimated_spend_added_usd": nano_to_usd(self.added_nano),
        }


@dataclass
class ReplayReport:
    candidate: str
    since: datetime | None
    judged: list[Judged]  # the reported ones, in the order they started
    warmup: int  # requests replayed before `since` only to fill the counters

    @property
    def changes(self) -> list[Judged]:
        return [j for j in self.judged if j.change is not None]

    def rows(self) -> list[ScopeRow]:
        rows: dict[tuple[str, str | None], ScopeRow] = {}
        for j in self.judged:
            r = j.request
            row = rows.setdefault((r.user, r.tenant), ScopeRow(r.user, r.tenant))
            row.judged += 1
            if r.verdict.decision == "allowed":
                row.recorded_spend_nano += usd_to_nano(r.cost_usd)
            if j.change == "newly_denied":
                row.newly_denied += 1
                row.avoided_nano += usd_to_nano(r.cost_usd)
            elif j.change == "newly_allowed":
                row.newly_allowed += 1
                row.added_nano += usd_to_nano(r.estimate_usd)
        return sorted(rows.values(), key=lambda s: (s.user, s.tenant or ""))

    def totals(self) -> ScopeRow:
        total = ScopeRow("*", None)
        for row in self.rows():
            total.judged += row.judged
            total.newly_denied += row.newly_denied
            total.newly_allowed += row.newly_allowed
            total.recorded_spend_nano += row.recorded_spend_nano
            total.avoided_nano += row.avoided_nano
            total.added_nano += row.added_nano
        return total

    def to_json(self) -> dict[str, Any]:
        totals = self.totals().to_json()
        del totals["user_id"], totals["tenant_id"]
        first = self.judged[0].request.started if self.judged else None
        last = self.judged[-1].request.started if self.judged else None
        return {
            "candidate": self.candidate,
            "since": iso(self.since) if self.since else None,
            "first_request_at": iso(first) if first else None,
            "last_request_at": iso(last) if last else None,
            "warmup_requests": self.warmup,
            "totals": totals,
            "scopes": [row.to_json() for row in self.rows()],
            "changes": [j.to_json() for j in self.changes],
        }


# -- the replay ----------------------------------------------------------------------------------


@dataclass
class _InFlight:
    request: Recorded
    reservation: Reservation | None
    admission: Admission
    cost_usd: float
    usage: tuple[int, int] | None


class Replay:
    """One pass of a candidate over recorded requests, on a fresh in-memory store."""

    def __init__(self, candidate: Candidate) -> None:
        self.candidate = candidate
        self._now = datetime.fromtimestamp(0, UTC)
        self.store = MemoryStateStore()
        self.ledger = Ledger(self.store, clock=self._clock, owner=_OWNER)
        self.limiter = RateLimiter(self.store, clock=self._clock)

    def _clock(self) -> datetime:
        return self._now

    def run(
        self,
        requests: Iterable[Recorded],
        since: datetime | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ReplayReport:
        """Judge every request (sorted by start); report those that started at or after
        `since`. `progress(done, total)` is called now and then."""
        ordered = sorted(requests, key=lambda r: (r.started, r.seq))
        ending: list[tuple[datetime, int, int, _InFlight]] = []
        tie = itertools.count()
        judged: list[Judged] = []
        warmup = 0
        for done, r in enumerate(ordered):
            while ending and ending[0][0] <= r.started:
                self._finish(heapq.heappop(ending)[3])
            verdict, flight = self._admit(r)
            if flight is not None:
                heapq.heappush(ending, (r.ended, r.seq, next(tie), flight))
            reported = since is None or r.started >= since
            if reported:
                judged.append(Judged(r, verdict, True))
            else:
                warmup += 1
            if done % 10_000 == 0:
                # settled reservations are never settled again here: keep memory flat
                self.store.purge_finished(to_us(r.started))
                if progress is not None:
                    progress(done, len(ordered))
        while ending:
            self._finish(heapq.heappop(ending)[3])
        if progress is not None:
            progress(len(ordered), len(ordered))
        return ReplayReport(self.candidate.source, since, judged, warmup)

    def _admit(self, r: Recorded) -> tuple[Verdict, _InFlight | None]:
        """The candidate's gates in pipeline order; what an admitted request holds."""
        self._now = r.started
        c = self.candidate
        if r.model:
            denial = c.model_denial(r.model, r.tenant)
            if denial is not None:
                return Verdict.of(denial), None
        s = c.user(r.user)
        tenant = c.tenant(r.tenant) if r.tenant else None
        limiter = self.limiter
        decision = limiter.check(s.user_id, s.requests_per_minute)
        if not decision.allowed:
            return Verdict.of(decision.denial()), None
        admission = Admission(s.user_id)
        if s.max_concurrent_requests is not None:
            decision = limiter.acquire(admission, s.max_concurrent_requests, _OWNER)
            if not decision.allowed:
                return Verdict.of(decision.denial()), None
        ran = r.verdict.decision == "allowed"
        tokens = (r.input_tokens, r.output_tokens) if ran else (0, 0)
        if r.model:
            decisions = limiter.admit_tokens(
                admission,
                s.token_limits,
                *tokens,
                tenant=r.tenant,
                tenant_limits=tenant.token_limits if tenant else None,
            )
            if decisions and not decisions[-1].allowed:
                limiter.release(admission)
                return Verdict.of(decisions[-1].denial()), None
        reservation: Reservation | None = None
        spec = SPECS.get(r.provider)
        if spec is None or not spec.local:  # local models are never blocked by budget
            amount = r.estimate_usd if r.estimate_usd > 0 or not ran else r.cost_usd
            reserved = self.ledger.reserve(
                s.user_id,
                r.tenant,
                amount,
                s.daily_budget_usd,
                str(r.seq),
                model=r.model or "",
                provider=r.provider,
                period=s.budget_period,
                tenant_budget_usd=tenant.budget_usd if tenant else None,
                tenant_period=tenant.period if tenant else s.budget_period,
            )
            if isinstance(reserved, BudgetRefusal):
                limiter.finish(admission, (0, 0))  # as live: the refused request used nothing
                return Verdict.of(reserved.denial()), None
            reservation = reserved
        # a request that never ran is charged what it may have cost: its estimate
        cost = r.cost_usd if ran else (reservation.amount_usd if reservation else 0.0)
        return ALLOWED, _InFlight(r, reservation, admission, cost, tokens)

    def _finish(self, flight: _InFlight) -> None:
        r = flight.request
        self._now = r.ended
        self.limiter.finish(flight.admission, flight.usage)
        if flight.reservation is not None:
            self.ledger.settle(
                flight.reservation,
                flight.cost_usd,
                r.input_tokens,
                r.output_tokens,
                r.model or "",
                r.provider,
            )


def replay(
    candidate: Candidate,
    entries: Iterable[Mapping[str, Any]],
    since: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """Judge the candidate over audit entries (every action; only judged requests count)."""
    requests = (r for e in entries if (r := Recorded.from_entry(e)) is not None)
    return Replay(candidate).run(requests, since, progress)
