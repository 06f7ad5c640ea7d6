"""Admission: what a request holds before it leaves (its budget hold and token estimate), and the
rate steps with the budget reservation as one store call."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from candela_mitm.governance.estimate import (
    BodyScan,
    estimate_batch_cost,
    estimate_cost,
    output_tokens_limit,
    scan,
)
from candela_mitm.governance.ledger import (
    BudgetRefusal,
    KeyBudget,
    Ledger,
    Reservation,
    ReserveAsk,
)
from candela_mitm.governance.periods import DAILY_UTC
from candela_mitm.governance.ratelimit import Admission, RateDecision, RateLimiter, TokenLimits
from candela_mitm.governance.shadow import Shadow, shadow_budget
from candela_mitm.state.ports import (
    AdmissionStore,
    LoopAdmissionStore,
    RateHit,
    ReserveResult,
    to_us,
)

if TYPE_CHECKING:
    from candela_mitm.config import Governance
    from candela_mitm.context import RequestContext
    from candela_mitm.governance.identity import KeyScope
    from candela_mitm.governance.slices import SliceKey, Slices
    from candela_mitm.governance.users import TenantSettings, UserSettings
    from candela_mitm.providers.forwarding import ForwardPlan
    from candela_mitm.providers.pricing import PricingTable

log = logging.getLogger("candela.admission")


@dataclass(frozen=True)
class Hold:
    """What a request reserves on its budget before it is forwarded, and under what."""

    estimate_usd: float
    model: str
    provider: str


@dataclass(frozen=True)
class PriceUnknown:
    """A metered request for a model without a price, under `unknown_model_price: deny`."""

    model: str


@dataclass(frozen=True)
class Rules:
    """The configuration the rule reads (governance.budgets, unknown_model_price, websocket)."""

    default_max_output_tokens: int
    unknown_model_price: Literal["deny", "zero"]
    session_reserve_usd: float

    @classmethod
    def of(cls, governance: Governance) -> Rules:
        return cls(
            governance.budgets.default_max_output_tokens,
            governance.unknown_model_price,
            governance.websocket.reserve_usd,
        )


_last_rules: tuple[Governance, Rules] | None = None


def rules_for(governance: Governance) -> Rules:
    """`Rules.of(governance)`, made once per configuration: a reload brings a new Governance
    object (the config is frozen), hence new Rules. (Per request it read three nested models.)"""
    global _last_rules
    last = _last_rules
    if last is not None and last[0] is governance:
        return last[1]
    rules = Rules.of(governance)
    _last_rules = (governance, rules)
    return rules


def body_scan(body: dict[str, Any] | None, found: BodyScan | None) -> BodyScan:
    """The body's one scan: the one made off the loop for a large body, else made here."""
    if found is not None:
        return found
    return scan(body) if body else BodyScan()


def budget_hold(
    plan: ForwardPlan | None,
    pricing: PricingTable,
    rules: Rules,
    body: dict[str, Any] | None,
    found: BodyScan | None,
    job_input: dict[str, Any] | None = None,
) -> Hold | PriceUnknown | None:
    """What a request reserves: None when it holds nothing (a local model, a free or allowed
    read, an unpriced model under `unknown_model_price: zero`). The one home of this rule:
    RateLimit reserves it in its store trip and Budget judges it (or reserves it itself when
    RateLimit did not)."""
    if plan is None or plan.upstream.spec.local:
        return None  # local models cost nothing and are never blocked by budget
    provider = plan.upstream.name
    if plan.session:
        return Hold(rules.session_reserve_usd, plan.model or "", provider)  # the first slice
    if not plan.model or not plan.metered:
        return None
    price = pricing.get(plan.model, provider)
    if price is None:
        return PriceUnknown(plan.model) if rules.unknown_model_price == "deny" else None
    default_max = rules.default_max_output_tokens
    if plan.operation.model == "file" and job_input is not None:
        # an OpenAI batch: the most its input file's requests cost, read at the upload
        return Hold(float(job_input["estimate_usd"]), plan.model, provider)
    if plan.batch is not None:
        # a batch: the sum over its requests, each at its model's batch price where one is
        # known; a request whose model has no price costs nothing under unknown_model_price:
        # zero (under deny, addons/jobs.py refused the batch)
        priced = [(m, p) for m, p in plan.batch if pricing.get(m, provider) is not None]
        estimate = estimate_batch_cost(priced, default_max, lambda m: pricing.get(m, provider))
        return Hold(estimate, plan.model, provider)
    estimate = estimate_cost(body, plan.max_output_tokens, default_max, price, found)
    return Hold(estimate, plan.model, provider)


