"""Metrics addon: GET /metrics before authentication, and each proxied request counted once."""

from __future__ import annotations

import asyncio
import re

import pytest
from mitmproxy import http

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.metrics import Metrics
from candela_mitm.addons.modelpolicy import ModelPolicy
from candela_mitm.addons.router import Router

from .conftest import ALICE_KEY, BASE, make_flow, run_hooks

ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}


def scrape(rt, addon=None):
    flow = make_flow("/metrics", method="GET")  # no credential: Prometheus sends none
    asyncio.run(run_hooks([Router(rt), addon or Metrics(rt), Auth(rt)], flow, "requestheaders"))
    return flow


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_metrics_is_served_without_a_credential(tctx, runtime):
    flow = scrape(runtime())
    assert flow.response.status_code == 200
    assert flow.response.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE candela_requests_total counter" in flow.response.text


def test_only_the_metrics_route_is_answered(tctx, runtime):
    rt = runtime()
    flow = make_flow("/metrics/x", method="GET")
    asyncio.run(run_hooks([Router(rt), Metrics(rt)], flow, "requestheaders"))
    assert flow.response is None


def send(rt, metrics, model, hooks=("response",), headers=ALICE):
    flow = make_flow("/proxy/openai/v1/chat/completions", {"model": model}, headers=headers)

    async def main():
        await run_hooks([Router(rt), metrics, Auth(rt), ModelPolicy(rt)], flow, "requestheaders", "request")
        if flow.response is None:  # forwarded: the provider answers 200
            flow.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
            ctx_of(flow).status_code = 200
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
    rt = runtime({**BASE, "governance": {"models": {"allowed": ["gpt-4o-mini"]}}})
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
    rt = runtime()
    metrics = Metrics(rt)
    flow = make_flow("/healthz", method="GET")
    asyncio.run(run_hooks([Router(rt), metrics], flow, "requestheaders", "response"))
    text = scrape(rt, metrics).response.text
    assert sample(text, "candela_requests_total") is None
    assert not ctx_of(flow).counted


def test_a_counting_failure_fails_open(tctx, runtime, monkeypatch):
    rt = runtime()
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

    rt = runtime()
    rt.audit.record("bypass_attempt", reason="provider_port")
    assert rt.audit.flush(10)
    sqlite_threads.clear()
    loop_threads: list[int] = []
    metrics = Metrics(rt)

    async def main():
        loop_threads.append(threading.get_ident())
        flow = make_flow("/metrics", method="GET")
        await run_hooks([Router(rt), metrics], flow, "requestheaders")
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
    rt = runtime()
    release = threading.Event()
    started: list[int] = []

    def stuck():
        started.append(1)
        release.wait(10)

    rt.metrics.on_scrape(stuck)
    metrics = Metrics(rt)

    async def main():
        flows = [make_flow("/metrics", method="GET") for _ in range(3)]
        await asyncio.gather(*(run_hooks([Router(rt), metrics], f, "requestheaders") for f in flows))
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
    rt = runtime()

    def broken():
        raise OSError("disk")

    rt.metrics.on_scrape(broken)
    flow = scrape(rt)
    assert flow.response.status_code == 200
    assert sample(flow.response.text, "candela_observability_errors_total", component="metrics") == 1.0
