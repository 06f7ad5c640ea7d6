"""Metrics addon: GET /metrics for admins, and each proxied request counted once, with bounded labels."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from mitmproxy import http

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.metrics import Metrics
from candela_mitm.addons.modelpolicy import ModelPolicy
from candela_mitm.addons.router import Router

from .conftest import ALICE_KEY, BASE, make_flow, run_hooks

ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
# alice is an admin here: /metrics is served to admins only
ADMIN = {**BASE, "auth": {**BASE["auth"], "admins": ["alice@example.com"]}}


def scrape(rt, addon=None, headers=ALICE):
    flow = metrics_flow(headers)
    asyncio.run(run_hooks([Router(rt), Auth(rt), addon or Metrics(rt)], flow, "requestheaders", "request"))
    return flow


def metrics_flow(headers=ALICE):
    return make_flow("/metrics", method="GET", headers=headers)


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


@pytest.mark.parametrize(
    "cfg, headers, status, error",
    [
        (BASE, {}, 401, "unauthenticated"),  # no credential
        (BASE, ALICE, 403, "forbidden"),  # a developer
    ],
)
def test_metrics_is_refused_to_all_but_admins(tctx, runtime, cfg, headers, status, error):
    flow = scrape(runtime(cfg), headers=headers)
    assert (flow.response.status_code, flow.response.json()["error"]) == (status, error)


def test_metrics_is_served_to_admins(tctx, runtime):
    flow = scrape(runtime(ADMIN))
    assert flow.response.status_code == 200
    assert flow.response.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE candela_requests_total counter" in flow.response.text


def test_only_the_metrics_route_is_answered(tctx, runtime):
    rt = runtime(ADMIN)
    flow = make_flow("/metrics/x", method="GET")
    asyncio.run(run_hooks([Router(rt), Metrics(rt)], flow, "requestheaders"))
    assert flow.response is None


def send(rt, metrics, model, hooks=("response",), headers=ALICE, forwarded=False):
    flow = make_flow("/proxy/openai/v1/chat/completions", {"model": model}, headers=headers)

    async def main():
        await run_hooks([Router(rt), metrics, Auth(rt), ModelPolicy(rt)], flow, "requestheaders", "request")
        if flow.response is None:  # forwarded: the provider answers 200
            flow.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
            ctx_of(flow).status_code = 200
            ctx_of(flow).forwarded = forwarded
        for hook in hooks:
            await run_hooks([metrics], flow, hook)

    asyncio.run(main())
    return flow


@pytest.mark.parametrize(
    "model, headers, status, denial, labelled",
    [
        ("gpt-4o-mini", ALICE, "200", None, "gpt-4o-mini"),
        ("gpt-4o", ALICE, "403", "model_not_allowed", "gpt-4o"),
        # refused at the headers, before the body was read: no model is known
        ("gpt-4o-mini", {}, "401", "unauthenticated", ""),
    ],
)
def test_a_proxied_request_is_counted_once(
    tctx, runtime, model, headers, status, denial, labelled
):
    rt = runtime({**ADMIN, "governance": {"models": {"allowed": ["gpt-4o-mini"]}}})
    metrics = Metrics(rt)
    send(rt, metrics, model, hooks=("response", "error"), headers=headers)  # both: counted once
    text = scrape(rt, metrics).response.text
    tenant = "research-team" if headers else ""
    assert sample(text, "candela_requests_total", provider="openai", model=labelled, tenant=tenant,
                  status=status) == 1.0
    if denial:
        assert sample(text, "candela_denials_total", error=denial) == 1.0
    else:
        assert sample(text, "candela_denials_total") is None


def test_candelas_own_routes_are_not_counted(tctx, runtime):
    rt = runtime(ADMIN)
    metrics = Metrics(rt)
    flow = make_flow("/healthz", method="GET")
    asyncio.run(run_hooks([Router(rt), metrics], flow, "requestheaders", "response"))
    text = scrape(rt, metrics).response.text
    assert sample(text, "candela_requests_total") is None
    assert not ctx_of(flow).counted


def test_a_counting_failure_fails_open(tctx, runtime, monkeypatch):
    rt = runtime(ADMIN)
    metrics = Metrics(rt)

    def broken(*values):
        raise ValueError("label")

    monkeypatch.setattr(rt.metrics.requests, "labels", broken)
    flow = send(rt, metrics, "gpt-4o-mini")
    assert flow.response.status_code == 200  # the request is untouched
    assert sample(scrape(rt, metrics).response.text, "candela_observability_errors_total",
                  component="metrics") == 1.0


# --- the scrape's refresh (it reads the audit ledger) runs off the event loop ------------------


@pytest.fixture
def sqlite_threads(monkeypatch):
    """The threads that open an SQLite connection while the test runs."""
    import sqlite3
    import threading

    seen: list[int] = []
    real = sqlite3.connect

    def connect(*args, **kwargs):
        seen.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    return seen


def test_the_scrape_reads_the_audit_ledger_on_a_worker_thread(tctx, runtime, sqlite_threads):
    import threading

    rt = runtime(ADMIN)
    metrics = Metrics(rt)
    scrape(rt, metrics)  # Auth's state store connection is opened (on the loop: a store call)
    rt.audit.record("bypass_attempt", reason="provider_port")
    assert rt.audit.flush(10)
    sqlite_threads.clear()
    loop_threads: list[int] = []

    async def main():
        loop_threads.append(threading.get_ident())
        flow = metrics_flow()
        await run_hooks([Router(rt), Auth(rt), metrics], flow, "requestheaders", "request")
        return flow

    flow = asyncio.run(main())
    # the new ledger entry is counted in this very scrape: the refresh ran, and was waited for
    assert sample(flow.response.text, "candela_bypass_attempts_total", kind="provider_port") == 1.0
    assert sqlite_threads, "the refresh read the ledger"
    assert loop_threads[0] not in sqlite_threads  # never on the event loop's thread


def test_a_stuck_refresh_does_not_hold_up_scrapes(tctx, runtime, monkeypatch):
    """Bounded: one refresh at a time, shared by the scrapes meanwhile; each waits at most
    REFRESH_TIMEOUT_S and answers with the values it has (fail open, counted)."""
    import threading

    from candela_mitm.addons import metrics as metrics_addon

    monkeypatch.setattr(metrics_addon, "REFRESH_TIMEOUT_S", 0.05)
    rt = runtime(ADMIN)
    release = threading.Event()
    started: list[int] = []

    def stuck():
        started.append(1)
        release.wait(10)

    rt.metrics.on_scrape(stuck)
    metrics = Metrics(rt)

    async def main():
        flows = [metrics_flow() for _ in range(3)]
        await asyncio.gather(
            *(run_hooks([Router(rt), Auth(rt), metrics], f, "requestheaders", "request") for f in flows)
        )
        return flows

    try:
        flows = asyncio.run(main())
    finally:
        release.set()
    assert [f.response.status_code for f in flows] == [200, 200, 200]
    assert started == [1]  # one refresh for the three scrapes
    text = flows[0].response.text
    assert "candela_requests_total" in text
    errors_counted = sample(rt.metrics.exposition()[0].decode(), "candela_observability_errors_total",
                            component="metrics")
    assert errors_counted == 3.0


def test_a_failing_refresh_fails_open(tctx, runtime):
    rt = runtime(ADMIN)

    def broken():
        raise OSError("disk")

    rt.metrics.on_scrape(broken)
    flow = scrape(rt)
    assert flow.response.status_code == 200
    assert sample(flow.response.text, "candela_observability_errors_total", component="metrics") == 1.0


# --- label values a client chose ---------------------------------------------------------------


def test_a_junk_provider_and_a_non_utf8_path_never_break_a_scrape(tctx, runtime):
    rt = runtime(ADMIN)
    metrics = Metrics(rt)
    for path in (f"/proxy/nowhere-{i}/v1/x" for i in range(50)):
        flow = make_flow(path, {"model": "gpt-4o-mini"}, headers=ALICE)
        asyncio.run(run_hooks([Router(rt), Auth(rt), metrics], flow, "requestheaders", "request",
                              "response"))
        assert flow.response.status_code == 404
    raw = make_flow("/proxy/x/v1/chat", {"model": "m"}, headers=ALICE)
    raw.request.data.path = b"/proxy/\xff\xfe/v1/chat"  # a raw non-UTF-8 byte, as sent
    asyncio.run(run_hooks([Router(rt), Auth(rt), metrics], raw, "requestheaders", "request",
                          "response"))
    flow = scrape(rt, metrics)
    assert flow.response.status_code == 200
    text = flow.response.text
    assert sample(text, "candela_requests_total", provider="unknown", status="404") == 51.0
    assert "nowhere" not in text


def test_an_unknown_model_is_labelled_other(tctx, runtime):
    rt = runtime({**ADMIN, "governance": {"unknown_model_price": "zero"}})
    metrics = Metrics(rt)
    send(rt, metrics, "no-such-model")
    send(rt, metrics, "gpt-4o-mini")
    text = scrape(rt, metrics).response.text
    assert sample(text, "candela_requests_total", provider="openai", model="other") == 1.0
    assert sample(text, "candela_requests_total", provider="openai", model="gpt-4o-mini") == 1.0


def test_bounded_labels():
    from candela_mitm.observability.metrics import BoundedLabel, safe_label

    label = BoundedLabel(limit=2)
    assert [label(v) for v in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
    assert safe_label("x\udcffy").encode("utf-8") == b"x\\udcffy"
    assert len(safe_label("z" * 1000)) == 128


def test_unauthenticated_refusals_are_counted_on_every_route(tctx, runtime):
    rt = runtime(ADMIN)
    metrics = Metrics(rt)
    for path in ("/admin/v1/me", "/proxy/openai/v1/chat/completions", "/metrics"):
        flow = make_flow(path, {"model": "gpt-4o-mini"}, headers={})
        asyncio.run(run_hooks([Router(rt), Auth(rt), metrics], flow, "requestheaders", "request",
                              "response"))
        assert flow.response.status_code == 401
    text = scrape(rt, metrics).response.text
    assert sum(sample(text, "candela_unauthenticated_total", route=r) or 0
               for r in ("admin", "proxy", "metrics")) == 3.0


def test_the_audit_logs_fsyncs_are_shown_at_each_scrape(tctx, runtime):
    """audit.durability process_crash: a failed fsync of the log is counted and the age of the
    oldest commit not yet on the disk shown; once a sync succeeds it is back to 0."""
    rt = runtime(ADMIN)
    metrics = Metrics(rt)
    w = rt.audit
    calls = []

    def failing_sync() -> None:
        calls.append(1)
        raise OSError(5, "Input/output error")

    w._sync = failing_sync
    w._commits, w._unsynced_at = 1, time.monotonic() - 30  # a commit 30 s ago, never synced
    w._sync_log()  # (the writer thread may try too: it fails the same way)
    text = scrape(rt, metrics).response.text
    errors = re.search(r"^candela_audit_sync_errors (\S+)$", text, re.M)
    unsynced = re.search(r"^candela_audit_unsynced_seconds (\S+)$", text, re.M)
    assert calls and errors is not None and float(errors.group(1)) >= 1
    assert unsynced is not None and float(unsynced.group(1)) > 0
    w._sync = lambda: None
    w._sync_log()
    text = scrape(rt, metrics).response.text
    assert "candela_audit_unsynced_seconds 0.0" in text
    after = re.search(r"^candela_audit_sync_errors (\S+)$", text, re.M)
    assert after is not None and float(after.group(1)) >= float(errors.group(1))


def test_a_requests_labels_are_remembered_until_the_prices_change_and_bounded(
    tctx, runtime, monkeypatch
):
    # Metrics remembers each (provider, model, tenant, status)'s labels and children: a new
    # price table (a reload) decides again which models are known; past the bound a request's
    # labels are made for it alone; a shape makes no series before it counts into one
    import candela_mitm.addons.metrics as addon
    from candela_mitm.config import parse_config
    from candela_mitm.providers.pricing import PricingTable

    cfg = {**ADMIN, "governance": {"unknown_model_price": "zero",
                                   "models": {"allowed": ["my-model", "gpt-4o-mini"]}}}  # fmt: skip
    rt = runtime(cfg)
    metrics = Metrics(rt)
    send(rt, metrics, "my-model")
    send(rt, metrics, "gpt-4o")  # refused by the policy: counted, never charged
    rt.pricing = PricingTable.from_config(
        parse_config({**cfg, "pricing": {"my-model": {"input": 1.0, "output": 2.0,
                                                      "provider": "openai"}}})  # fmt: skip
    )
    send(rt, metrics, "my-model")
    monkeypatch.setattr(addon, "SHAPES_KEPT", len(metrics._shapes))
    send(rt, metrics, "gpt-4o-mini", forwarded=True)
    send(rt, metrics, "gpt-4o-mini", forwarded=True)
    text = scrape(rt, metrics).response.text
    one = {"provider": "openai", "tenant": "research-team"}
    assert sample(text, "candela_requests_total", model="other", status="200", **one) == 1.0
    assert sample(text, "candela_requests_total", model="my-model", status="200", **one) == 1.0
    assert sample(text, "candela_requests_total", model="gpt-4o", status="403", **one) == 1.0
    assert sample(text, "candela_requests_total", model="gpt-4o-mini", **one) == 2.0
    assert sample(text, "candela_tokens_total", model="gpt-4o-mini", direction="input") == 0.0
    assert sample(text, "candela_cost_usd_total", model="gpt-4o") is None
    assert sample(text, "candela_tokens_total", model="gpt-4o") is None
    assert ("openai", "gpt-4o-mini", "research-team", "200") not in metrics._shapes