def decide_hold(
    c: RequestContext, pricing: PricingTable, rules: Rules, found: BodyScan | None
) -> Hold | PriceUnknown | None:
    """The request's hold, decided once and kept on its context (`c.hold`) by whichever of
    RateLimit and Budget comes first; `found`: the body's scan when made already."""
    c.hold = budget_hold(c.plan, pricing, rules, c.body, found, c.job_input)
    c.hold_decided = True
    return c.hold


def token_estimate(
    plan: ForwardPlan | None,
    pricing: PricingTable,
    rules: Rules,
    body: dict[str, Any] | None,
    found: BodyScan | None,
) -> tuple[int, int] | None:
    """(input, output) tokens a request may use, for token limits; None: not an inference call."""
    if plan is not None and plan.session:
        # a WebSocket upgrade asks for no work: it holds a token of each kind until its 101
        # (refused when a window is already full); its frames count (governance/sessions.py)
        return 1, 1
    if plan is None or not plan.model:
        return None
    found = body_scan(body, found)
    default_max = rules.default_max_output_tokens
    price = pricing.get(plan.model)
    if price is not None:
        out = output_tokens_limit(plan.max_output_tokens, default_max, price)
    else:
        out = plan.max_output_tokens if plan.max_output_tokens is not None else default_max
    return found.input_tokens(), max(0, out)


def carve(
    slices: Slices | None,
    plan: ForwardPlan | None,
    hold: Hold | PriceUnknown | None,
    settings: UserSettings,
    tenant: str | None,
    recent_tenant: Callable[[str], TenantSettings | None],
    request_id: str,
    key: KeyScope | None = None,
    shadow: Shadow | None = None,
) -> Reservation | None:
    """The request's hold carved from this process's budget slice in memory (no store call;
    governance/slices.py), or None: it reserves on its own. Only a plain request is carved:
    not a WebSocket session's, a batch's, a job's or an upload's hold (their reservations are
    the store's rows jobs and sessions are recorded under), and none while a shadow policy
    judges budgets on the store's counters; nor when the tenant's settings are not at hand
    without a store read."""
    if slices is None or not slices.rules.enabled or not isinstance(hold, Hold):
        return None  # (off: nothing computed, the request path as it was)
    k = slice_key(slices, plan, settings, tenant, recent_tenant, key, shadow)
    return None if k is None else slices.carve(k, hold.estimate_usd, request_id)


