"""Shadow policy: a candidate configuration judged live beside the real one, never enforced.

`governance.shadow: candidate.yaml` names it. On each request the candidate's model policy is
asked (`ModelPolicy.check`, a pure function), and where the live budget gate reserved (or
refused), the candidate's budgets of the user and the tenant are judged on the very counters the
store decided on (`Reservation.seen`) with the store's own fit rules (`plan_holds`,
`tenant_admits`): no store read or write of its own, nothing reserved. Its verdict goes into the
request's audit entry (`shadow`) and `candela_shadow_decisions_total{decision}`. A failure of the
shadow is logged and recorded as `error`: it never touches the live decision.

What it cannot judge it leaves out and says so (`judged` lists what it judged): a budget whose
period is not the live one (the counters are another period's), a tenant budget when the live
user budget refused first (the store did not read the tenant's counters), any budget of a request
the live policy refused before its budget gate, and rate limits (their windows are read only by
the live limiter's own step). The live counters hold what the live policy let through: after the
candidate's first refusal its verdicts can be stricter than a replay's (`candela policy replay`
counts only what the candidate admits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from candela_mitm.config import Config, load_shadow_candidate
from candela_mitm.context import RequestContext
from candela_mitm.governance.ledger import BudgetRefusal, Reservation
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.governance.replay import ALLOWED, Candidate, Verdict
from candela_mitm.state.ports import ReserveResult, plan_holds, tenant_admits, usd_to_nano

log = logging.getLogger("candela.shadow")


@dataclass
class ShadowVerdicts:
    """What the shadow decided for one request, gate by gate (None: not judged)."""

    model: Verdict | None = None
    budget: Verdict | None = None
    error: bool = False

    @property
    def decision(self) -> str:
        if self.error:
            return "error"
        return self.verdict.decision

    @property
    def verdict(self) -> Verdict:
        """The first refusal in pipeline order, else allowed."""
        for v in (self.model, self.budget):
            if v is not None and v.decision == "denied":
                return v
        return ALLOWED

    def to_json(self) -> dict[str, Any]:
        if self.error:
            return {"decision": "error", "code": None}
        judged = [
            name for name, v in (("model_policy", self.model), ("budget", self.budget))
            if v is not None
        ]
        return {**self.verdict.to_json(), "judged": judged}


class Shadow:
    """The candidate behind `governance.shadow`, and the judgements made with it."""

    def __init__(self, candidate: Candidate) -> None:
        self.candidate = candidate

    @classmethod
    def from_config(cls, config: Config) -> Shadow | None:
        """The shadow a configuration names (its path made absolute by load_config, else taken
        from the working directory); ConfigError if it cannot be read or is not valid."""
        path = config.governance.shadow
        if path is None:
            return None
        return cls(Candidate(load_shadow_candidate(path), path))

    def judge_model(
        self, verdicts: ShadowVerdicts, model: str, tenant: str | None, workload: int | None
    ) -> None:
        try:
            verdicts.model = Verdict.of(self.candidate.model_denial(model, tenant, workload))
        except Exception:
            log.exception("the shadow policy could not judge model %r", model[:200])
            verdicts.error = True

    def judge_budget(
        self,
        verdicts: ShadowVerdicts,
        user: str,
        tenant: str | None,
        amount_usd: float,
        seen: ReserveResult | None,
        period: BudgetPeriod,
        tenant_period: BudgetPeriod | None,
    ) -> None:
        """Judge the candidate's budgets on the counters the live reserve saw (`seen`), for the
        live user `period` and `tenant_period`."""
        try:
            verdicts.budget = budget_verdict(
                self.candidate, user, tenant, amount_usd, seen, period, tenant_period
            )
        except Exception:
            log.exception("the shadow policy could not judge the budget of %s", user)
            verdicts.error = True


def budget_verdict(
    candidate: Candidate,
    user: str,
    tenant: str | None,
    amount_usd: float,
    seen: ReserveResult | None,
    period: BudgetPeriod,
    tenant_period: BudgetPeriod | None,
) -> Verdict | None:
    """The candidate's budget verdict on the live counters; None when they cannot decide it."""
    if seen is None:
        return None
    s = candidate.user(user)
    if s.budget_period != period:
        return None  # the counters are of another period (kind or zone) than the candidate's
    amount = usd_to_nano(amount_usd)
    daily_free = usd_to_nano(s.daily_budget_usd) - (seen.spent - seen.from_grants) - seen.reserved
    if plan_holds(amount, daily_free, [("grants", seen.grants_free)]) is None:
        return Verdict(
            "denied", "budget_exceeded", {"scope": "user", "period": s.budget_period.kind}
        )
    if tenant is None:
        return ALLOWED
    t = candidate.tenant(tenant)
    if t.budget_usd is None:
        return ALLOWED
    if tenant_period is None or t.period != tenant_period:
        return None
    if not seen.ok and seen.scope == "user":
        return None  # the live user budget refused first: the tenant's row was not read
    if not tenant_admits(amount, usd_to_nano(t.budget_usd), seen.tenant_spent, seen.tenant_reserved):
        return Verdict("denied", "budget_exceeded", {"scope": "tenant", "period": t.period.kind})
    return ALLOWED


# -- the addons' one line each ------------------------------------------------------------------


def shadow_model(shadow: Shadow | None, c: RequestContext) -> None:
    """ModelPolicy: the candidate's verdict on the planned request's model (pure, no I/O)."""
    if shadow is None or c.plan is None or not c.plan.model:
        return
    if c.shadow is None:
        c.shadow = ShadowVerdicts()
    shadow.judge_model(c.shadow, c.plan.model, c.tenant, c.workload_rule)  # never raises


def shadow_budget(
    shadow: Shadow | None,
    c: RequestContext,
    amount_usd: float,
    result: Reservation | BudgetRefusal,
    period: BudgetPeriod,
    tenant_period: BudgetPeriod | None,
) -> None:
    """Budget: the candidate's budget verdict on the counters the live reserve decided on."""
    if shadow is None or c.settings is None:
        return
    if c.shadow is None:
        c.shadow = ShadowVerdicts()
    shadow.judge_budget(  # never raises: a failure is recorded as the shadow's error
        c.shadow, c.settings.user_id, c.tenant, amount_usd, result.seen, period, tenant_period
    )
