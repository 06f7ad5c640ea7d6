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
    asyncio.run(run_hooks([Accounting(rt), Budget(rt)], flow, "responseheaders", "response"))


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