def slice_key(
    slices: Slices,
    plan: ForwardPlan | None,
    settings: UserSettings,
    tenant: str | None,
    recent_tenant: Callable[[str], TenantSettings | None],
    key: KeyScope | None = None,
    shadow: Shadow | None = None,
) -> SliceKey | None:
    """The budgets a request's hold would be carved on (`carve`), or None: it is carved from
    no slice."""
    if plan is None or shadow is not None:
        return None
    if plan.session or plan.batch is not None or plan.operation.job is not None:
        return None
    if plan.operation.model == "file":
        return None
    t = None
    if tenant is not None:
        t = recent_tenant(tenant)
        if t is None:
            return None
    keyed = key is not None and key.budget_usd is not None
    tenant_period = t.period if t else settings.budget_period
    judged = (  # what a slice's key is made of, but the key's budget and the time
        settings.user_id,
        settings.daily_budget_usd,
        settings.budget_period,
        tenant,
        t.budget_usd if t else None,
        tenant_period,
    )
    budgets = (
        *judged,
        (key.key_id, key.budget_id, key.budget_usd) if keyed and key is not None else None,
    )
    now = slices.clock()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    known = _slice_keys.get(budgets)
    if known is not None and known[1] <= now < known[2]:
        return known[0]
    key_budget = (
        KeyBudget(key.key_id, key.budget_id or key.key_id, key.budget_usd)
        if keyed and key is not None and key.budget_usd is not None
        else None
    )
    k = slices.key_of(*judged, key_budget, now)
    # the same key until the first of its periods (or its UTC day) ends
    ends = min(
        settings.budget_period.resets_at(now),
        tenant_period.resets_at(now) if tenant is not None else DAILY_UTC.resets_at(now),
        DAILY_UTC.resets_at(now),
    )
    if len(_slice_keys) >= _SLICE_KEYS_MAX:
        _slice_keys.clear()
    _slice_keys[budgets] = (k, now, ends)
    return k


# A request's SliceKey by the budgets it is judged on (the user's, the tenant's, the key's, each
# with its period): made once per period, not per request (`Slices.key_of` formats three period
# keys, ~10 µs). Keyed by the budgets' values, so an admin change to any of them is a new entry;
# (key, computed at, valid until): valid from when it was made to the end of its periods.
_slice_keys: dict[tuple[Any, ...], tuple[SliceKey, datetime, datetime]] = {}
_SLICE_KEYS_MAX = 4096


@dataclass(frozen=True)
class BudgetReserve:
    """A request's budget reservation, in its admission's store call: asked (`ask`), answered
    by the store (its reserve alone, or after the rate step in the same call: admit), judged
    (`answer`). The tenant's settings are read in the same call, not in a trip of their own.
    `shadow` (governance.shadow) is judged on the counters the store's reserve saw and recorded
    on `ctx`, never enforced; `ctx`, when given, gets the estimate of a request that reserved
    (a rate-limited one audits none)."""

    ledger: Ledger
    settings: UserSettings
    tenant: str | None
    tenant_settings: Callable[[str], TenantSettings]
    request_id: str
    hold: Hold
    key: KeyScope | None = None
    shadow: Shadow | None = None
    ctx: RequestContext | None = None

    def __call__(self) -> Reservation | BudgetRefusal:
        """Hold `hold` on the user's budget, the tenant's and the API key's own (a store call:
        blocking)."""
        ask = self.ask()
        if self.ctx is not None:  # (before the store call: a reserve that fails audits it too)
            self.ctx.estimate_usd = self.hold.estimate_usd
        return self.answer(ask, self.ledger.store.reserve(ask.new))

    def ask(self, tenant: TenantSettings | None = None) -> ReserveAsk:
        """`tenant`: the tenant's settings when at hand already (else read here)."""
        s, key = self.settings, self.key
        t = tenant if tenant is not None else self.tenant_settings_of()
        return self.ledger.ask(
            s.user_id,
            self.tenant,
            self.hold.estimate_usd,
            s.daily_budget_usd,
            self.request_id,
            model=self.hold.model,
            provider=self.hold.provider,
            period=s.budget_period,
            tenant_budget_usd=t.budget_usd if t else None,
            tenant_period=t.period if t else s.budget_period,
            key_budget=(
                KeyBudget(key.key_id, key.budget_id or key.key_id, key.budget_usd)
                if key is not None and key.budget_usd is not None
                else None
            ),
        )

    def tenant_settings_of(self) -> TenantSettings | None:
        return self.tenant_settings(self.tenant) if self.tenant is not None else None

    def answer(self, ask: ReserveAsk, result: ReserveResult) -> Reservation | BudgetRefusal:
        out = ask.outcome(result)
        if self.ctx is not None:
            self.ctx.estimate_usd = self.hold.estimate_usd
            shadow_budget(
                self.shadow, self.ctx, self.hold.estimate_usd, out, ask.period,
                ask.tenant_period if ask.tenant is not None else None,
            )
        return out


