"""Budget: reserve the most a request can cost before it leaves (402 if it does not fit), settle after."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.context import RequestContext
from candela_mitm.governance.admission import (
    PriceUnknown,
    Rules,
    decide_hold,
    reserve,
)
from candela_mitm.governance.ledger import BudgetRefusal, Reservation, Settlement
from candela_mitm.runtime import Runtime

from .accounting import account_flow
from .flowstate import answered, ctx_of, deny, fail_closed

log = logging.getLogger("candela.budget")


class Budget:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.rules = Rules.of(rt.config.governance)
        self._settling: set[asyncio.Task[None]] = set()  # settles after their entries, running

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or c.settings is None:
            return
        m = self.rt.metrics
        if c.reserve_result is not None:  # RateLimit already made this request's reservation
            reserved, c.reserve_result = c.reserve_result, None
            if isinstance(reserved, BudgetRefusal):
                m.budget_denied.labels(m.tenant_label(c.tenant or ""), "budget_exceeded").inc()
                deny(flow, reserved.denial())
            return
        hold = c.hold if c.hold_decided else decide_hold(c, self.rt.pricing, self.rules, c.scan)
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
            m.budget_denied.labels(m.tenant_label(c.tenant or ""), "budget_exceeded").inc()
            deny(flow, result.denial())
            return
        c.reservation = result

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
        # (Ledger.reconcile_stale), or at its amount, audited, when no entry was made.
        c.after_entry = functools.partial(self._settle_after_entry, res, settle)

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
