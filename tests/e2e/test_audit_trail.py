"""Issue 4 end to end: the proxy's audit trail survives kill -9, verifies, and answers DuckDB queries live."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from candela_mitm.audit.query import query_entries
from candela_mitm.providers.usage import Usage
from tests.fakes.candela import CandelaProcess
from tests.wait import WAIT_S, until

from .conftest import ADMIN_KEY, ALICE_KEY, base_config, candela_env

pytestmark = pytest.mark.e2e
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
CHAT = "/proxy/openai/v1/chat/completions"
CANDELA = str(Path(sys.executable).parent / "candela")


def audit(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CANDELA, "audit", "--db", str(db), *args], capture_output=True, text=True, timeout=60)


def test_kill_9_under_load_keeps_every_completed_request(tmp_path, upstream, token_server):
    upstream.reset()
    upstream.configure(usage=Usage(input_tokens=5, output_tokens=5))
    cfg = base_config(upstream.url, users={"alice@example.com": {"tenants": ["t"], "requests_per_minute": 100_000}})
    env = candela_env(token_server, tmp_path)
    c = CandelaProcess(tmp_path, cfg, env=env).start()
    completed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker():
        s = requests.Session()
        while not stop.is_set():
            try:
                r = s.post(c.url + CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=ALICE, timeout=30)
                body = r.json()  # the whole response arrived
                if r.status_code == 200 and body.get("choices"):
                    with lock:
                        completed.append(r.headers["x-candela-span-id"])
            except (requests.RequestException, ValueError):
                return

    ts = [threading.Thread(target=worker) for _ in range(8)]
    [t.start() for t in ts]
    # killed once the load got going (waited for: a fixed 2 s could pass before 20 requests
    # completed on a loaded machine), with 8 requests in flight
    until(lambda: len(completed), lambda n: n > 20, what="completed requests")
    c.stop(kill=True)
    stop.set()
    [t.join(60) for t in ts]  # each request has 30 s; the kill ends them at once
    assert len(completed) > 20, "the load did not get going"
    db = tmp_path / "audit.db"
    # entries only journaled when the process died (audit/journal.py) reach the ledger before
    # anything reads it: `candela audit` appends them first, as the next start would
    v = audit("verify", db=db)
    assert v.returncode == 0, v.stdout + v.stderr
    logged = {e["fields"].get("span_id") for e in query_entries(db, action="llm_request", limit=10_000)}
    missing = [s for s in completed if s not in logged]
    assert not missing, f"{len(missing)} of {len(completed)} completed requests have no audit entry"
    # the chain verifies after restart, and the restarted proxy appends to the same chain
    c2 = CandelaProcess(tmp_path, cfg, env=env, port=c.port).start()
    try:
        assert requests.post(c2.url + CHAT, json={"model": "gpt-4o-mini", "messages": []}, headers=ALICE, timeout=10).status_code == 200
    finally:
        c2.stop()
    v = audit("verify", db=db)
    assert v.returncode == 0, v.stdout + v.stderr


def test_query_runs_while_the_proxy_runs_and_sees_the_newest_entry(tmp_path, upstream, token_server):
    upstream.reset()
    upstream.configure(usage=Usage(input_tokens=100, output_tokens=10))
    cfg = base_config(upstream.url)
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        for model in ("gpt-4o-mini", "gpt-4o-mini", "gpt-4o"):
            assert requests.post(c.url + CHAT, json={"model": model, "messages": []}, headers=ALICE, timeout=10).status_code == 200
        r = requests.post(c.url + CHAT, json={"model": "gpt-4o", "messages": []},
                          headers={**ALICE, "X-Candela-Tenant-Id": "nope"}, timeout=10)
        assert r.status_code == 403
        last_span = r.headers["x-candela-span-id"]
        db = tmp_path / "audit.db"
        q = audit("query", "SELECT json_extract_string(fields, '$.model') AS model, count(*) AS n, "
                  "sum(CAST(json_extract(fields, '$.cost_usd') AS DOUBLE)) AS cost FROM audit "
                  "WHERE action = 'llm_request' AND json_extract_string(fields, '$.decision') = 'allowed' "
                  "GROUP BY 1 ORDER BY 1", "--format", "json", db=db)
        assert q.returncode == 0, q.stderr
        rows = {r["model"]: r for r in json.loads(q.stdout)}
        assert rows["gpt-4o-mini"]["n"] == 2 and rows["gpt-4o"]["n"] == 1
        assert rows["gpt-4o"]["cost"] == pytest.approx((100 * 2.5 + 10 * 10.0) / 1e6)
        q = audit("query", "SELECT json_extract_string(fields, '$.span_id') AS s FROM audit ORDER BY seq DESC LIMIT 1",
                  "--format", "csv", db=db)
        assert last_span in q.stdout
        v = audit("verify", db=db)
        assert v.returncode == 0, v.stdout + v.stderr
        out = tmp_path / "export.jsonl"
        e = audit("export", "--format", "jsonl", "--out", str(out), db=db)
        assert e.returncode == 0, e.stderr
        actions = [json.loads(line)["action"] for line in out.read_text().splitlines()]
        assert "proxy_start" in actions and actions.count("llm_request") == 4
        m = requests.get(c.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5).text
        assert 'candela_requests_total{model="gpt-4o-mini",provider="openai",status="200",tenant="research-team"} 2.0' in m
        assert "candela_cost_usd_total" in m and "candela_time_to_first_token_seconds_bucket" in m


def test_credentials_never_reach_the_audit_trail(tmp_path, upstream, token_server):
    upstream.reset()
    cfg = base_config(upstream.url)
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        requests.post(c.url + CHAT, json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "secret prompt"}]},
                      headers=ALICE, timeout=10)
        requests.post(c.url + CHAT, json={"model": "gpt-4o-mini"}, headers={"Authorization": "Bearer cdl_wrong_key_123"}, timeout=10)
    raw = (tmp_path / "audit.db").read_bytes()
    for secret in (ALICE_KEY.encode(), b"cdl_wrong_key_123", b"sk-openai-fake", b"secret prompt"):
        assert secret not in raw
    assert secret not in c.log().encode()


def test_sighup_reloads_the_config_and_audits_it(tmp_path, upstream, token_server):
    import signal

    import yaml

    upstream.reset()
    cfg = base_config(upstream.url, governance={"models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]}})
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        body = {"model": "gpt-4o", "messages": []}
        assert requests.post(c.url + CHAT, json=body, headers=ALICE, timeout=10).status_code == 403
        written = yaml.safe_load(c.config_path.read_text())
        written["governance"] = {"models": {"mode": "allowlist", "allowed": ["gpt-4o-mini", "gpt-4o"]}}
        c.config_path.write_text(yaml.safe_dump(written))
        c.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if requests.post(c.url + CHAT, json=body, headers=ALICE, timeout=10).status_code == 200:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the reloaded policy never took effect")
        # a change that needs a restart is refused whole: the policy stays as it was
        written["state"] = {"sqlite_path": str(tmp_path / "elsewhere.db")}
        written["governance"] = {"models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]}}
        c.config_path.write_text(yaml.safe_dump(written))
        c.proc.send_signal(signal.SIGHUP)
        # the refusal is audited once the reload was tried (waited for, not a fixed 0.5 s)
        entries = until(
            lambda: query_entries(tmp_path / "audit.db", action="config_reload", limit=10),
            lambda entries: len(entries) >= 2, what="two config_reload entries")
        assert requests.post(c.url + CHAT, json=body, headers=ALICE, timeout=10).status_code == 200
        results = [e["fields"]["result"] for e in reversed(entries)]
        assert results == ["applied", "refused"]
        assert entries[-1]["fields"]["sections"] == ["governance"]
        assert "state" in entries[0]["fields"]["reason"]