def reserve(
    ledger: Ledger,
    settings: UserSettings,
    tenant: str | None,
    tenant_settings: Callable[[str], TenantSettings],
    request_id: str,
    hold: Hold,
    key: KeyScope | None = None,
    shadow: Shadow | None = None,
    ctx: RequestContext | None = None,
) -> Reservation | BudgetRefusal:
    """Hold `hold` on the user's budget, the tenant's and the API key's own (a store call:
    blocking): BudgetReserve's, made and run."""
    return BudgetReserve(
        ledger, settings, tenant, tenant_settings, request_id, hold, key, shadow, ctx
    )()


def token_limited(s: UserSettings) -> bool:
    """`bool(s.token_limits.active())`, without building a TokenLimits and its dict per request."""
    return (
        s.input_tokens_per_minute is not None
        or s.output_tokens_per_minute is not None
        or s.total_tokens_per_minute is not None
    )


def limits_set(limits: TokenLimits) -> bool:
    """`bool(limits.active())`, without building its dict."""
    return (
        limits.input_tokens is not None
        or limits.output_tokens is not None
        or limits.total_tokens is not None
    )


@dataclass
class Checked:
    """One admission's outcome: every limit judged (the refusing one last), what an admitted
    request holds, and its reservation (or the budget's refusal)."""

    decisions: list[RateDecision]
    admission: Admission | None
    reserved: Reservation | BudgetRefusal | None
    now_us: int

    @property
    def refusal(self) -> RateDecision | None:
        last = self.decisions[-1]
        return None if last.allowed else last


def folds(
    s: UserSettings,
    tenant_of: Callable[[], TenantSettings | None],
    rate_decided: bool,
    tokens: tuple[int, int] | None,
) -> bool:
    """Whether a request's admission is exactly its rate step then its reservation: its rate
    not decided at the head, a limit above 0 (0 refuses without asking the store), no limit
    on requests in flight of its user or tenant (`tenant_of()`, read only when it matters), no
    token window of either."""
    if rate_decided or s.requests_per_minute <= 0:
        return False
    if s.max_concurrent_requests is not None or (tokens is not None and token_limited(s)):
        return False
    t = tenant_of()
    if t is None:
        return True
    return t.max_concurrent_requests is None and (tokens is None or not limits_set(t.token_limits))


def _folded(
    limiter: RateLimiter,
    s: UserSettings,
    reserve_hold: BudgetReserve,
    ask: ReserveAsk,
    answer: tuple[RateHit, ReserveResult | None],
    now_us: int,
) -> Checked:
    """A folded admission's outcome from the store's answer (rate_hit_reserve's)."""
    hit, result = answer
    decision = limiter.decision(hit, s.requests_per_minute, now_us)
    reserved = None if result is None else reserve_hold.answer(ask, result)
    return Checked([decision], None, reserved, now_us)


