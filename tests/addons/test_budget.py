"""Budget addon: after a settle commits, the budgets it spent on go to the alert notifier."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http

from candela_mitm.addons.accounting import Accounting
from candela_mitm.addons.budget import Budget
from candela_mitm.addons.flowstate import ctx_of
from tests.fakes.webhook import WebhookReceiver

from .conftest import BASE, run_hooks
from .test_ratelimit import USER, chat, send


def _answer(rt, flow, status: int, usage: dict | None) -> None:
    """The provider answered (Upstream forwarded it): Accounting reads it, Budget closes."""
    c = ctx_of(flow)
    c.forwarded = True
    body = {"id": "x", "object": "chat.completion", "model": "gpt-4o-mini", "choices": []}
    if usage is not None:
        body["usage"] = usage
    flow.response = http.Response.make(status, json.dumps(body), {"content-type": "application/json"})
    budget = Budget(rt)

    async def answer_and_settle() -> None:
        await run_hooks([Accounting(rt), budget], flow, "responseheaders", "response")
        if c.after_entry is not None:  # what Audit calls once the request's entry is durable
            c.after_entry(True)
        while budget._settling:  # the settle runs in the background, after the entry
            await asyncio.gather(*list(budget._settling))

    asyncio.run(answer_and_settle())


def test_a_settled_request_is_looked_at_for_alerts_and_a_released_one_is_not(tctx, runtime):
    with WebhookReceiver() as hook:
        cfg = {**BASE, "users": {USER: {"tenants": ["research-team"], "daily_budget_usd": 0.001,
                                        "requests_per_minute": 100}},
               "alerts": {"webhooks": [{"url": hook.url}], "thresholds": [50]}}
        rt = runtime(cfg)
        # refused by the provider (a 500 that carries no usage): released, nothing spent
        [refused] = asyncio.run(send(rt, [chat()], with_budget=True))
        _answer(rt, refused, 500, None)
        assert rt.alerts.flush(10) and hook.posts == []
        # 2,000 input tokens of gpt-4o-mini: $0.0003 + output, over half of $0.001
        [ok] = asyncio.run(send(rt, [chat()], with_budget=True))
        _answer(rt, ok, 200, {"prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500})
        assert ctx_of(ok).usage_source == "reported"
        assert rt.alerts.flush(10)
        (post,) = hook.posts
    assert (post.body["scope"], post.body["id"], post.body["threshold"]) == ("user", USER, 50)
    utilization = rt.metrics.registry.get_sample_value(
        "candela_budget_utilization", {"scope": "user", "id": USER}
    )
    assert utilization == pytest.approx(post.body["utilization"]) and utilization >= 0.5


def _minted(rt, budget_usd: float | None, key_id: str = "k_first", lineage: str = "") -> str:
    """A key minted for alice, as POST /admin/v1/keys stores it; returns the secret."""
    import hashlib

    from candela_mitm.governance.identity import MINTED_KEY_PREFIX
    from candela_mitm.state.ports import KeyRecord

    secret = MINTED_KEY_PREFIX + key_id + "-secret"
    rt.store.put_api_key(KeyRecord(
        key_id, hashlib.sha256(secret.encode()).hexdigest(), USER, "", "admin", 0,
        budget_usd=budget_usd, lineage=lineage,
    ))
    return secret


def _keyed_chat(secret: str):
    from .conftest import make_flow

    body = {"model": "gpt-4o-mini", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]}
    return make_flow("/proxy/openai/v1/chat/completions", body,
                     headers={"Authorization": f"Bearer {secret}"})


@pytest.mark.parametrize("with_ratelimit", [True, False], ids=["ratelimit-reserves", "budget-reserves"])
def test_a_key_budget_refuses_with_scope_key_while_the_user_has_room(tctx, runtime, with_ratelimit):
    from candela_mitm.addons.auth import Auth
    from candela_mitm.addons.ratelimit import RateLimit
    from candela_mitm.addons.router import Router

    rt = runtime({**BASE, "users": {USER: {"tenants": ["research-team"], "daily_budget_usd": 5.0,
                                           "requests_per_minute": 100}}})
    # each request below is estimated at ~$0.00006 (100 output tokens of gpt-4o-mini): one fits
    secret = _minted(rt, 0.0001)
    addons = [Router(rt), Auth(rt)] + ([RateLimit(rt)] if with_ratelimit else []) + [Budget(rt)]

    async def go(flow):
        await run_hooks(addons, flow, "requestheaders", "request")
        return flow

    first = asyncio.run(go(_keyed_chat(secret)))
    assert first.response is None and ctx_of(first).reservation is not None
    second = asyncio.run(go(_keyed_chat(secret)))
    assert second.response is not None and second.response.status_code == 402
    body = second.response.json()
    assert (body["error"], body["scope"], body["key_id"]) == ("budget_exceeded", "key", "k_first")
    assert body["budget_usd"] == 0.0001 and body["period"] == "daily" and body["resets_at"]
    assert ctx_of(second).reservation is None  # nothing held for a refused request
    # alice herself still has room: her config key (no key budget) passes
    [plain] = asyncio.run(send(rt, [chat()], with_budget=True))
    assert plain.response is None
    # a key rotated from it spends from the same row: it is refused too
    rotated = _minted(rt, 0.0001, key_id="k_second", lineage="k_first")
    third = asyncio.run(go(_keyed_chat(rotated)))
    assert third.response.status_code == 402 and third.response.json()["key_id"] == "k_second"
    # a key of alice without a budget of its own is judged by hers alone
    free = _minted(rt, None, key_id="k_free")
    assert asyncio.run(go(_keyed_chat(free))).response is None


def test_budget_judges_a_hold_by_the_config_in_force_after_a_reload(tctx, runtime):
    """Without RateLimit deciding the hold, Budget decides it: by the rules of the config in
    force, not those of its start (governance.unknown_model_price changed by a reload)."""
    from candela_mitm.addons.auth import Auth
    from candela_mitm.addons.router import Router
    from candela_mitm.config import parse_config

    from .test_ratelimit import chat

    def cfg(unknown: str) -> dict:
        return {**BASE, "users": {USER: {"tenants": ["research-team"], "daily_budget_usd": 5.0}},
                "governance": {"unknown_model_price": unknown}}

    rt = runtime(cfg("deny"))
    addons = [Router(rt), Auth(rt), Budget(rt)]  # made once, as mitmproxy keeps them

    def status() -> int | None:
        f = chat(model="model-nobody-prices")
        asyncio.run(run_hooks(addons, f, "requestheaders", "request"))
        return f.response.status_code if f.response else None

    assert status() == 402  # model_price_unknown
    same = {"state": {"sqlite_path": rt.config.state.sqlite_path},
            "audit": {"sqlite_path": rt.config.audit.sqlite_path}}
    assert rt.reload(parse_config({**cfg("zero"), **same})) == ["governance"]
    assert status() is None  # priced at zero now: nothing held, forwarded


def _sliced(runtime):
    """A runtime whose user holds a slice of 32 chat() holds (two requests reserved on their
    own), and a request 40 times chat()'s hold; with the addons that admit it."""
    from candela_mitm.addons.auth import Auth
    from candela_mitm.addons.ratelimit import RateLimit
    from candela_mitm.addons.router import Router

    from .conftest import ALICE_KEY, make_flow

    rt = runtime({**BASE, "users": {USER: {"tenants": ["research-team"], "daily_budget_usd": 1.0,
                                           "requests_per_minute": 1000}}})

    def big():  # 40 times chat()'s hold: more than a slice of 32 of them
        body = {"model": "gpt-4o-mini", "max_tokens": 4000,
                "messages": [{"role": "user", "content": "hi"}]}
        return make_flow("/proxy/openai/v1/chat/completions", body,
                         headers={"Authorization": f"Bearer {ALICE_KEY}"})

    budget = Budget(rt)
    return rt, budget, [Router(rt), Auth(rt), RateLimit(rt), budget], big


