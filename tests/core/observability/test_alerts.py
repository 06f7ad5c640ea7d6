"""The alert notifier: settlements looked at off the request path, webhooks posted with retry and
backoff against a real local receiver, every outcome audited, the utilisation gauge bounded."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.audit.actions import BUDGET_ALERT
from candela_mitm.audit.query import query_entries
from candela_mitm.audit.writer import AuditWriter
from candela_mitm.config import Alerts, Audit, Webhook, parse_config
from candela_mitm.errors import ConfigError, StoreUnavailable
from candela_mitm.governance.ledger import KeyBudget, Ledger, Reservation
from candela_mitm.governance.periods import BudgetPeriod
from candela_mitm.observability.alerts import AlertNotifier
from candela_mitm.observability.metrics import Metrics
from candela_mitm.state.ports import StateStore
from tests.fakes.webhook import WebhookReceiver
from tests.wait import until

NOW = datetime.now(UTC)
SECRET = "hook-secret-4f1c"


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditWriter]:
    w = AuditWriter(Audit(sqlite_path=str(tmp_path / "audit.db")))
    w.start()
    yield w
    w.close()


def alerts_config(*hooks: dict[str, Any], **kw: Any) -> Alerts:
    return Alerts(webhooks=list(hooks), initial_backoff_s=0.05, max_backoff_s=0.2, **kw)


def spend(store: StateStore, usd: float, budget: float = 10.0, tenant: str | None = None,
          tenant_budget: float | None = None) -> Reservation:
    ledger = Ledger(store)
    res = ledger.reserve("alice", tenant, 0.0, budget, "req", tenant_budget_usd=tenant_budget,
                         tenant_period=BudgetPeriod("monthly"))
    assert isinstance(res, Reservation)
    assert ledger.settle(res, usd, 1, 1, "gpt-4o", "openai").applied
    return res


def entries(audit: AuditWriter, tmp_path: Path) -> list[dict[str, Any]]:
    assert audit.flush(10)
    return query_entries(tmp_path / "audit.db", action=BUDGET_ALERT, limit=100)[::-1]


def metric(m: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_a_failing_webhook_is_retried_with_backoff_then_audited_as_sent(
    store: StateStore, audit: AuditWriter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    m = Metrics()
    with WebhookReceiver(statuses=[500, 503]) as flaky, WebhookReceiver() as slack:
        cfg = alerts_config(
            {"url": flaky.url + "/hook", "headers": {"Authorization": f"Bearer {SECRET}"}},
            {"url": slack.url + "/services/T0/B0/" + SECRET, "format": "slack"},
            thresholds=[80],
        )
        n = AlertNotifier(store, audit, m, lambda: cfg)
        try:
            n.settled(spend(store, 8.5))
            posts = flaky.wait_for(lambda p: len(p) == 3)
            (slack_post,) = slack.wait_for(lambda p: len(p) == 1)
            assert n.flush(10)
        finally:
            n.close()
    assert [p.status for p in posts] == [500, 503, 200]
    # the waits between attempts double: 0.05 s, then 0.1 s (lower bounds, never a speed)
    assert posts[1].at - posts[0].at >= 0.05 and posts[2].at - posts[1].at >= 0.1
    assert all(p.headers["authorization"] == f"Bearer {SECRET}" for p in posts)
    body = posts[-1].body
    assert {k: body[k] for k in ("scope", "id", "tenant", "period", "threshold", "spent_usd",
                                 "budget_usd")} == {
        "scope": "user", "id": "alice", "tenant": None, "period": "daily", "threshold": 80,
        "spent_usd": 8.5, "budget_usd": 10.0,
    }
    assert body["resets_at"].endswith("T00:00:00Z") and body["period_start"].endswith("T00:00:00Z")
    assert set(slack_post.body) == {"text", "blocks"} and "80%" in slack_post.body["text"]
    sent = entries(audit, tmp_path)
    assert sorted((e["fields"]["webhook"], e["fields"]["attempts"], e["fields"]["outcome"])
                  for e in sent) == [("0:127.0.0.1", 3, "sent"), ("1:127.0.0.1", 1, "sent")]
    assert sent[0]["user_id"] == "alice" and sent[0]["fields"]["threshold"] == 80
    assert metric(m, "candela_budget_alerts_total", {"outcome": "sent"}) == 2
    # the header's value and the Slack URL's secret path are in no log line nor audit entry
    assert SECRET not in caplog.text
    assert SECRET.encode() not in (tmp_path / "audit.db").read_bytes()


def test_a_webhook_that_never_answers_well_is_given_up_and_audited(
    store: StateStore, audit: AuditWriter, tmp_path: Path
) -> None:
    m = Metrics()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/x"
    with WebhookReceiver(statuses=[500] * 10) as failing:
        cfg = alerts_config({"url": failing.url}, {"url": dead}, thresholds=[50], max_attempts=3)
        n = AlertNotifier(store, audit, m, lambda: cfg)
        try:
            n.settled(spend(store, 6.0))
            assert n.flush(20)
        finally:
            n.close()
        assert [p.status for p in failing.posts] == [500, 500, 500]
    got = {e["fields"]["webhook"].split(":")[0]: e["fields"] for e in entries(audit, tmp_path)}
    assert (got["0"]["outcome"], got["0"]["attempts"], got["0"]["result"]) == ("failed", 3, "http 500")
    assert (got["1"]["outcome"], got["1"]["attempts"], got["1"]["result"]) == ("failed", 3, "URLError")
    assert metric(m, "candela_budget_alerts_total", {"outcome": "failed"}) == 2


def test_two_processes_on_one_store_send_each_alert_once(
    backend: Any, audit: AuditWriter, tmp_path: Path
) -> None:
    a, b = backend.open(), backend.open()
    with WebhookReceiver() as hook:
        cfg = alerts_config({"url": hook.url})
        na = AlertNotifier(a, audit, Metrics(), lambda: cfg)
        nb = AlertNotifier(b, audit, Metrics(), lambda: cfg)
        try:
            for i in range(12):  # 12 x 1.0 of 10: every threshold, each seen by both
                res = spend(a if i % 2 else b, 1.0, tenant="t", tenant_budget=20.0)
                na.settled(res)
                nb.settled(res)
            assert na.flush(10) and nb.flush(10)
        finally:
            na.close()
            nb.close()
        got = sorted((p.body["scope"], p.body["threshold"]) for p in hook.posts)
    assert got == [("tenant", 50), ("user", 50), ("user", 80), ("user", 90), ("user", 100)]


def test_without_webhooks_nothing_is_claimed_and_the_gauge_is_bounded(
    store: StateStore, audit: AuditWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import candela_mitm.observability.alerts as mod

    monkeypatch.setattr(mod, "MAX_GAUGE_IDS", 1)
    m = Metrics()
    n = AlertNotifier(store, audit, m, lambda: Alerts(), known=lambda scope, i: i != "mallory")
    try:
        n.settled(spend(store, 9.0, tenant="t", tenant_budget=30.0))
        assert n.flush(10)
        gauge = "candela_budget_utilization"
        assert metric(m, gauge, {"scope": "user", "id": "alice"}) == pytest.approx(0.9)
        assert metric(m, gauge, {"scope": "tenant", "id": "t"}) == pytest.approx(0.3)
        # an identity nobody enrolled never gets a series; past the cap neither does anyone
        ledger = Ledger(store)
        for user in ("mallory", "bob"):
            res = ledger.reserve(user, None, 0.0, 10.0, "r")
            assert isinstance(res, Reservation)
            ledger.settle(res, 1.0, 1, 1, "gpt-4o", "openai")
            n.settled(res)
        assert n.flush(10)
        assert metric(m, gauge, {"scope": "user", "id": "mallory"}) is None
        assert metric(m, gauge, {"scope": "user", "id": "bob"}) is None
    finally:
        n.close()
    assert entries(audit, tmp_path) == []
    # nothing was claimed: a notifier with a webhook still sends alice's 50% and 80%
    with WebhookReceiver() as hook:
        cfg = alerts_config({"url": hook.url}, thresholds=[50, 80])
        n2 = AlertNotifier(store, audit, Metrics(), lambda: cfg)
        try:
            n2.settled(spend(store, 0.0))
            assert n2.flush(10)
        finally:
            n2.close()
        assert sorted(p.body["threshold"] for p in hook.posts) == [50, 80]


def test_a_keys_budget_is_alerted_audited_and_gauged_under_scope_key(
    store: StateStore, audit: AuditWriter, tmp_path: Path
) -> None:
    m = Metrics()
    ledger = Ledger(store)
    key = KeyBudget("k_pub1", "k_pub1", 1.0)
    with WebhookReceiver() as hook, WebhookReceiver() as slack:
        cfg = alerts_config({"url": hook.url}, {"url": slack.url, "format": "slack"})
        n = AlertNotifier(store, audit, m, lambda: cfg, known=lambda scope, i: i != "k_unknown")
        try:
            res = ledger.reserve("alice", None, 0.0, 10.0, "req", key_budget=key)
            assert isinstance(res, Reservation)
            assert ledger.settle(res, 0.6, 1, 1, "gpt-4o", "openai").applied
            n.settled(res)
            assert n.flush(10)
            # a key the gauge does not know: its alert is sent, no series is added
            other = ledger.reserve("alice", None, 0.0, 10.0, "req",
                                   key_budget=KeyBudget("k_unknown", "k_unknown", 1.0))
            assert isinstance(other, Reservation)
            assert ledger.settle(other, 0.5, 1, 1, "gpt-4o", "openai").applied
            n.settled(other)
            assert n.flush(10)
        finally:
            n.close()
        bodies = [p.body for p in hook.posts]
        slack_texts = [p.body["text"] for p in slack.posts]
    # the user's 1.1 of 10 is under every threshold: two key alerts, one per key
    assert sorted((b["scope"], b["id"], b["user_id"], b["threshold"]) for b in bodies) == [
        ("key", "k_pub1", "alice", 50), ("key", "k_unknown", "alice", 50)
    ]
    assert sorted(slack_texts)[0].startswith("API key k_pub1 of user alice has used 50%")
    gauge = "candela_budget_utilization"
    assert metric(m, gauge, {"scope": "key", "id": "k_pub1"}) == pytest.approx(0.6)
    assert metric(m, gauge, {"scope": "key", "id": "k_unknown"}) is None
    assert metric(m, gauge, {"scope": "user", "id": "alice"}) == pytest.approx(0.11)
    sent = entries(audit, tmp_path)
    assert len(sent) == 4 and {e["fields"]["outcome"] for e in sent} == {"sent"}
    assert {(e["fields"]["scope"], e["fields"]["scope_id"], e["user_id"]) for e in sent} == {
        ("key", "k_pub1", "alice"), ("key", "k_unknown", "alice")
    }


def test_settled_never_raises_nor_waits_on_a_broken_store(
    store: StateStore, audit: AuditWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = Metrics()
    res = spend(store, 9.0)

    def down(*args: object) -> None:
        raise StoreUnavailable("the state store is down")

    monkeypatch.setattr(store, "day_totals", down)
    with WebhookReceiver() as hook:
        cfg = alerts_config({"url": hook.url})
        n = AlertNotifier(store, audit, m, lambda: cfg)
        try:
            n.settled(res)
            assert n.flush(10)
        finally:
            n.close()
        n.settled(res)  # after close: ignored
        assert hook.posts == []
    assert metric(m, "candela_observability_errors_total", {"component": "alerts"}) == 1


def test_a_full_queue_fails_the_alert_at_once(
    store: StateStore, audit: AuditWriter, tmp_path: Path
) -> None:
    entered, release = threading.Event(), threading.Event()
    posted: list[int] = []

    def stuck_post(hook: Webhook, body: bytes, timeout_s: float) -> int:
        entered.set()
        release.wait(20)
        posted.append(json.loads(body)["threshold"])
        return 204

    cfg = alerts_config({"url": "http://127.0.0.1:9/never"}, queue_max=1)
    n = AlertNotifier(store, audit, Metrics(), lambda: cfg, post=stuck_post)
    try:
        n.settled(spend(store, 6.0))  # 50%: the sender takes it and is stuck posting it
        assert entered.wait(10)
        n.settled(spend(store, 2.5))  # 85%: waits in the queue, now full
        deadline = time.monotonic() + 30
        while len(n._deliveries) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        n.settled(spend(store, 1.0))  # 95%: no room, failed at once
        deadline = time.monotonic() + 30
        while not entries(audit, tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        assert n.flush(10)
    finally:
        release.set()
        n.close()
    got = [(e["fields"]["threshold"], e["fields"]["outcome"], e["fields"]["result"])
           for e in entries(audit, tmp_path)]
    assert got == [(90, "failed", "queue_full"), (50, "sent", "http 204"), (80, "sent", "http 204")]
    assert posted == [50, 80]


def test_past_max_pending_budgets_a_settlement_is_dropped_and_counted(
    store: StateStore, audit: AuditWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import candela_mitm.observability.alerts as mod

    monkeypatch.setattr(mod, "MAX_PENDING", 1)
    looking, go = threading.Event(), threading.Event()

    def slow_known(scope: str, ident: str) -> bool:
        looking.set()
        go.wait(10)  # the checker is busy with the first budget meanwhile
        return True

    m = Metrics()
    n = AlertNotifier(store, audit, m, lambda: Alerts(), known=slow_known)
    try:
        n.settled(spend(store, 1.0))  # alice: taken by the checker
        assert looking.wait(10)
        ledger = Ledger(store)
        for user in ("bob", "carol"):
            res = ledger.reserve(user, None, 0.0, 10.0, "r")
            assert isinstance(res, Reservation)
            n.settled(res)  # bob waits; carol finds no room
        n.settled(res)  # carol again: still no room, counted again
        assert metric(m, "candela_budget_alerts_total", {"outcome": "dropped"}) == 2
        go.set()
        assert n.flush(10)
    finally:
        go.set()
        n.close()
    gauge = "candela_budget_utilization"
    assert metric(m, gauge, {"scope": "user", "id": "bob"}) == 0.0
    assert metric(m, gauge, {"scope": "user", "id": "carol"}) is None


def test_the_gauge_falls_to_zero_when_its_period_ends(
    store: StateStore, audit: AuditWriter
) -> None:
    from datetime import timedelta

    now = [datetime.now(UTC)]
    m = Metrics()
    n = AlertNotifier(store, audit, m, lambda: Alerts(), clock=lambda: now[0])
    try:
        n.settled(spend(store, 4.0))
        assert n.flush(10)
        labels = {"scope": "user", "id": "alice"}
        m.render()  # a scrape within the period: as looked at
        assert metric(m, "candela_budget_utilization", labels) == pytest.approx(0.4)
        now[0] += timedelta(days=1)  # the next day: yesterday's spend is not today's
        m.render()
        assert metric(m, "candela_budget_utilization", labels) == 0.0
    finally:
        n.close()


def test_a_post_waiting_for_its_retry_at_shutdown_is_audited_as_failed(
    store: StateStore, audit: AuditWriter, tmp_path: Path
) -> None:
    with WebhookReceiver(statuses=[503] * 5) as hook:
        cfg = Alerts(webhooks=[{"url": hook.url}], thresholds=[50], initial_backoff_s=30)
        n = AlertNotifier(store, audit, Metrics(), lambda: cfg)
        n.settled(spend(store, 5.0))
        hook.wait_for(lambda p: len(p) == 1)
        assert not n.flush(0.2)  # its retry is 30 s away
        n.close(timeout=0.2)
    (entry,) = entries(audit, tmp_path)
    assert (entry["fields"]["outcome"], entry["fields"]["attempts"], entry["fields"]["result"]) == (
        "failed", 1, "shutdown after http 503"
    )


@pytest.mark.parametrize(
    ("alerts", "error"),
    [
        ({"webhooks": [{"url": "ftp://hooks.example/x"}]}, "alerts.webhooks.0.url"),
        ({"webhooks": [{"url": "https:///nohost"}]}, "alerts.webhooks.0.url"),
        ({"webhooks": [{"url": "https://h.example", "format": "teams"}]}, "alerts.webhooks.0.format"),
        ({"webhooks": [{"url": "https://h.example", "headers": {"X-A": "a\r\nb"}}]},
         "alerts.webhooks.0.headers"),
        ({"thresholds": [80, 80]}, "alerts.thresholds"),
        ({"thresholds": [0]}, "alerts.thresholds.0"),
        ({"max_attempts": 0}, "alerts.max_attempts"),
        ({"sms": True}, "alerts.sms"),
    ],
)
def test_alerts_config_is_validated_at_start(alerts: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"alerts": alerts})
    assert f"<config>: {error}:" in str(e.value)


def test_alerts_config_defaults_and_order() -> None:
    cfg = parse_config({"alerts": {"thresholds": [100, 50], "webhooks": [
        {"url": "https://hooks.slack.com/services/x", "format": "slack"}]}}).alerts
    assert cfg.thresholds == [50, 100] and cfg.webhooks[0].headers == {}
    assert parse_config({}).alerts.thresholds == [50, 80, 90, 100]


def test_settlements_between_two_looks_coalesce_into_one_look_per_budget(
    store: StateStore, audit: AuditWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[float] = []
    real = store.day_totals

    def counted(*args: Any, **kw: Any) -> Any:
        reads.append(time.monotonic())
        return real(*args, **kw)

    monkeypatch.setattr(store, "day_totals", counted)
    res = spend(store, 1.0)
    n = AlertNotifier(store, audit, Metrics(), lambda: Alerts(), check_interval_s=0.4)
    try:
        n.settled(res)  # looked at by the checker at its next tick
        # the first look, whole: waited for until the checker is idle again (a fixed 50 ms
        # after its first read could cut a look short on a loaded machine)
        until(lambda: bool(reads) and n._busy == 0, interval=0.005, what="the first look")
        per_look = len(reads)
        assert per_look >= 1
        for _ in range(50):  # within the interval: one pending entry for the budget
            n.settled(res)
        until(lambda: len(reads) >= 2 * per_look, interval=0.005, what="the second look")
        time.sleep(0.6)  # past another interval: nothing else was pending
        assert len(reads) == 2 * per_look
        assert reads[per_look] - reads[0] >= 0.35  # the second look waited for the interval
        n.settled(res)
        assert n.flush(10)  # a flush looks at once, without waiting for the interval
        assert len(reads) == 3 * per_look
    finally:
        n.close()