def admit(
    limiter: RateLimiter,
    settings: UserSettings,
    tenant: str | None,
    tenant_settings: Callable[[str], TenantSettings],
    *,
    rate_decided: bool,
    owner: str,
    tokens: tuple[int, int] | None,
    reserve_hold: BudgetReserve | None,
    undo_on_error: bool,
    store: AdmissionStore | None = None,
) -> Checked:
    """Every rate step and the budget reservation as one store call (the store makes it one
    transaction where it can). A refused step undoes what the earlier ones hold;
    `undo_on_error`: the store does not roll the call back as a whole (Redis), so a lease
    taken before an error is given back here. When the admission is exactly the rate step and
    the reservation (`folds`), and `store` is given, the two are one store method
    (rate_hit_reserve: one round trip on Redis)."""
    s = settings
    now = limiter.clock()
    now_us = to_us(now)
    if (
        reserve_hold is not None
        and store is not None
        and folds(s, lambda: tenant_settings(tenant) if tenant else None, rate_decided, tokens)
    ):
        ask = reserve_hold.ask()
        answer = store.rate_hit_reserve(
            s.user_id, s.requests_per_minute, limiter.window_us, now_us, ask.new
        )
        return _folded(limiter, s, reserve_hold, ask, answer, now_us)
    if rate_decided:  # admitted already, from the head (RateLimit.requestheaders)
        decision = RateDecision(True, s.requests_per_minute, 0, 0, 0)
    else:
        decision = limiter.check(s.user_id, s.requests_per_minute, now=now)
    decisions = [decision]
    if not decision.allowed:
        return Checked(decisions, None, None, now_us)
    admission = Admission(s.user_id)
    try:
        if s.max_concurrent_requests is not None:
            decisions.append(limiter.acquire(admission, s.max_concurrent_requests, owner, now))
            if not decisions[-1].allowed:
                return Checked(decisions, None, None, now_us)
        t = tenant_settings(tenant) if tenant else None
        if t is not None and t.max_concurrent_requests is not None:
            decisions.append(
                limiter.acquire_tenant(admission, t.tenant_id, t.max_concurrent_requests, owner, now)
            )
            if not decisions[-1].allowed:
                limiter.release(admission)  # the user's place, taken a step before
                return Checked(decisions, None, None, now_us)
        if tokens is not None:
            decisions += limiter.admit_tokens(
                admission,
                s.token_limits,
                *tokens,
                now=now,
                tenant=tenant,
                tenant_limits=t.token_limits if t else None,
            )
            if not decisions[-1].allowed:
                limiter.release(admission)
                return Checked(decisions, None, None, now_us)
        reserved = reserve_hold() if reserve_hold else None
    except BaseException:
        # the request is refused (503). SQLite rolls the whole call back; a store without one
        # transaction for it (Redis) would otherwise keep the lease until it expires
        leased = admission.lease_id is not None or admission.tenant_lease is not None
        if leased and undo_on_error:
            try:
                limiter.release(admission)
            except Exception:
                log.warning("could not give back the lease of a refused request")
        raise
    held = (
        admission.lease_id is not None
        or admission.tenant_lease is not None
        or admission.token_entry is not None
    )
    return Checked(decisions, admission if held else None, reserved, now_us)


async def admit_on_loop(
    limiter: RateLimiter,
    settings: UserSettings,
    tenant: str | None,
    recent_tenant: Callable[[str], TenantSettings | None],
    *,
    rate_decided: bool,
    tokens: tuple[int, int] | None,
    reserve_hold: BudgetReserve | None,
    store: LoopAdmissionStore,
) -> Checked | None:
    """A folded admission (`folds`) awaited on the event loop: one script of the store's asyncio
    client, no thread hand-off. None: the admission is not a folded one, or its tenant's
    settings are not at hand without a store read (`recent_tenant`); the caller makes it on the
    thread pool then (admit). Nothing here blocks: the settings are in memory, the rest is
    arithmetic."""
    if reserve_hold is None:
        return None
    t = None
    if tenant is not None:  # (as BudgetReserve reads it: never a read on the loop)
        t = recent_tenant(tenant)
        if t is None:
            return None
    if not folds(settings, lambda: t, rate_decided, tokens):
        return None
    s = settings
    now_us = to_us(limiter.clock())
    ask = reserve_hold.ask(t)
    answer = await store.rate_hit_reserve_async(
        s.user_id, s.requests_per_minute, limiter.window_us, now_us, ask.new
    )
    return _folded(limiter, s, reserve_hold, ask, answer, now_us)
