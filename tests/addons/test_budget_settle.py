"""Budget addon: reserve before forwarding (402), and settle only once the request's audit entry
is durable (issue 16: the spend and its entry are one durable fact)."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http

from candela_mitm.addons.accounting import Accounting
from candela_mitm.addons.audit import Audit, AuditStart
from candela_mitm.addons.auth import Auth
from candela_mitm.addons.budget import Budget
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.ratelimit import RateLimit
from candela_mitm.addons.router import Router
from candela_mitm.errors import StoreUnavailable
from candela_mitm.governance.admission import Hold
from candela_mitm.governance.ledger import Reservation
from tests.wait import WAIT_S, until_async

from .conftest import ALICE_KEY, BASE, make_flow, run_hooks

USER = "alice@example.com"
USAGE = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}


class Writer:
    """The audit writer's record_then, committing when the test says so."""

    healthy = True
    journaling = False  # (the real writer's with durability power_loss)

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict]] = []
        self.callbacks: list = []

    def record_then(self, action, committed, /, **fields):
        self.entries.append((action, fields))
        self.callbacks.append(committed)
        return True


def config(budget: float | None = None) -> dict:
    user: dict = {"tenants": ["research-team"]}
    if budget is not None:
        user["daily_budget_usd"] = budget
    return {**BASE, "users": {USER: user}}


def chat(model: str = "gpt-4o-mini"):
    body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    return make_flow(
        "/proxy/openai/v1/chat/completions", body, headers={"Authorization": f"Bearer {ALICE_KEY}"}
    )


def answer(f) -> None:
    """What the provider answered, as Upstream and mitmproxy leave the flow."""
    ctx_of(f).forwarded = True
    f.response = http.Response.make(
        200,
        json.dumps({"id": "x", "choices": [], "usage": USAGE}).encode(),
        {"content-type": "application/json"},
    )


def chain(rt):
    audit = Audit(rt)
    budget = Budget(rt)
    # in pipeline order: AuditStart's response hook first, Audit's last
    return [AuditStart(audit), Router(rt), Auth(rt), RateLimit(rt), budget, Accounting(rt), audit]


async def settles(budget: Budget) -> None:
    while budget._settling:
        await asyncio.gather(*list(budget._settling))


def test_the_spend_is_recorded_only_once_its_entry_is_durable(tctx, runtime):
    rt = runtime(config())
    writer = Writer()
    real, rt.audit = rt.audit, writer
    addons = chain(rt)
    budget = addons[4]
    f = chat()

    async def main():
        await run_hooks(addons, f, "requestheaders", "request")
        c = ctx_of(f)
        assert f.response is None and isinstance(c.reservation, Reservation)
        assert isinstance(c.hold, Hold) and c.hold_decided  # decided once, by RateLimit
        held = rt.ledger.status(USER, 1000.0).reserved_usd
        assert held == pytest.approx(c.hold.estimate_usd)
        answer(f)
        await run_hooks(addons, f, "responseheaders")
        task = asyncio.ensure_future(run_hooks(addons, f, "response"))
        await until_async(lambda: bool(writer.callbacks), what="the entry queued")
        await asyncio.sleep(0.02)  # the other hooks' turn: none may spend before the commit
        # the entry is queued, not committed: nothing is spent, the hold stays
        [(action, fields)] = writer.entries
        assert action == "llm_request" and fields["usage_source"] == "reported"
        assert not task.done()
        assert rt.ledger.spent_today(USER) == 0
        assert rt.ledger.status(USER, 1000.0).reserved_usd == pytest.approx(held)
        writer.callbacks[0](1, None)  # the writer thread commits it
        await asyncio.wait_for(task, WAIT_S)
        await settles(budget)
        assert f.response.status_code == 200
        return fields

    fields = asyncio.run(main())
    # the spend is what the entry records
    assert rt.ledger.spent_today(USER) == pytest.approx(fields["cost_usd"]) and fields["cost_usd"] > 0
    assert rt.ledger.status(USER, 1000.0).reserved_usd == 0
    rt.audit = real


def test_an_entry_that_cannot_be_made_durable_leaves_the_hold_and_no_spend(tctx, runtime):
    rt = runtime(config())
    writer = Writer()
    real, rt.audit = rt.audit, writer
    addons = chain(rt)
    f = chat()

    async def main():
        await run_hooks(addons, f, "requestheaders", "request")
        answer(f)
        await run_hooks(addons, f, "responseheaders")
        task = asyncio.ensure_future(run_hooks(addons, f, "response"))
        await until_async(lambda: bool(writer.callbacks), what="the entry queued")
        writer.callbacks[0](None, StoreUnavailable("disk full"))
        await asyncio.wait_for(task, WAIT_S)
        await settles(addons[4])

    asyncio.run(main())
    assert f.response.status_code == 503  # the answer does not complete without its entry
    assert json.loads(f.response.content)["error"] == "governance_unavailable"
    # no durable entry, no spend: the hold stays until the next start settles it (audited)
    assert rt.ledger.spent_today(USER) == 0
    assert rt.ledger.status(USER, 1000.0).reserved_usd > 0
    rt.audit = real


def test_a_provider_refusal_releases_at_once(tctx, runtime):
    rt = runtime(config())
    writer = Writer()
    real, rt.audit = rt.audit, writer
    addons = chain(rt)
    f = chat()

    async def main():
        await run_hooks(addons, f, "requestheaders", "request")
        ctx_of(f).forwarded = True
        f.response = http.Response.make(429, b'{"error": {}}', {"content-type": "application/json"})
        await run_hooks(addons, f, "responseheaders")
        task = asyncio.ensure_future(run_hooks(addons, f, "response"))
        await until_async(lambda: bool(writer.callbacks), what="the entry queued")
        # nothing charged, nothing to keep consistent with an entry: released before the commit
        await until_async(lambda: rt.ledger.status(USER, 1000.0).reserved_usd == 0,
                          what="the hold released before the commit")
        writer.callbacks[0](1, None)
        await asyncio.wait_for(task, WAIT_S)

    asyncio.run(main())
    assert rt.ledger.spent_today(USER) == 0
    assert writer.entries[0][1]["usage_source"] is None
    rt.audit = real


def test_over_budget_is_402_and_never_held(tctx, runtime):
    rt = runtime(config(budget=0.000001))
    addons = chain(rt)
    f = chat()
    asyncio.run(run_hooks(addons, f, "requestheaders", "request"))
    assert f.response is not None and f.response.status_code == 402
    assert json.loads(f.response.content)["error"] == "budget_exceeded"
    assert ctx_of(f).reservation is None
    assert rt.ledger.status(USER, 0.000001).reserved_usd == 0


def test_an_unpriced_model_is_refused_by_budget_after_the_rate_check(tctx, runtime):
    rt = runtime(config())
    addons = chain(rt)
    f = chat(model="no-such-model-xyz")
    asyncio.run(run_hooks(addons, f, "requestheaders", "request"))
    assert f.response is not None and f.response.status_code == 402
    assert json.loads(f.response.content)["error"] == "model_price_unknown"
    assert ctx_of(f).reservation is None
