"""Issue 3 end to end: identity, tenants, model policy, rate limits, budgets, fail closed."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable

import pytest
import requests

from candela_mitm.audit.query import query_entries
from candela_mitm.config import State, parse_config
from candela_mitm.governance.estimate import estimate_cost
from candela_mitm.governance.ledger import Ledger
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage
from candela_mitm.state import open_state_store
from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import FakeUpstream
from tests.wait import WAIT_S, until

from .conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, base_config, candela_env, sdk_json

pytestmark = pytest.mark.e2e
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
BOB = {"Authorization": f"Bearer {BOB_KEY}"}
CHAT = "/proxy/openai/v1/chat/completions"


def post(c, path, body, headers=ALICE, **kw):
    return requests.post(c.url + path, json=body, headers=headers, timeout=20, **kw)


def ledger_of(c: CandelaProcess) -> Ledger:
    return Ledger(open_state_store(State(sqlite_path=str(c.tmp / "state.db"))))


def audit_rows(c: CandelaProcess, action: str, ok: Callable[[list[dict]], bool]) -> list[dict]:
    """The entries of `action`, once `ok` holds for them: entries are committed by the writer
    thread after the response (waited for: a fixed 0.2 s was short on a loaded machine)."""
    return until(lambda: query_entries(c.tmp / "audit.db", action=action, limit=1000), ok,
                 what=f"{action} entries")


@pytest.fixture(autouse=True)
def _reset(upstream: FakeUpstream):
    upstream.reset()
    upstream.clear()
    yield


@pytest.fixture(scope="module")
def gov(tmp_path_factory, upstream, token_server):
    tmp = tmp_path_factory.mktemp("gov")
    cfg = base_config(
        upstream.url,
        users={
            "alice@example.com": {"tenants": ["research-team", "other-team", "frugal-team"],
                                  "requests_per_minute": 1000},
            "bob@example.com": {"tenants": ["contractor-pool"], "requests_per_minute": 3, "daily_budget_usd": 0.01},
        },
        governance={
            # a slice returned a second after its last use: tests here wait for it
            "budgets": {"default_daily_usd": 1000.0, "default_max_output_tokens": 4096,
                        "slices": {"idle_s": 1.0}},
            "tenants": {"frugal-team": {"budget_usd": 0.001, "period": "monthly"}},
            "models": {
                "mode": "allowlist",
                "allowed": ["gpt-4o-mini", "gemini-2.5-flash", "llama3.2:3b", "mystery-unpriced"],
                "tenants": {
                    "research-team": {"models": {"allowed": ["gpt-4o", "gpt-4o-mini", "gemini-2.5-pro",
                                                             "claude-sonnet-4-20250514", "mystery-unpriced"]}},
                    "contractor-pool": {"models": {"allowed": ["gpt-4o-mini", "llama3.2:3b", "o1-pro"]}},
                },
            },
        },
    )
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp)) as c:
        yield c


def test_model_policy_denial_matches_spec_002(gov, upstream):
    r = post(gov, CHAT, {"model": "gpt-4o", "messages": []}, headers={**ALICE, "X-Candela-Tenant-Id": "other-team"})
    assert r.status_code == 403
    assert r.json() == {
        "error": "model_not_allowed",
        "message": "Model 'gpt-4o' is not in the approved model list for tenant 'other-team'",
        "model": "gpt-4o",
        "tenant_id": "other-team",
        "policy": "allowlist",
    }
    # research-team (alice's first tenant) replaces the global list and allows gpt-4o
    assert post(gov, CHAT, {"model": "gpt-4o", "messages": []}).status_code == 200
    assert len(upstream.requests) == 1

    def of(rows: list[dict], result: str) -> list[dict]:
        return [r["fields"] for r in rows
                if r["fields"]["result"] == result and r["fields"]["model"] == "gpt-4o"]

    rows = audit_rows(gov, "model_policy_check",
                      lambda rows: bool(of(rows, "denied") and of(rows, "allowed")))
    denied, allowed = of(rows, "denied"), of(rows, "allowed")
    assert denied and allowed
    for f in (denied[-1], allowed[-1]):
        assert f["user_id"] == "alice@example.com" and f["policy_mode"] == "allowlist" and f["timestamp"]
    assert denied[-1]["tenant_id"] == "other-team" and allowed[-1]["tenant_id"] == "research-team"
    metrics = requests.get(gov.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5).text
    assert 'candela_policy_model_denied_total{model="gpt-4o",policy="allowlist",tenant="other-team"}' in metrics


@pytest.mark.parametrize(
    "path, body",
    [
        ("/proxy/google/v1beta/models/gemini-3.5-pro:generateContent", {"contents": []}),
        ("/proxy/google/v1beta/models/GEMINI-3.5-PRO:streamGenerateContent?alt=sse", {"contents": []}),
        ("/proxy/anthropic-bedrock/model/anthropic.claude-opus-4-20250514-v1%3A0/invoke", {"max_tokens": 5, "messages": []}),
        ("/proxy/anthropic-vertex/v1/projects/proj/locations/us-east5/publishers/anthropic/models/claude-opus-4@20250514:rawPredict",
         {"max_tokens": 5, "messages": []}),
        ("/v1/chat/completions", {"model": "o1-pro", "messages": []}),
        ("/proxy/anthropic-direct/v1/messages", {"model": "Claude-Opus-4-20250514", "max_tokens": 5, "messages": []}),
    ],
)
def test_model_is_checked_wherever_the_format_puts_it(gov, upstream, path, body):
    r = post(gov, path, body)
    assert r.status_code == 403 and r.json()["error"] == "model_not_allowed", r.text
    assert upstream.requests == []


def test_path_and_body_naming_different_models_is_400(gov, upstream):
    r = post(gov, "/proxy/google/v1beta/models/gemini-2.5-pro:generateContent", {"model": "gemini-2.5-flash"})
    assert r.status_code == 400 and r.json()["error"] == "model_mismatch"
    assert upstream.requests == []


def test_tenant_not_allowed_by_header_and_baggage(gov, upstream):
    r = post(gov, CHAT, {"model": "gpt-4o-mini", "messages": []}, headers={**ALICE, "X-Candela-Tenant-Id": "contractor-pool"})
    assert r.status_code == 403 and r.json()["error"] == "tenant_not_allowed"
    r = post(gov, CHAT, {"model": "gpt-4o-mini", "messages": []},
             headers={**ALICE, "baggage": "candela.tenant_id=contractor-pool"})
    assert r.status_code == 403 and r.json()["error"] == "tenant_not_allowed"
    r = post(gov, CHAT, {"model": "gpt-4o-mini", "messages": []}, headers={**ALICE, "baggage": "candela.tenant_id=other-team"})
    assert r.status_code == 200
    assert len(upstream.requests) == 1 and "baggage" in upstream.requests[0].headers


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer ' OR '1'='1"},
        {"Authorization": "Bearer " + "a" * 10_000},
        {"Authorization": "Basic YWxpY2U6cGFzcw=="},
        {"Authorization": "Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJlbWFpbCI6ImFkbWluQGV4YW1wbGUuY29tIn0."},
        {"x-api-key": "wrong"},
        {"X-Candela-Auth": "Bearer nope", "Authorization": f"Bearer {ALICE_KEY}"},
    ],
)
def test_hostile_or_missing_credentials_are_401(gov, upstream, headers):
    r = requests.post(gov.url + CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=headers, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
    assert upstream.requests == []


def test_nul_byte_credential_on_the_wire_is_401(gov, upstream):
    import socket

    s = socket.create_connection(("127.0.0.1", gov.port))
    body = b'{"model": "gpt-4o-mini", "messages": []}'
    s.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cdl_alice\x00_example_key\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = s.recv(4096).split(b"\r\n", 1)[0]
    s.close()
    assert head.split()[1] == b"401"
    assert upstream.requests == []


def test_sdk_keys_are_accepted_from_each_sdk_header(gov, upstream):
    for headers in ({"x-api-key": ALICE_KEY}, {"x-goog-api-key": ALICE_KEY}, {"X-Candela-Auth": f"Bearer {ALICE_KEY}"}):
        r = post(gov, CHAT, {"model": "gpt-4o-mini", "messages": []}, headers=headers)
        assert r.status_code == 200, r.text
    r = requests.post(gov.url + CHAT + f"?key={ALICE_KEY}", json={"model": "gpt-4o-mini", "messages": []}, timeout=10)
    assert r.status_code == 200
    for rec in upstream.requests:
        assert ALICE_KEY not in json.dumps(rec.headers) and ALICE_KEY not in rec.path


def test_rate_limit_429_with_retry_after(gov, upstream):
    codes = [post(gov, CHAT, {"model": "gpt-4o-mini", "messages": []}, headers=BOB) for _ in range(5)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    denied = codes[3]
    assert denied.status_code == 429
    body = denied.json()
    assert body["error"] == "rate_limited" and body["limit"] == 3 and body["window_resets_at"]
    assert 1 <= int(denied.headers["Retry-After"]) <= 60
    assert len(upstream.requests) == 3


def test_budget_gate_402_before_the_provider(gov, upstream):
    # bob: 0.01 USD a day; o1-pro with 4096 default output tokens at 600/M is ~2.46 USD
    r = post(gov, CHAT, {"model": "o1-pro", "messages": [{"role": "user", "content": "hi"}]},
             headers={**BOB, "X-Candela-Tenant-Id": "contractor-pool"})
    if r.status_code == 429:  # the rate-limit test may have used bob's minute
        time.sleep(int(r.headers["Retry-After"]) + 0.5)
        r = post(gov, CHAT, {"model": "o1-pro", "messages": [{"role": "user", "content": "hi"}]}, headers=BOB)
    assert r.status_code == 402
    b = r.json()
    assert b["error"] == "budget_exceeded" and b["user_id"] == "bob@example.com"
    assert b["budget_usd"] == 0.01 and b["estimated_cost_usd"] > 2.0
    assert set(b) >= {"spent_usd", "remaining_usd", "resets_at"}
    assert upstream.requests == []


def test_tenant_budget_402_names_the_tenant_scope(gov, upstream):
    # alice has 1000 USD a day, her tenant frugal-team 0.001 a month: the tenant refuses
    r = post(gov, CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
             headers={**ALICE, "X-Candela-Tenant-Id": "frugal-team"})
    assert r.status_code == 402
    b = r.json()
    assert b["error"] == "budget_exceeded" and b["scope"] == "tenant" and b["period"] == "monthly"
    assert b["tenant_id"] == "frugal-team" and b["user_id"] == "alice@example.com"
    assert b["budget_usd"] == 0.001 and b["resets_at"].endswith("-01T00:00:00Z")
    assert upstream.requests == []
    # the same request for her other tenant passes: only frugal-team's budget is short
    r = post(gov, CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
             headers={**ALICE, "X-Candela-Tenant-Id": "research-team"})
    assert r.status_code == 200 and len(upstream.requests) == 1


def test_unknown_price_402_and_local_models_never_budget_blocked(gov, upstream):
    r = post(gov, "/proxy/openai/v1/chat/completions", {"model": "mystery-unpriced", "messages": []})
    assert r.status_code == 402 and r.json()["error"] == "model_price_unknown"
    assert upstream.requests == []


def test_streamed_spend_is_settled_to_real_usage(gov, upstream):
    upstream.configure(usage=Usage(input_tokens=1000, output_tokens=100), n_chunks=3)
    led = ledger_of(gov)
    before = led.spent_today("alice@example.com")
    r = post(gov, CHAT, {"model": "gpt-4o-mini", "messages": [], "stream": True})
    assert r.status_code == 200
    want = (1000 * 0.15 + 100 * 0.60) / 1e6
    # recorded after its entry, by the next flush if its hold was carved from a slice
    deadline = time.monotonic() + WAIT_S
    while led.spent_today("alice@example.com") - before < want * 0.999:
        assert time.monotonic() < deadline, "the spend was never recorded"
        time.sleep(0.05)
    time.sleep(0.2)  # nothing more comes
    after = led.spent_today("alice@example.com")
    assert after - before == pytest.approx(want)
    # nothing else is held once the request ended: with budget slices (on by default) the
    # process may hold the unused part of a slice of alice's budget (reserved_usd counts it)
    # until it is returned, idle_s after its last use (30 s by default: this proxy's is 1 s)
    deadline = time.monotonic() + WAIT_S
    while led.status("alice@example.com", 1000.0).reserved_usd > 0:
        assert time.monotonic() < deadline, "a slice was never returned"
        time.sleep(0.1)
    assert led.spent_today("alice@example.com") == after  # returning it charged nothing


def test_client_disconnect_releases_the_reservation(gov, upstream):
    import socket

    upstream.configure(n_chunks=30, chunk_delay_s=0.1)
    s = socket.create_connection(("127.0.0.1", gov.port))
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "stream": True}).encode()
    s.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE_KEY.encode() +
              b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    s.recv(1024)
    led = ledger_of(gov)
    assert led.status("alice@example.com", 1000.0).reserved_usd > 0
    s.close()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and led.status("alice@example.com", 1000.0).reserved_usd > 0:
        time.sleep(0.1)
    assert led.status("alice@example.com", 1000.0).reserved_usd == 0


def _fire(url: str, n: int, barrier, results) -> None:
    import requests as rq

    def one():
        barrier.wait()
        r = rq.post(url + CHAT, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 30}],
                                      "max_tokens": 1000}, headers=ALICE, timeout=30)
        results.append(r.status_code)

    ts = [threading.Thread(target=one) for _ in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]


@pytest.mark.parametrize("scope", ["user", "tenant"])
def test_budget_exact_across_two_processes_sharing_sqlite(tmp_path, upstream, token_server, scope):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 30}], "max_tokens": 1000}
    price = PricingTable.from_config(parse_config({})).get("gpt-4o")
    est = estimate_cost(body, 1000, 4096, price)
    n_fit = 7
    limit = est * n_fit + est / 2
    if scope == "user":
        cfg = base_config(upstream.url, users={"alice@example.com": {"tenants": ["t"], "daily_budget_usd": limit,
                                                                     "requests_per_minute": 1000}})
    else:  # the user could afford all 20: the tenant's weekly budget binds
        cfg = base_config(upstream.url, users={"alice@example.com": {"tenants": ["t"], "daily_budget_usd": 1000.0,
                                                                     "requests_per_minute": 1000}},
                          governance={"tenants": {"t": {"budget_usd": limit, "period": "weekly"}}})
    upstream.configure(latency_s=1.0, usage=Usage(input_tokens=10, output_tokens=10))
    env = candela_env(token_server, tmp_path)
    with CandelaProcess(tmp_path, cfg, env=env) as a, CandelaProcess(tmp_path, cfg, env=env) as b:
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(2)
        mgr = ctx.Manager()
        ra, rb = mgr.list(), mgr.list()

        def proc_fire(url, res):
            return ctx.Process(target=_fire_in_process, args=(url, 10, barrier, res))

        pa, pb = proc_fire(a.url, ra), proc_fire(b.url, rb)
        pa.start(), pb.start()
        pa.join(60), pb.join(60)
        codes = list(ra) + list(rb)
    assert sorted(codes).count(200) == n_fit, codes
    assert sorted(codes).count(402) == 20 - n_fit
    assert len(upstream.requests) == n_fit


def _fire_in_process(url, n, barrier, results):
    local = threading.Barrier(n)
    out: list[int] = []
    barrier.wait()
    _fire(url, n, local, out)
    results.extend(out)


def test_locked_state_store_fails_closed_503(tmp_path, upstream, token_server):
    cfg = base_config(upstream.url, state={"sqlite_path": str(tmp_path / "state.db"), "busy_timeout_ms": 200})
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        assert post(c, CHAT, {"model": "gpt-4o-mini", "messages": []}).status_code == 200
        con = sqlite3.connect(tmp_path / "state.db", timeout=30)  # Candela's own writes may hold it
        con.execute("BEGIN EXCLUSIVE")
        try:
            r = post(c, CHAT, {"model": "gpt-4o-mini", "messages": []})
        finally:
            con.rollback()
            con.close()
        assert r.status_code == 503 and r.json()["error"] == "governance_unavailable"
        assert len(upstream.requests) == 1
        assert post(c, CHAT, {"model": "gpt-4o-mini", "messages": []}).status_code == 200


@pytest.mark.parametrize("how", ["stalled", "stopped"])
def test_a_stalled_or_dead_redis_fails_closed_503(tmp_path, upstream, token_server, redis_server_factory, how):
    """Redis state: an idle user's admission (one script, awaited on the event loop) meets a
    redis-server that no longer answers (SIGSTOP: the connection stays open, the store's timeout
    runs out) or is gone (the connection refused): 503 governance_unavailable, nothing
    forwarded; a stalled one that answers again is used again."""
    server = redis_server_factory()
    cfg = base_config(upstream.url, state={"backend": "redis", "redis_url": server.url, "busy_timeout_ms": 300})
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        assert post(c, CHAT, {"model": "gpt-4o-mini", "messages": []}).status_code == 200
        if how == "stalled":
            os.kill(server.proc.pid, signal.SIGSTOP)
        else:
            server.stop()
        try:
            r = post(c, CHAT, {"model": "gpt-4o-mini", "messages": []})
        finally:
            if how == "stalled":
                os.kill(server.proc.pid, signal.SIGCONT)
        assert r.status_code == 503 and r.json()["error"] == "governance_unavailable"
        assert len(upstream.requests) == 1
        if how == "stalled":
            assert post(c, CHAT, {"model": "gpt-4o-mini", "messages": []}).status_code == 200
            assert len(upstream.requests) == 2


def test_reservations_of_a_killed_process_are_reconciled_at_start(tmp_path, upstream, token_server):
    cfg = base_config(upstream.url)
    env = candela_env(token_server, tmp_path)
    upstream.hang = True
    c = CandelaProcess(tmp_path, cfg, env=env).start()
    def hang():
        try:
            requests.post(c.url + CHAT, json={"model": "gpt-4o", "messages": []}, headers=ALICE, timeout=30)
        except requests.RequestException:
            pass  # the proxy is killed under this request

    t = threading.Thread(target=hang, daemon=True)
    t.start()
    upstream.wait_for(1)
    led = ledger_of(c)
    assert led.status("alice@example.com", 1000.0).reserved_usd > 0
    c.stop(kill=True)
    upstream.hang = False
    c2 = CandelaProcess(tmp_path, cfg, env=env, port=c.port).start()
    try:
        assert led.status("alice@example.com", 1000.0).reserved_usd == 0
    finally:
        c2.stop()


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_sdk_clients_get_402_403_429_as_errors(gov, upstream):
    out = sdk_json(f"""
        import json, openai
        c = openai.OpenAI(base_url="{gov.url}/proxy/openai/v1", api_key="{BOB_KEY}", max_retries=0)
        for model in ("gpt-4o", "o1-pro"):
            try:
                c.chat.completions.create(model=model, messages=[{{"role": "user", "content": "hi"}}])
                print(json.dumps({{"status": 200}}))
            except openai.APIStatusError as e:
                print(json.dumps({{"status": e.status_code, "error": e.body.get("error") if isinstance(e.body, dict) else e.body}}))
    """)
    assert out[0] == {"status": 403, "error": "model_not_allowed"}
    assert out[1]["status"] in (402, 429)
    assert upstream.requests == []


def test_concurrency_and_token_limits_with_ratelimit_headers(tmp_path, upstream, token_server):
    cfg = base_config(upstream.url, users={"alice@example.com": {
        "tenants": ["t"], "requests_per_minute": 1000, "max_concurrent_requests": 2,
        "output_tokens_per_minute": 5000}})
    upstream.configure(latency_s=1.0, usage=Usage(input_tokens=10, output_tokens=10))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        barrier = threading.Barrier(5)
        answers: list[requests.Response] = []

        def one():
            barrier.wait()
            answers.append(post(c, CHAT, body))

        ts = [threading.Thread(target=one) for _ in range(5)]
        [t.start() for t in ts]
        [t.join(30) for t in ts]
        codes = sorted(r.status_code for r in answers)
        assert codes == [200, 200, 429, 429, 429]
        assert len(upstream.requests) == 2  # the refused never reached the provider
        for r in answers:
            assert r.headers["RateLimit-Policy"] == (
                '"requests";q=1000;w=60, "concurrency";q=2, "output_tokens";q=5000;w=60'
            ) or r.status_code == 429
            if r.status_code == 429:
                assert r.json()["limit_kind"] == "concurrency" and r.headers["Retry-After"] == "1"
                assert r.headers["RateLimit-Policy"] == '"requests";q=1000;w=60, "concurrency";q=2'
            else:
                assert r.headers["RateLimit"].startswith('"requests";r=')
        # every place is free again once they ended, and each used 10 output tokens, not its
        # estimate of 1000: four more of 2000 fit in the 5000 a minute
        upstream.configure(latency_s=0.0, usage=Usage(input_tokens=10, output_tokens=10))
        for _ in range(4):
            r = post(c, CHAT, {**body, "max_tokens": 2000})
            assert r.status_code == 200, r.text
        # a streamed answer carries them too (its headers leave before its body)
        r = post(c, CHAT, {**body, "max_tokens": 100, "stream": True})
        assert r.status_code == 200, r.text
        assert r.headers["RateLimit-Policy"] == (
            '"requests";q=1000;w=60, "concurrency";q=2, "output_tokens";q=5000;w=60'
        )
        assert r.headers["RateLimit"].startswith('"requests";r=')
        upstream.clear()
        r = post(c, CHAT, {**body, "max_tokens": 6000})  # more than a minute's allowance
        assert r.status_code == 429 and r.json()["limit_kind"] == "output_tokens"
        assert r.json()["retry_after_s"] == 60 and r.headers["Retry-After"] == "60"
        assert upstream.requests == []


def test_tenant_concurrency_limit_across_two_processes_and_users(tmp_path, upstream, token_server):
    """Two users of one tenant through two proxies sharing the store: never more of the
    tenant's requests in flight than its limit, whoever sends them and wherever."""
    cfg = base_config(
        upstream.url,
        users={"alice@example.com": {"tenants": ["t"], "requests_per_minute": 1000},
               "bob@example.com": {"tenants": ["t"], "requests_per_minute": 1000}},
        governance={"tenants": {"t": {"max_concurrent_requests": 3}}},
    )
    upstream.configure(latency_s=2.0, usage=Usage(input_tokens=10, output_tokens=10))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    env = candela_env(token_server, tmp_path)
    with CandelaProcess(tmp_path, cfg, env=env) as a, CandelaProcess(tmp_path, cfg, env=env) as b:
        barrier = threading.Barrier(10)
        answers: list[requests.Response] = []

        def one(proxy: CandelaProcess, who: dict[str, str]) -> None:
            barrier.wait()
            answers.append(post(proxy, CHAT, body, headers=who))

        ts = [threading.Thread(target=one, args=(a, ALICE)) for _ in range(5)]
        ts += [threading.Thread(target=one, args=(b, BOB)) for _ in range(5)]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        codes = sorted(r.status_code for r in answers)
        assert codes == [200] * 3 + [429] * 7
        assert len(upstream.requests) == 3  # the refused never reached the provider
        for r in answers:
            assert '"tenant_concurrency";q=3' in r.headers["RateLimit-Policy"]
            if r.status_code == 429:
                got = r.json()
                assert (got["error"], got["limit_kind"], got["scope"]) == (
                    "rate_limited", "concurrency", "tenant"
                )
                assert r.headers["Retry-After"] == "1"
        # every place is free again once they ended: three more fit at once
        upstream.configure(latency_s=0.0, usage=Usage(input_tokens=10, output_tokens=10))
        for proxy, who in ((a, ALICE), (b, BOB), (a, BOB)):
            assert post(proxy, CHAT, body, headers=who).status_code == 200
