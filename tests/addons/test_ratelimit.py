"""RateLimit addon: requests per user per minute (429), with Budget's reservation in the same store trip."""

from __future__ import annotations

import asyncio

import pytest

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.budget import Budget
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.ratelimit import RateLimit
from candela_mitm.addons.router import Router
from candela_mitm.governance.ledger import BudgetRefusal, Reservation

from .conftest import ALICE_KEY, BASE, make_flow, run_hooks

ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
USER = "alice@example.com"


def config(rpm=None, budget=None, default_rpm=None):
    user = {"tenants": ["research-team"]}
    if rpm is not None:
        user["requests_per_minute"] = rpm
    if budget is not None:
        user["daily_budget_usd"] = budget
    gov = {"rate_limits": {"default_requests_per_minute": default_rpm}} if default_rpm is not None else {}
    return {**BASE, "users": {USER: user}, "governance": gov}


def chat(model="gpt-4o-mini", path="/proxy/openai/v1/chat/completions"):
    body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    return make_flow(path, body, headers=ALICE)


async def send(rt, flows, with_budget=False):
    addons = [Router(rt), Auth(rt), RateLimit(rt)] + ([Budget(rt)] if with_budget else [])
    for f in flows:
        await run_hooks(addons, f, "requestheaders", "request")
    return flows


def statuses(flows):
    return [f.response.status_code if f.response else None for f in flows]


# the user's limit, the default, requests in the same minute -> what each got
@pytest.mark.parametrize(
    "rpm, default_rpm, n, expected",
    [
        (2, None, 3, [None, None, 429]),
        (1, None, 2, [None, 429]),
        (0, None, 1, [429]),  # a limit of 0 admits nothing
        (None, 3, 4, [None, None, None, 429]),  # the default applies to a user without one
        (5, 1, 3, [None, None, None]),  # the user's own limit wins over the default
    ],
)
def test_the_window_admits_the_limit_and_refuses_the_rest(tctx, runtime, rpm, default_rpm, n, expected):
    rt = runtime(config(rpm, default_rpm=default_rpm))
    flows = asyncio.run(send(rt, [chat() for _ in range(n)]))
    assert statuses(flows) == expected
    limit = rpm if rpm is not None else default_rpm
    for f in flows:
        if f.response is None:
            continue
        body = f.response.json()
        assert body["error"] == "rate_limited" and body["limit"] == limit
        assert f.response.headers["Retry-After"] == str(body["retry_after_s"])
        assert 0 <= body["retry_after_s"] <= 60
        assert ctx_of(f).denial_code == "rate_limited"
    assert rt.metrics.rate_limited.labels("research-team")._value.get() == expected.count(429)


def test_the_window_is_per_user(tctx, runtime):
    bob_key = "cdl_bob_example_key_0123456789"
    import hashlib

    cfg = config(rpm=1)
    cfg["auth"] = {"api_keys": [*BASE["auth"]["api_keys"],
                                {"sha256": hashlib.sha256(bob_key.encode()).hexdigest(), "user": "bob@example.com"}]}
    cfg["users"]["bob@example.com"] = {"requests_per_minute": 1}
    rt = runtime(cfg)
    bob = make_flow("/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"},
                    headers={"Authorization": f"Bearer {bob_key}"})
    flows = asyncio.run(send(rt, [chat(), bob, chat()]))
    assert statuses(flows) == [None, None, 429]


def test_an_admitted_request_carries_budgets_reservation(tctx, runtime):
    rt = runtime(config(rpm=5, budget=10.0))
    [f] = asyncio.run(send(rt, [chat()]))
    c = ctx_of(f)
    assert f.response is None
    assert isinstance(c.reservation, Reservation) and c.reserve_result is c.reservation
    assert c.reservation.user_id == USER and c.reservation.amount_usd == pytest.approx(c.estimate_usd)
    assert c.estimate_usd > 0
    status = rt.ledger.status(USER, 10.0)
    assert status.reserved_usd == pytest.approx(c.estimate_usd)
    assert "candela" in f.metadata and set(f.metadata) == {"candela"}  # no side channel


def test_a_refused_reservation_is_left_for_budget_to_answer(tctx, runtime):
    rt = runtime(config(rpm=5, budget=0.0))
    [alone] = asyncio.run(send(rt, [chat()]))
    c = ctx_of(alone)
    assert alone.response is None  # RateLimit admits it; the 402 is Budget's to answer
    assert isinstance(c.reserve_result, BudgetRefusal) and c.reservation is None
    [judged] = asyncio.run(send(rt, [chat()], with_budget=True))
    assert judged.response.status_code == 402
    assert judged.response.json()["error"] == "budget_exceeded"
    assert ctx_of(judged).reserve_result is None  # taken by Budget


def test_a_rate_limited_request_reserves_nothing(tctx, runtime):
    rt = runtime(config(rpm=1, budget=10.0))
    flows = asyncio.run(send(rt, [chat(), chat()], with_budget=True))
    assert statuses(flows) == [None, 429]
    limited = ctx_of(flows[1])
    assert limited.reservation is None and limited.reserve_result is None
    assert limited.estimate_usd == 0.0  # an unreserved request audits no estimate
    assert rt.ledger.status(USER, 10.0).reserved_usd == pytest.approx(ctx_of(flows[0]).estimate_usd)


def test_a_local_model_is_limited_but_reserves_nothing(tctx, runtime):
    cfg = config(rpm=1)  # candela-server routes to Ollama only where providers: configures it
    cfg["providers"] = {**cfg["providers"], "ollama": {"base_url": "http://127.0.0.1:11434"}}
    rt = runtime(cfg)
    flows = asyncio.run(send(rt, [chat("llama3.2", "/proxy/ollama/api/chat") for _ in range(2)]))
    assert statuses(flows) == [None, 429]
    assert ctx_of(flows[0]).reservation is None and ctx_of(flows[0]).reserve_result is None


def large_chat():
    pad = "x " * 200_000  # over LARGE_BODY_BYTES
    body = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": pad}]}
    return make_flow("/proxy/openai/v1/chat/completions", body, headers=ALICE)


def test_a_large_body_is_rate_limited_from_its_head_before_it_is_parsed(tctx, runtime, monkeypatch):
    from candela_mitm.addons import router

    parsed: list[int] = []
    real_loads = router.json.loads
    monkeypatch.setattr(router.json, "loads", lambda raw: parsed.append(len(raw)) or real_loads(raw))
    rt = runtime(config(rpm=1))
    first, second = large_chat(), large_chat()
    addons = [Router(rt), Auth(rt), RateLimit(rt)]
    asyncio.run(run_hooks(addons, first, "requestheaders"))
    assert first.response is None and ctx_of(first).rate_decided  # counted from the head
    asyncio.run(run_hooks(addons, first, "request"))
    assert first.response is None and ctx_of(first).plan is not None  # not counted twice
    assert ctx_of(first).scan is not None and ctx_of(first).scan.chars >= 400_000  # off the loop
    asyncio.run(run_hooks(addons, second, "requestheaders", "request"))
    assert second.response.status_code == 429 and second.response.json()["error"] == "rate_limited"
    assert len([n for n in parsed if n > 100_000]) == 1  # the refused one's body was never parsed


def test_a_small_body_is_rate_limited_with_its_reservation(tctx, runtime):
    rt = runtime(config(rpm=5))
    f = chat()
    asyncio.run(send(rt, [f]))
    assert not ctx_of(f).rate_decided and ctx_of(f).scan is None
