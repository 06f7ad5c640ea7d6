"""Issue 19 end to end: budget threshold alerts, once each, from two proxies sharing one store."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import requests

from candela_mitm.audit.query import query_entries
from candela_mitm.config import parse_config
from candela_mitm.governance.estimate import estimate_cost
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage
from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import FakeUpstream
from tests.fakes.webhook import WebhookReceiver

from .conftest import ADMIN_KEY, ALICE_KEY, base_config, candela_env

pytestmark = pytest.mark.e2e
CHAT = "/proxy/openai/v1/chat/completions"
SECRET = "whsec-e2e-7d1"
N = 200


@pytest.fixture(autouse=True)
def _reset(upstream: FakeUpstream):
    upstream.reset()
    upstream.clear()
    yield
    upstream.reset()


def test_exactly_one_80_percent_alert_under_200_concurrent_requests_on_two_proxies(
    tmp_path, upstream, token_server
):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    usage = Usage(input_tokens=1000, output_tokens=1000)
    price = PricingTable.from_config(parse_config({})).get("gpt-4o-mini")
    assert price is not None
    cost = price.cost(usage)
    assert estimate_cost(body, 1000, 4096, price) <= cost  # N reservations at once always fit
    # all N requests together spend 85% of the user's day and of the tenant's month
    budget = N * cost / 0.85
    upstream.configure(latency_s=0.2, usage=usage)
    with WebhookReceiver() as hook, WebhookReceiver() as slack:
        cfg = base_config(
            upstream.url,
            users={"alice@example.com": {"tenants": ["t"], "daily_budget_usd": budget,
                                         "requests_per_minute": 100_000}},
            governance={"tenants": {"t": {"budget_usd": budget, "period": "monthly"}}},
            alerts={"webhooks": [
                {"url": hook.url + "/candela", "headers": {"Authorization": f"Bearer {SECRET}"}},
                {"url": slack.url + "/services/T1/B1/" + SECRET, "format": "slack"},
            ]},
        )
        env = candela_env(token_server, tmp_path)
        with CandelaProcess(tmp_path, cfg, env=env) as a, CandelaProcess(tmp_path, cfg, env=env) as b:
            start = threading.Barrier(N)
            codes: list[int] = []

            def one(i: int) -> None:
                proxy = a if i % 2 else b
                start.wait()
                r = requests.post(proxy.url + CHAT, json=body, timeout=60,
                                  headers={"Authorization": f"Bearer {ALICE_KEY}"})
                codes.append(r.status_code)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
            [t.start() for t in threads]
            [t.join(120) for t in threads]
            assert codes == [200] * N
            assert len(upstream.requests) == N

            # 50% and 80% of both budgets, nothing above: 4 alerts to each webhook
            posts = hook.wait_for(lambda p: len(p) >= 4)
            slack_posts = slack.wait_for(lambda p: len(p) >= 4)
            # every alert is audited once sent: 8 entries mean both proxies have nothing left
            # to send; anything a second proxy sent twice would be among them
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                sent = query_entries(tmp_path / "audit.db", action="budget_alert", limit=100)
                if len(sent) >= 8:
                    break
                time.sleep(0.1)
            time.sleep(1.0)  # a duplicate would come right after: give it the time to arrive
            posts, slack_posts = list(hook.posts), list(slack.posts)
            sent = query_entries(tmp_path / "audit.db", action="budget_alert", limit=100)

            # one more request through `a`: its look then sees every settlement of both proxies
            r = requests.post(a.url + CHAT, json=body, timeout=60,
                              headers={"Authorization": f"Bearer {ALICE_KEY}"})
            assert r.status_code == 200
            want = (N + 1) * cost / budget  # 85.4%: still short of 90
            gauge: list[str] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                metrics = requests.get(a.url + "/metrics", timeout=5,
                                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
                gauge = [line for line in metrics.splitlines() if line.startswith(
                    'candela_budget_utilization{id="alice@example.com",scope="user"}')]
                if gauge and float(gauge[0].split()[-1]) == pytest.approx(want, rel=1e-6):
                    break
                time.sleep(0.1)
            log = a.log() + b.log()

    by_threshold = Counter((p.body["scope"], p.body["threshold"]) for p in posts)
    assert by_threshold == {("user", 50): 1, ("user", 80): 1, ("tenant", 50): 1, ("tenant", 80): 1}
    (user80,) = [p for p in posts if p.body["scope"] == "user" and p.body["threshold"] == 80]
    assert user80.path == "/candela" and user80.headers["authorization"] == f"Bearer {SECRET}"
    assert user80.body["id"] == "alice@example.com" and user80.body["tenant"] == "t"
    assert user80.body["period"] == "daily" and user80.body["budget_usd"] == pytest.approx(budget)
    assert 0.8 * budget <= user80.body["spent_usd"] <= 0.85 * budget + 1e-9
    (tenant80,) = [p for p in posts if p.body["scope"] == "tenant" and p.body["threshold"] == 80]
    assert tenant80.body["period"] == "monthly" and tenant80.body["period_start"].endswith("-01T00:00:00Z")

    # the Slack receiver: the same four, in an incoming webhook's shape
    assert len(slack_posts) == 4
    for p in slack_posts:
        assert set(p.body) == {"text", "blocks"} and p.path.startswith("/services/T1/B1/")
        assert p.body["blocks"][0]["type"] == "header"
    assert sum("has used 80% of its" in p.body["text"] for p in slack_posts) == 2

    assert len(sent) == 8 and {e["fields"]["outcome"] for e in sent} == {"sent"}
    assert Counter(e["fields"]["threshold"] for e in sent) == {50: 4, 80: 4}
    assert SECRET not in log
    assert len(gauge) == 1 and float(gauge[0].split()[-1]) == pytest.approx(want, rel=1e-6)
    assert 'candela_budget_utilization{id="t",scope="tenant"}' in metrics


def test_a_minted_key_with_a_small_budget_crossing_50_percent_gets_exactly_one_key_alert(
    tmp_path, upstream, token_server
):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    usage = Usage(input_tokens=1000, output_tokens=1000)
    price = PricingTable.from_config(parse_config({})).get("gpt-4o-mini")
    assert price is not None
    cost = price.cost(usage)
    budget = cost / 0.6  # one request spends 60% of the key's budget
    assert estimate_cost(body, 1000, 4096, price) <= budget  # its reservation fits
    upstream.configure(usage=usage)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with WebhookReceiver() as hook, WebhookReceiver() as slack:
        cfg = base_config(
            upstream.url,
            users={"alice@example.com": {"tenants": ["t"], "daily_budget_usd": 1000.0}},
            alerts={"webhooks": [{"url": hook.url + "/candela"},
                                 {"url": slack.url + "/services/T1/B1/x", "format": "slack"}]},
        )
        with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
            r = requests.post(c.url + "/admin/v1/keys", headers=admin, timeout=10,
                              json={"user_id": "alice@example.com", "name": "ci",
                                    "budget_usd": budget})
            assert r.status_code == 201, r.text
            key, key_id = r.json()["key"], r.json()["id"]
            r = requests.post(c.url + CHAT, json=body, timeout=30,
                              headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            (post,) = hook.wait_for(lambda p: len(p) >= 1)
            (slack_post,) = slack.wait_for(lambda p: len(p) >= 1)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                sent = query_entries(tmp_path / "audit.db", action="budget_alert", limit=100)
                if len(sent) >= 2:
                    break
                time.sleep(0.1)
            # a request on alice's own key: her $1000 is nowhere near a threshold, nor is the
            # key's row touched; then give a duplicate the time to arrive
            r = requests.post(c.url + CHAT, json=body, timeout=30,
                              headers={"Authorization": f"Bearer {ALICE_KEY}"})
            assert r.status_code == 200
            time.sleep(1.0)
            metrics = requests.get(c.url + "/metrics", timeout=5, headers=admin).text
            posts, slack_posts = list(hook.posts), list(slack.posts)
            sent = query_entries(tmp_path / "audit.db", action="budget_alert", limit=100)
            log = c.log()

    assert len(posts) == 1 and len(slack_posts) == 1
    b = post.body
    assert (b["scope"], b["id"], b["user_id"], b["tenant"], b["threshold"]) == (
        "key", key_id, "alice@example.com", "t", 50
    )
    assert b["budget_usd"] == pytest.approx(budget) and b["spent_usd"] == pytest.approx(cost)
    assert b["period"] == "daily"
    assert slack_post.body["text"].startswith(
        f"API key {key_id} of user alice@example.com has used 50% of its daily budget"
    )
    assert len(sent) == 2 and {(e["fields"]["scope"], e["fields"]["scope_id"]) for e in sent} == {
        ("key", key_id)
    }
    # the key's secret is in no alert, audit entry nor log line
    assert all(key not in json.dumps(p.body) for p in posts + slack_posts)
    assert key.encode() not in (tmp_path / "audit.db").read_bytes() and key not in log
    gauge = [line for line in metrics.splitlines()
             if line.startswith(f'candela_budget_utilization{{id="{key_id}",scope="key"}}')]
    assert len(gauge) == 1 and float(gauge[0].split()[-1]) == pytest.approx(0.6, rel=1e-6)
