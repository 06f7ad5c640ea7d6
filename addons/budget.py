"""Budget: reserve the most a request can cost before it leaves (402 if it does not fit), settle after."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.context import RequestContext
from candela_mitm.governance.admission import (
    Hold,
    PriceUnknown,
    decide_hold,
    reserve,
    rules_for,
    slice_key,
)
from candela_mitm.governance.ledger import BudgetRefusal, Reservation, Settlement
from candela_mitm.governance.slices import Ask
from candela_mitm.runtime import Runtime

from .accounting import account_flow
from .flowstate import answered, ctx_of, deny, fail_closed

log = logging.getLogger("candela.budget")


class Budget:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._settling: set[asyncio.Task[None]] = set()  # settles after their entries, running
        self._flusher: asyncio.Task[None] | None = None  # records the budget slices' spend

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or c.settings is None:
            return
        m = self.rt.metrics
        if c.reserve_result is not None:  # RateLimit already made this request's reservation
            reserved, c.reserve_result = c.reserve_result, None
            if isinstance(reserved, BudgetRefusal):
                reserved = await self._second_look(c, reserved)
                if isinstance(reserved, Reservation):
                    c.reservation = reserved
                    return
            if isinstance(reserved, BudgetRefusal):
                m.budget_denied.labels(m.tenant_label(c.tenant or ""), "budget_exceeded").inc()
                self._refused(reserved)
                deny(flow, reserved.denial())
            else:
                self._ask_slice(reserved)
            return
        rules = rules_for(self.rt.config.governance)  # the config in force: a reload changes it
        hold = c.hold if c.hold_decided else decide_hold(c, self.rt.pricing, rules, c.scan)
        if isinstance(hold, PriceUnknown):
            m.budget_denied.labels(m.tenant_label(c.tenant or ""), "model_price_unknown").inc()
            deny(flow, errors.model_price_unknown(hold.model))
            return
        if hold is None:
            return  # local, free or (unknown_model_price: zero) unpriced: nothing held
        c.estimate_usd = hold.estimate_usd
        result = await self.rt.store_call(
            reserve,
            self.rt.ledger,
            c.settings,
            c.tenant,
            self.rt.users.tenant_settings_cached,
            c.span_id,
            hold,
            c.principal.key_scope if c.principal else None,  # a minted key's own budget
            self.rt.shadow,
            c,
        )
        if isinstance(result, BudgetRefusal):
            result = await self._second_look(c, result)
        if isinstance(result, BudgetRefusal):
            m.budget_denied.labels(m.tenant_label(c.tenant or ""), "budget_exceeded").inc()
            self._refused(result)
            deny(flow, result.denial())
            return
        c.reservation = result
        self._ask_slice(result)

    # -- budget slices (governance/slices.py) ------------------------------------------------------
    async def _second_look(
        self, c: RequestContext, refusal: BudgetRefusal
    ) -> Reservation | BudgetRefusal:
        """The store refused the request's reservation while this process holds money of that
        budget unused in its slices: not a 402 for it. Its hold is carved from a slice of its
        budgets with room (retired ones too: a slice asked ahead near the budget's end and
        returned unused waits for the next flush, and requests before it reserve on their own
        beside it: tests/e2e/test_slices.py saw 402s with 4 holds left in two such slices), or
        else those slices are returned now and it reserves once more. Refusals only: a budget
        this process holds no slice of is refused as the store said."""
        slices = self.rt.slices
        if slices is None or c.settings is None or not slices.holding(refusal):
            return refusal
        hold = c.hold
        if not isinstance(hold, Hold):
            return refusal
        scope = c.principal.key_scope if c.principal else None
        key = slice_key(
            slices, c.plan, c.settings, c.tenant, self.rt.users.recent_tenant, scope,
            self.rt.shadow,
        )
        if key is not None:
            carved = slices.carve_held(key, hold.estimate_usd, c.span_id)
            if carved is not None:
                c.estimate_usd = carved.amount_usd
                c.slice_id = carved.slice  # named in its audit entry
                return carved
        try:
            returned, recorded = await self.rt.blocking(slices.return_now, refusal)
        except Exception:
            log.exception("could not return the budget slices held beside a refusal")
            return refusal
        self._recorded(recorded)
        if not returned:
            return refusal
        self._flush_soon()  # what the flush left (slices with requests in flight) goes next
        return await self.rt.store_call(
            reserve, self.rt.ledger, c.settings, c.tenant, self.rt.users.tenant_settings_cached,
            c.span_id, hold, scope, self.rt.shadow, c,
        )

    def _ask_slice(self, res: Reservation) -> None:
        """A request reserved on its own: take a slice of its budgets in the background if they
        have ample room, for the next requests to carve from. A request carved from a slice:
        the next slice, taken before this one runs out (Slices.ask_next)."""
        slices = self.rt.slices
        if slices is None or self.rt.shadow is not None:
            return  # a shadow policy judges every request on its own reservation: none is carved
        ask = slices.ask_next(res) if res.slice else slices.ask(res)
        if ask is None:
            return
        self._background(self._take(ask))

    def _refused(self, refusal: BudgetRefusal) -> None:
        """A reservation of this process was refused: its slices of the budget that refused
        it go back to the store at the next flush, not after `idle_s` (Slices.refused), and a
        recall mark asks the other processes for theirs (Slices.recall_mark), in the
        background: the 402 does not wait for it."""
        slices = self.rt.slices
        if slices is None:
            return
        if slices.refused(refusal):
            self._flush_soon()
        mark = slices.recall_mark(refusal)
        if mark is not None:
            self._background(self._recall(mark))

    async def _recall(self, mark: tuple[str, str]) -> None:
        slices = self.rt.slices
        assert slices is not None
        try:
            await self.rt.blocking(slices.recall, mark)
        except Exception:
            log.exception("could not leave a slice recall mark")  # they return when idle

    async def _take(self, ask: Ask) -> None:
        slices = self.rt.slices
        assert slices is not None
        got: Reservation | BudgetRefusal | None = None
        try:
            if ask.after_s:  # not beside the request that asked it (governance/ahead.py)
                await asyncio.sleep(ask.after_s)
            got = await self.rt.store_call(ask.reserve)
        except Exception:
            log.exception("could not take a budget slice")
        finally:
            if slices.took(ask, got):
                self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """While slices are held: record their spend and return the idle ones, every flush_ms.
        On the thread pool: a flush is several store transactions, each its own (a batch of the
        loop turn could be retried whole, and a flush is not a call to run twice)."""
        slices = self.rt.slices
        assert slices is not None
        while slices.due():
            await asyncio.sleep(slices.rules.flush_s)
            try:
                recorded = await self.rt.blocking(slices.flush)
            except Exception:
                log.exception("could not flush the budget slices")
                continue
            self._recorded(recorded)

    def _recorded(self, recorded: list[Reservation]) -> None:
        if self.rt.alerts is not None:
            for res in recorded:
                self.rt.alerts.settled(res)  # committed: look for a threshold crossed

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _settle_carved(
        self, res: Reservation, cost: float, tokens_in: int, tokens_out: int, model: str,
        provider: str, durable: bool,
    ) -> None:
        slices = self.rt.slices
        assert slices is not None
        if not durable:
            # no durable entry, no spend: the hold stays carved (the slice is not returned while
            # this process lives); a restart settles the slice from the entries it finds
            log.error("hold of span %s kept on slice %s: its audit entry is not durable",
                      res.request_id, res.slice)
            return
        slices.settle(res, cost, tokens_in, tokens_out, model, provider)
        self._flush_soon()

    async def _close(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        """Settle what the request is charged (governance/accounting.py), or release the hold of
        one that never reached the provider or that the provider refused."""
        if c.reservation is None:
            return
        if c.plan is not None and c.plan.session:
            if flow.response is not None and flow.response.status_code == 101 and not c.denial_code:
                return  # the session holds it from here: addons/websocket.py settles it
            # the upgrade was refused or failed before a session began: no frame reached a model
            res, c.reservation = c.reservation, None
            try:
                await self.rt.store_call(self.rt.ledger.release, res)
            except Exception:
                log.exception("could not release reservation %s", res.id)
            return
        account_flow(self.rt, flow, c)  # while the reservation is on the context: it is charged
        res, c.reservation = c.reservation, None
        if res.slice:
            self._close_carved(c, res)
            return
        if c.usage_source is None:
            # nothing charged (never reached, or refused by the provider): no spend to record
            try:
                await self.rt.store_call(self.rt.ledger.release, res)
            except Exception:
                log.exception("could not release reservation %s", res.id)
            return
        plan = c.plan
        assert plan is not None
        settle = functools.partial(
            self.rt.ledger.settle,
            res,
            c.cost_usd,
            c.usage.input_tokens,
            c.usage.output_tokens,
            plan.model or "",
            plan.upstream.name,
        )
        # The spend follows its durable audit entry (issue 16: one durable fact). Audit calls
        # this once the entry's commit is known; the answer does not wait for the settle. A
        # crash before it leaves the reservation held: the next start settles it from the entry
        # (governance/reconcile.py), or at its amount, audited, when no entry was made.
        c.after_entry = functools.partial(self._settle_after_entry, res, settle)

    def _close_carved(self, c: RequestContext, res: Reservation) -> None:
        """A hold carved from a slice: given back to it at once when nothing was charged, else
        settled into it once the entry is durable (as a reservation of its own would be)."""
        slices = self.rt.slices
        assert slices is not None
        if c.usage_source is None:
            slices.release(res)
            return
        plan = c.plan
        assert plan is not None
        c.after_entry = functools.partial(
            self._settle_carved, res, c.cost_usd, c.usage.input_tokens, c.usage.output_tokens,
            plan.model or "", plan.upstream.name,
        )

    def _settle_after_entry(
        self, res: Reservation, settle: Callable[[], Settlement], durable: bool
    ) -> None:
        if not durable:
            # no durable entry, no spend: the hold stays until the next start settles it
            log.error(
                "reservation %s kept held: its audit entry is not durable (settled at the next "
                "start from the entry, or at its amount)",
                res.id,
            )
            return
        task = asyncio.get_running_loop().create_task(self._settle(res, settle))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, res: Reservation, settle: Callable[[], Settlement]) -> None:
        try:
            settled = await self.rt.store_call(settle)
        except Exception:
            # the reservation stays in the store: the next start settles it from its entry
            log.exception("could not settle reservation %s", res.id)
            return
        if settled.applied and self.rt.alerts is not None:
            self.rt.alerts.settled(res)  # committed: look for a threshold crossed

    async def response(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            await self._close(flow, c)

    async def error(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            await self._close(flow, c)
