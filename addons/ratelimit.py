"""RateLimit: requests and tokens per minute and requests in flight per user (tokens and requests
in flight per tenant too), shared by every proxy process; IETF RateLimit headers on every answer
it decided."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from mitmproxy import http

from candela_mitm.context import RequestContext
from candela_mitm.governance.admission import (
    BudgetReserve,
    Checked,
    Hold,
    admit,
    admit_on_loop,
    body_scan,
    carve,
    decide_hold,
    limits_set,
    rules_for,
    token_estimate,
    token_limited,
)
from candela_mitm.governance.estimate import LARGE_BODY_BYTES, BodyScan
from candela_mitm.governance.ledger import BudgetRefusal, Reservation
from candela_mitm.governance.rate_leases import TakeAsk
from candela_mitm.governance.ratelimit import policy_headers
from candela_mitm.runtime import Runtime
from candela_mitm.state.ports import to_us

from .accounting import account_flow
from .flowstate import (
    answered,
    ctx_of,
    defer,
    deny,
    fail_closed,
    has_field,
    head_values,
    run_later,
)

log = logging.getLogger("candela.ratelimit")

# A large body is rate limited from its head, before it is read, decoded, parsed or estimated:
# a caller past its rate cannot make Candela do work that grows with the body (parsing holds
# the event loop about 20 ms a MB). Smaller ones are decided with their reservation, in one
# store trip.


_FRAMING = frozenset({b"transfer-encoding", b"content-length"})


def large_body(headers: http.Headers) -> bool:
    """A body over LARGE_BODY_BYTES, or of a size the head does not state (chunked)."""
    head = head_values(headers, _FRAMING)
    if "chunked" in head.get(b"transfer-encoding", "").lower():
        return True
    try:
        return int(head.get(b"content-length", "0")) > LARGE_BODY_BYTES
    except ValueError:
        return False  # Router answers 400


LoopCall = Callable[[], Awaitable[Checked | None]]

# Admissions awaited on the event loop at once (Redis): each is a connection of the loop's client
# and ~160 µs of the loop's own CPU (redis-py packs and parses in Python), where the pool's
# threads would take it and join a turn's calls in one job (state/calls.py). A few at a time is
# what an idle user's time to first token gains from; past that the pool takes them, and the
# loop's client never holds more connections than this.
LOOP_ADMISSIONS_MAX = 4


def admission_hold(rt: Runtime, c: RequestContext) -> tuple[BodyScan | None, Reservation | None]:
    """The request's budget hold, decided once, here (it rides on the context for Budget), and
    carved from this process's budget slice when it can be (the caller gives a carved hold
    back if the request is refused); with the body's scan, for admission_call."""
    settings = c.settings
    assert settings is not None
    # the body is scanned once for both estimates (none for a route without a model)
    found = body_scan(c.body, c.scan) if c.plan is not None and c.plan.model else c.scan
    hold = decide_hold(c, rt.pricing, rules_for(rt.config.governance), found)
    key = c.principal.key_scope if c.principal else None  # a minted key's own budget
    carved = carve(
        rt.slices, c.plan, hold, settings, c.tenant, rt.users.recent_tenant, c.span_id, key,
        rt.shadow,
    )
    return found, carved


def admission_call(
    rt: Runtime, c: RequestContext, found: BodyScan | None, carved: Reservation | None
) -> tuple[Callable[[], Checked], LoopCall | None]:
    """The request's admission as one store call, for a request from_block could not admit in
    memory: its rate steps and, when it holds one not carved (admission_hold), its budget
    reservation. Beside it, the same admission awaited on the event loop, when the store
    answers there (Redis) and it is the rate step and the reservation alone: None from it, or
    no such call, and the first goes to the store's thread pool."""
    settings = c.settings
    assert settings is not None
    hold = c.hold
    tokens = token_estimate(c.plan, rt.pricing, rules_for(rt.config.governance), c.body, found)
    tenant_settings = rt.users.tenant_settings_cached
    key = c.principal.key_scope if c.principal else None
    # run on the pool thread that runs the call, or on the loop, while the flow's hook awaits
    # it: nothing else touches the context
    reserve_hold = (
        BudgetReserve(
            rt.ledger, settings, c.tenant, tenant_settings, c.span_id, hold, key, rt.shadow, c
        )
        if carved is None and isinstance(hold, Hold)
        else None
    )

    def call() -> Checked:
        return admit(
            rt.limiter,
            settings,
            c.tenant,
            tenant_settings,
            rate_decided=c.rate_decided,
            owner=rt.ledger.owner,
            tokens=tokens,
            reserve_hold=reserve_hold,
            undo_on_error=not rt.store.joins_calls,
            store=rt.store,
        )

    loop_store = rt.store.loop_admission()
    if loop_store is None or reserve_hold is None:
        return call, None
    held = reserve_hold

    async def on_loop() -> Checked | None:
        assert loop_store is not None and settings is not None
        return await admit_on_loop(
            rt.limiter,
            settings,
            c.tenant,
            rt.users.recent_tenant,
            rate_decided=c.rate_decided,
            tokens=tokens,
            reserve_hold=held,
            store=loop_store,
        )

    return call, on_loop