async def _take_a_slice(rt, addons) -> int:
    """Two chat() requests reserve on their own and a slice is taken: its size (nano-dollars)."""
    from tests.wait import until_async

    from .test_ratelimit import chat

    for f in (chat(), chat()):
        await run_hooks(addons, f, "requestheaders", "request")
        assert f.response is None
    await until_async(lambda: rt.slices.held() == 1, what="a slice held")
    (size,) = [r.amount for r in rt.store.active_reservations() if r.request_id.startswith("slice:")]
    return size


def _others_leave(rt, nano: int) -> None:
    """Another process reserves all of the user's budget but `nano`."""
    from candela_mitm.governance.ledger import Reservation

    left = rt.ledger.status(USER, 1.0).remaining_usd
    other = rt.ledger.reserve(USER, "research-team", left - nano / 1e9, 1.0, "span-other")
    assert isinstance(other, Reservation)


def test_a_refusal_returns_this_processs_slice_and_leaves_a_recall_mark(tctx, runtime):
    """A 402 while this process holds a slice of the refused budget, too little beside it for
    the request even with the slice back: the slice is returned before the answer (no longer
    at the next flush), and a recall mark is left in the store for the other processes'
    slices (governance/slices.py), in the background."""
    rt, budget, addons, big = _sliced(runtime)

    async def go():
        size = await _take_a_slice(rt, addons)
        _others_leave(rt, size // 10)  # the slice and a tenth: under big()'s hold of 1.25 slices
        assert rt.store.slice_recalls(0) == (0, [])
        refused = big()
        await run_hooks(addons, refused, "requestheaders", "request")
        assert refused.response is not None and refused.response.status_code == 402
        assert rt.slices.held() == 0  # returned before the 402
        while budget._settling:  # the mark is left in the background
            await asyncio.gather(*list(budget._settling))
        newest, marks = rt.store.slice_recalls(0)
        assert newest == 1 and [(m.scope, m.name) for m in marks] == [("user", USER)]
        assert not rt.slices._by_key
        if budget._flusher is not None:
            budget._flusher.cancel()

    asyncio.run(go())
    held = [r.request_id for r in rt.store.active_reservations()]
    assert len(held) == 3 and not [r for r in held if r.startswith("slice:")]  # own ones left


def test_a_request_the_store_refuses_fits_once_this_processs_slice_is_returned(tctx, runtime):
    """The store refuses a request's reservation while this process holds a slice of that
    budget unused, too small to carve the request from, and the slice and what is left beside
    it hold the request: the slice is returned at once and the request reserves again,
    admitted (Budget._second_look): no 402 for money this process itself held."""
    rt, budget, addons, big = _sliced(runtime)

    async def go():
        size = await _take_a_slice(rt, addons)
        _others_leave(rt, size // 2)  # 1.5 slices with the slice back: big() fits
        f = big()
        await run_hooks(addons, f, "requestheaders", "request")
        assert f.response is None  # admitted
        c = ctx_of(f)
        assert c.reservation is not None and not c.reservation.slice
        assert c.reservation.request_id == c.span_id
        assert rt.slices.held() == 0 and rt.store.slice_recalls(0) == (0, [])  # no mark left
        if budget._flusher is not None:
            budget._flusher.cancel()

    asyncio.run(go())


def test_a_request_the_store_refuses_is_carved_from_a_retired_slice_with_room(tctx, runtime):
    """A slice retired before the next flush returns it (an admin change here; a slice taken
    ahead near a budget's end is returned unused the same way) still holds this process's
    money: a request the store refuses meanwhile is carved from it (Slices.carve_held), not
    refused, and settles into it like any carved request."""
    from .test_ratelimit import chat

    rt, budget, addons, _ = _sliced(runtime)

    async def go():
        await _take_a_slice(rt, addons)
        rt.slices.retire_all()
        _others_leave(rt, 0)
        f = chat()
        await run_hooks(addons, f, "requestheaders", "request")
        assert f.response is None  # admitted
        c = ctx_of(f)
        assert c.reservation is not None and c.reservation.slice
        assert c.slice_id == c.reservation.slice and rt.slices.held() == 1
        assert rt.store.slice_recalls(0) == (0, [])
        rt.slices.release(c.reservation)  # it charged nothing: the slice is returned
        rt.slices.flush()
        assert rt.slices.held() == 0
        _others_leave(rt, 0)  # what the slice held, taken elsewhere
        refused = chat()  # no slice now, nothing left: the store's refusal stands
        await run_hooks(addons, refused, "requestheaders", "request")
        assert refused.response is not None and refused.response.status_code == 402
        if budget._flusher is not None:
            budget._flusher.cancel()

    asyncio.run(go())
