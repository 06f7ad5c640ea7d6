"""Issue 16, faults: kill -9 under mixed streaming and JSON load, again and again, then restart.

Every answer a client received whole has its audit entry, the chain verifies, nothing stays
held (reservations, concurrency leases), and the spend in the state store is exactly the sum of
the costs the audit log records: the spend follows its durable entry (addons/budget.py), and a
restart settles what a dead process left from its entry, or at its reservation with an entry of
its own (governance/reconcile.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from candela_mitm.audit.query import query_entries
from candela_mitm.config import State
from candela_mitm.state import open_state_store
from candela_mitm.state.ports import usd_to_nano
from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import FakeUpstream
from tests.wait import WAIT_S

from .conftest import ALICE_KEY, base_config, candela_env

pytestmark = pytest.mark.e2e
USER = "alice@example.com"
CHAT = "/proxy/openai/v1/chat/completions"
CANDELA = str(Path(sys.executable).parent / "candela")
ROUNDS = 3
CLIENTS = 6


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def kill_9(c: CandelaProcess) -> None:
    """SIGKILL the server and every worker at once: no process gets to clean up."""
    assert c.proc is not None
    pids = [c.proc.pid, *children(c.proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    c.stop()  # reaps the server (the workers are reaped by init once their parent is gone)
    deadline = time.monotonic() + WAIT_S
    for pid in pids[1:]:
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            assert time.monotonic() < deadline, f"worker {pid} still running"
            time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "zombie"


class Clients:
    """Clients sending streamed and JSON chat completions back to back; each records the span
    of every answer it received whole (a stream to its last chunk, a JSON body complete)."""

    def __init__(self, url: str, n: int) -> None:
        self.url = url
        self.whole: list[str] = []
        self.broken = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, i: int) -> None:
        session = requests.Session()
        k = 0
        while not self._stop.is_set():
            k += 1
            stream = (i + k) % 2 == 0
            body = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hello " * (1 + k % 7)}],
                "stream": stream,
                "max_tokens": 50,
            }
            try:
                r = session.post(
                    self.url + CHAT,
                    json=body,
                    headers={"Authorization": f"Bearer {ALICE_KEY}"},
                    timeout=10,
                    stream=stream,
                )
                data = b"".join(r.iter_content(8192)) if stream else r.content
                whole = r.status_code == 200 and (
                    b"[DONE]" in data if stream else b'"usage"' in data
                )
                span = r.headers.get("x-candela-span-id")
            except (requests.RequestException, OSError):
                whole, span = False, None
                session = requests.Session()
                time.sleep(0.01)
            with self._lock:
                if whole and span:
                    self.whole.append(span)
                else:
                    self.broken += 1


@pytest.mark.parametrize(
    ("workers", "backend", "durability", "slices"),
    [
        (1, "sqlite", "power_loss", False),
        (2, "sqlite", "power_loss", False),
        (2, "redis", "power_loss", False),
        # the audit log written to the OS at each commit, fsynced by the writer thread within
        # audit.sync_interval_ms (the default): kill -9 of every process still loses no entry of
        # an answered request
        (2, "sqlite", "process_crash", False),
        # budget slices (governance.budgets.slices, the default): holds carved in memory, spend
        # recorded in bulk; a killed process's slices are settled from the entries that name
        # them and charged what is left of them (an entry of its own each)
        (2, "sqlite", "power_loss", True),
        (2, "redis", "power_loss", True),
    ],
)
def test_kill_9_under_load_again_and_again_then_restart(
    tmp_path, upstream: FakeUpstream, token_server, request, workers, backend, durability, slices
) -> None:
    # streams of 20 chunks 5 ms apart beside immediate JSON answers: kills land mid-stream,
    # mid-settle and mid-commit
    upstream.reset()
    upstream.configure(n_chunks=20, chunk_delay_s=0.005)
    state: dict[str, Any] = {"sqlite_path": str(tmp_path / "state.db")}
    if backend == "redis":
        server = request.getfixturevalue("redis_server_factory")()
        state = {"backend": "redis", "redis_url": server.url}
    users = {
        USER: {
            "tenants": ["research-team"],
            "requests_per_minute": 1_000_000,
            "max_concurrent_requests": 1000,  # a lease per request: nothing may stay held
        }
    }
    audit = {"sqlite_path": str(tmp_path / "audit.db"), "durability": durability}
    cfg = base_config(upstream.url, users=users, state=state, workers=workers, audit=audit)
    # slices are on by default; off, every request reserves on its own (the per-request path)
    cfg["governance"]["budgets"]["slices"] = {"enabled": slices, "requests": 8}
    env = candela_env(token_server, tmp_path)
    rng = random.Random(16)
    whole: list[str] = []
    broken = 0
    port = None
    try:
        for _ in range(ROUNDS):
            c = CandelaProcess(tmp_path, cfg, env=env, port=port).start()
            port = c.port
            try:
                with Clients(c.url, CLIENTS) as clients:
                    # under load (a few answers through, on however slow a machine), then at a
                    # random moment: mid-stream, mid-settle, mid-commit
                    deadline = time.monotonic() + 30
                    while len(clients.whole) < 5 and time.monotonic() < deadline:
                        time.sleep(0.02)
                    time.sleep(rng.uniform(0.0, 0.5))
                    kill_9(c)
                whole += clients.whole
                broken += clients.broken
            finally:
                c.stop()
        # the last start settles what the last kill left; then a clean stop
        c = CandelaProcess(tmp_path, cfg, env=env, port=port).start()
        c.stop()
    finally:
        upstream.reset()
    assert len(whole) >= 3 * ROUNDS and broken > 0, (len(whole), broken)  # load, and cuts

    entries = query_entries(tmp_path / "audit.db", action="llm_request", limit=10_000)
    by_span: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_span.setdefault(e["fields"]["span_id"], []).append(e["fields"])
    # every answer a client received whole has its entry, charged as the provider reported
    missing = [s for s in whole if s not in by_span]
    assert not missing, f"{len(missing)} answers received whole without an audit entry"
    assert all(by_span[s][0]["usage_source"] == "reported" for s in whole)
    # one entry per request: a restart never audits a request twice
    assert all(len(v) == 1 for v in by_span.values())

    v = subprocess.run(
        [CANDELA, "audit", "--db", str(tmp_path / "audit.db"), "verify"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert v.returncode == 0, v.stdout + v.stderr

    import yaml

    cfg_state = yaml.safe_load((tmp_path / f"candela-{port}.yaml").read_text())["state"]
    store = open_state_store(State(**cfg_state))
    try:
        assert store.active_reservations() == []  # nothing stays held
        assert store.leases() == []
        spent = sum(r.cost for r in store.spend_rows(None, None, USER))
        requests_counted = sum(r.requests for r in store.spend_rows(None, None, USER))
    finally:
        store.close()
    charged = [e["fields"] for e in entries if e["fields"].get("usage_source") is not None]
    audited = sum(usd_to_nano(f["cost_usd"]) for f in charged)
    # the spend is the sum of the audited costs (each entry rounds its cost to 1e-10 USD)
    assert abs(spent - audited) <= len(charged), (spent, audited)
    assert requests_counted == len(charged)
    crashed = [f for f in charged if f.get("reason") == "proxy_crash"]
    assert all(f["usage_source"] == "reserved" for f in crashed)
    if slices:  # the holds were carved: the equality above held across killed slices
        assert sum(1 for f in charged if f.get("slice_id")) > len(charged) // 4