def from_block(rt: Runtime, c: RequestContext, carved: Reservation | None) -> Checked | None:
    """The request's admission made in memory: its request counted on this process's rate
    block and its budget hold (if any) carved from a slice; None: it needs the store (no block,
    a budget to reserve, concurrency or token limits of its user or tenant, a tenant whose
    settings are not at hand)."""
    leases, s = rt.rate_leases, c.settings
    if leases is None or not leases.rules.enabled or s is None or c.rate_decided:
        return None
    if isinstance(c.hold, Hold) and carved is None:
        return None
    if s.max_concurrent_requests is not None or token_limited(s):
        return None
    if c.tenant is not None:
        t = rt.users.recent_tenant(c.tenant)
        if t is None or t.max_concurrent_requests is not None or limits_set(t.token_limits):
            return None
    now_us = to_us(rt.limiter.clock())
    decision = leases.use(s.user_id, s.requests_per_minute, now_us)
    if decision is None:
        return None
    return Checked([decision], None, carved, now_us)


class RateLimit:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._tasks: set[asyncio.Task[None]] = set()  # rate blocks being taken
        self._flusher: asyncio.Task[None] | None = None  # gives back the blocks' unused part
        self._on_loop = 0  # admissions awaited on the event loop now (LOOP_ADMISSIONS_MAX)

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.settings is None or c.kind not in ("proxy", "chat"):
            return
        if not large_body(flow.request.headers):
            return
        settings = c.settings
        decision = await self.rt.store_call(
            self.rt.limiter.check, settings.user_id, settings.requests_per_minute
        )
        c.rate_decided = True
        if not decision.allowed:
            self.rt.metrics.rate_limited.labels(self.rt.metrics.tenant_label(c.tenant or "")).inc()
            deny(flow, decision.denial())

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or c.settings is None:
            return
        # Budget's reservation (if this request needs one) rides the same store call and
        # transaction: each costs about as much CPU as the work done in it.
        # Budget still decides and answers 402 in its own hook, after this one.
        found, carved = admission_hold(self.rt, c)
        checked = from_block(self.rt, c, carved)  # no store call, when it can be
        from_a_block = checked is not None
        if checked is None:
            try:
                call, on_loop = admission_call(self.rt, c, found, carved)
                if on_loop is not None and self._on_loop < LOOP_ADMISSIONS_MAX:
                    self._on_loop += 1
                    try:
                        checked = await on_loop()
                    finally:
                        self._on_loop -= 1
                if checked is None:
                    checked = await self.rt.store_call(call)
            except BaseException:
                if carved is not None:
                    self._give_back(carved)
                raise
            if not c.rate_decided:
                self._ask_block(c, checked)
        refusal = checked.refusal
        # what decides nothing for this request waits until it is on its way (flowstate.defer):
        # its RateLimit headers (given with the answer), the read-ahead of its tenant's
        # settings, and for one admitted from a rate block the next block
        defer(c, functools.partial(self._meanwhile, c, checked, from_a_block))
        if refusal is not None:
            c.rate_headers = policy_headers(checked.decisions, checked.now_us)
            if carved is not None:
                self._give_back(carved)
            self.rt.metrics.rate_limited.labels(self.rt.metrics.tenant_label(c.tenant or "")).inc()
            deny(flow, refusal.denial(c.rate_headers))
            return
        c.admission = checked.admission  # held from now on: finished on response or error
        reserved: Reservation | BudgetRefusal | None = checked.reserved
        if carved is not None:
            c.estimate_usd = carved.amount_usd
            c.slice_id = carved.slice  # named in its audit entry
            reserved = carved
        if reserved is not None:
            if isinstance(reserved, Reservation):
                c.reservation = reserved  # held from now on: Budget settles or releases it
            c.reserve_result = reserved  # Budget judges it in its own hook

    def _meanwhile(self, c: RequestContext, checked: Checked, from_a_block: bool) -> None:
        """What an admission leaves until its request is on its way (flowstate.defer)."""
        if not c.rate_headers:
            c.rate_headers = policy_headers(checked.decisions, checked.now_us)
        self._read_tenant_ahead(c.tenant)
        if from_a_block:
            self._ask_next_block(c, checked)

    # -- rate leases (governance/rate_leases.py) -------------------------------------------------
    def _ask_block(self, c: RequestContext, checked: Checked) -> None:
        """A request checked in the store and admitted: take a block of its window in the
        background, if the window has ample room, for the next requests to use."""
        leases, settings = self.rt.rate_leases, c.settings
        if leases is None or settings is None or checked.refusal is not None:
            return
        ask = leases.ask(settings.user_id, settings.requests_per_minute, checked.decisions[0])
        if ask is None:
            return
        task = asyncio.get_running_loop().create_task(self._take(ask))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ask_next_block(self, c: RequestContext, checked: Checked) -> None:
        """A request admitted from a block: take the next in the background before this one
        runs out (RateLeases.ask_next)."""
        leases, settings = self.rt.rate_leases, c.settings
        assert leases is not None and settings is not None
        ask = leases.ask_next(settings.user_id, settings.requests_per_minute, checked.now_us)
        if ask is None:
            return
        task = asyncio.get_running_loop().create_task(self._take(ask))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_tenant_ahead(self, tenant: str | None) -> None:
        """Its tenant's remembered settings read again in the background before they expire
        (UserDirectory.tenant_ahead): a request finding none at hand is carved from no slice
        nor admitted from a block (it reserves and checks in the store): under load the first
        request of every user of the tenant would, once per TTL, and an idle user's request
        after the TTL would break its chain of rate blocks."""
        if tenant is None:
            return
        users = self.rt.users
        delay = users.tenant_ahead(tenant)
        if delay is not None:
            self.rt.read_ahead(("tenant", tenant), delay, users.refresh_tenant, tenant)

    async def _take(self, ask: TakeAsk) -> None:
        leases = self.rt.rate_leases
        assert leases is not None
        got = None
        try:
            if ask.after_s:  # not beside the request that asked it (governance/ahead.py)
                await asyncio.sleep(ask.after_s)
            got = await self.rt.store_call(ask.take)
        except Exception:
            log.exception("could not take a rate block")
        finally:
            if leases.took(ask, got) and (self._flusher is None or self._flusher.done()):
                self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """While blocks are held: give back the unused part of those past their stamp. On the
        thread pool: each return is a store transaction of its own."""
        leases = self.rt.rate_leases
        assert leases is not None
        while leases.due():
            await asyncio.sleep(leases.rules.lifetime_s / 2)
            try:
                await self.rt.blocking(leases.flush)
            except Exception:
                log.exception("could not give back the rate blocks")

    def _give_back(self, carved: Reservation) -> None:
        slices = self.rt.slices
        assert slices is not None
        slices.release(carved)

    async def _finish(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        """Give the lease back and correct the token windows to the usage read."""
        admission, c.admission = c.admission, None
        if admission is None:
            return
        account_flow(self.rt, flow, c)
        # what was read from the answer (nothing for a request never forwarded or refused by
        # the provider); a charge at the reservation means its usage is not known: the estimate
        # stays counted
        usage = None if c.usage_source == "reserved" else (
            c.usage.input_tokens, c.usage.output_tokens
        )
        try:
            await self.rt.store_call(self.rt.limiter.finish, admission, usage)
        except Exception:
            # the lease expires (or the next start frees it); the estimate stays counted
            log.exception("could not finish the rate admission of %s", c.span_id)

    async def response(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None:
            return
        run_later(c)  # a request never forwarded (refused after this hook): its headers
        if flow.response is not None and not flow.response.stream and c.rate_headers:
            headers = flow.response.headers
            # a forwarded answer has them from Upstream's headers hook (with the provider's
            # filtered out); an answer made here (a denial) gets them now
            if not has_field(headers, next(iter(c.rate_headers))):
                for k, v in c.rate_headers.items():
                    headers.setdefault(k, v)
        await self._finish(flow, c)

    async def error(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            run_later(c)
            await self._finish(flow, c)
