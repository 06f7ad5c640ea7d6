"""workers: N: two candela-server processes share one listening port and keep budgets exact."""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from candela_mitm.enforcement import procnet
from candela_mitm.providers.usage import Usage
from tests.e2e.conftest import ADMIN_KEY, ALICE_KEY, base_config, candela_env
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.upstream import FakeUpstream
from tests.wait import WAIT_S, until

pytestmark = pytest.mark.e2e

# Output tokens cost $1000 per million and input is free, so the reservation (max_tokens = 7)
# equals the real cost (the fake reports 7 output tokens): exactly 14 requests fit in $0.10.
PRICE_OUT = 1000.0
MAX_TOKENS = 7
BUDGET_USD = 0.1
FITS = 14
NANO = 1_000_000_000
COST_NANO = 7_000_000  # 7 tokens x $1000 / 1M, in nano-dollars


def worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(p) for p in children]


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def accepted_on(port: int) -> dict[str, int]:
    """inode -> client port of every established TCP connection accepted on `port`."""
    return {
        str(s.inode): s.remote_port
        for s in procnet.read(["/proc/net/tcp"])
        if s.state == procnet.ESTABLISHED and s.local_port == port
    }


def listeners(port: int) -> int:
    """Sockets listening on `port` (each worker has its own with SO_REUSEPORT)."""
    return sum(
        1
        for s in procnet.read(["/proc/net/tcp"])
        if s.state == procnet.LISTEN and s.local_port == port
    )


def wait_for_listeners(port: int, n: int, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while listeners(port) < n:
        assert time.monotonic() < deadline, f"{listeners(port)} of {n} workers listening"
        time.sleep(0.05)


def chat(conn: http.client.HTTPConnection) -> int:
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "hi"}],
    }
    conn.request(
        "POST",
        "/proxy/openai/v1/chat/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    resp.read()
    return resp.status


@pytest.fixture
def upstream7(token_server: FakeTokenServer) -> Iterator[FakeUpstream]:
    with FakeUpstream(google_token_valid=token_server.is_valid) as f:
        f.configure(usage=Usage(input_tokens=12, output_tokens=MAX_TOKENS, cached_tokens=0))
        yield f


def test_two_workers_share_one_port_and_budgets_stay_exact(
    tmp_path: Path, upstream7: FakeUpstream, token_server: FakeTokenServer
) -> None:
    cfg = base_config(
        upstream7.url,
        workers=2,
        users={
            "alice@example.com": {
                "tenants": ["research-team"],
                "daily_budget_usd": BUDGET_USD,
                "requests_per_minute": 10_000,
            }
        },
        pricing={"gpt-4o-mini": {"input": 0.0, "output": PRICE_OUT}},
    )
    clients = 40
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        assert c.proc is not None
        workers = worker_pids(c.proc.pid)
        assert len(workers) == 2
        wait_for_listeners(c.port, 2)  # healthy means one worker listens; the other may be starting
        # Hold many connections open at once and see which process accepted each one.
        conns = [http.client.HTTPConnection("127.0.0.1", c.port, timeout=10) for _ in range(clients)]
        for conn in conns:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        accepted = accepted_on(c.port)
        owners = {pid: len(_socket_inodes(pid) & accepted.keys()) for pid in workers}
        assert sum(owners.values()) == clients, owners
        assert all(n > 0 for n in owners.values()), f"one worker accepted everything: {owners}"

        # Every client spends at once, over both workers: exactly what fits is admitted.
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(chat, conns))
        for conn in conns:
            conn.close()
        assert statuses.count(200) == FITS, statuses
        assert statuses.count(402) == clients - FITS, statuses
        assert len(upstream7.requests) == FITS  # a denied request never reached the provider

    state = sqlite3.connect(tmp_path / "state.db")
    spent, reserved = state.execute(
        "SELECT spent, reserved FROM days WHERE user_id = ?", ("alice@example.com",)
    ).fetchone()
    (requests,) = state.execute(
        "SELECT sum(requests) FROM spend WHERE user_id = ?", ("alice@example.com",)
    ).fetchone()
    assert (spent, reserved, requests) == (FITS * COST_NANO, 0, FITS)
    assert spent <= BUDGET_USD * NANO

    audit = sqlite3.connect(tmp_path / "audit.db")
    starts = audit.execute(
        "SELECT json_extract(fields, '$.pid') FROM audit_log WHERE action = 'proxy_start'"
    ).fetchall()
    assert sorted(p for (p,) in starts) == sorted(workers)
    decisions = dict(
        audit.execute(
            "SELECT json_extract(fields, '$.decision'), count(*) FROM audit_log "
            "WHERE action = 'llm_request' GROUP BY 1"
        ).fetchall()
    )
    assert decisions == {"allowed": FITS, "denied": clients - FITS}
    for pid in workers:  # stopping the supervisor stopped (and reaped) its workers
        assert not Path(f"/proc/{pid}").exists()


def call(conn: http.client.HTTPConnection, method: str, path: str, key: str, body: object) -> int:
    conn.request(
        method,
        path,
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_an_admin_change_applies_to_requests_served_by_both_workers(
    tmp_path: Path, upstream7: FakeUpstream, token_server: FakeTokenServer
) -> None:
    """Each worker remembers alice's settings for up to a minute while it polls the store's
    settings generation: an admin change made through one applies in the other at its next
    poll (250 ms), not a minute later."""
    cfg = base_config(
        upstream7.url,
        workers=2,
        users={"alice@example.com": {"tenants": ["research-team"], "requests_per_minute": 10_000}},
    )
    clients = 16
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        assert c.proc is not None
        workers = worker_pids(c.proc.pid)
        wait_for_listeners(c.port, 2)
        conns = [http.client.HTTPConnection("127.0.0.1", c.port, timeout=10) for _ in range(clients)]
        for conn in conns:  # each one served by the worker that accepted it, from now on
            assert chat(conn) == 200
        accepted = accepted_on(c.port)
        owner = {
            inode: pid for pid in workers for inode in _socket_inodes(pid) & accepted.keys()
        }
        assert set(owner.values()) == set(workers), "one worker accepted everything"
        for conn in conns:  # both workers remember alice's settings
            assert chat(conn) == 200

        status = call(
            conns[0], "PUT", "/admin/v1/users/alice%40example.com", ADMIN_KEY,
            {"daily_budget_usd": 0},
        )
        assert status == 200
        changed = time.monotonic()
        forwarded = len(upstream7.requests)
        admitted = 0
        pending = set(range(clients))
        # at the next poll, not when the minute's memory of alice's settings runs out: a worker
        # that missed the change would keep admitting for up to 60 s. Bounded at 10 s (40 polls,
        # a sixth of that minute), not 1 s: 16 requests a round on a loaded 2-core machine can
        # take a second by themselves
        while pending:
            assert time.monotonic() - changed < 10.0, f"still admitted on {len(pending)} connections"
            for i in sorted(pending):
                status = chat(conns[i])
                assert status in (200, 402), status
                if status == 402:
                    pending.discard(i)
                else:
                    admitted += 1
        for conn in conns:  # and it stays applied on every connection of both workers
            assert chat(conn) == 402
            conn.close()
        assert len(upstream7.requests) - forwarded == admitted  # a denied one never reached it


def test_workers_refuse_a_port_in_use(tmp_path: Path, upstream: FakeUpstream) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        c = CandelaProcess(tmp_path, base_config(upstream.url, workers=2), port=port)
        with pytest.raises(RuntimeError, match="cannot listen"):
            c.start()  # its early exit: no wait for the default timeout
        c.stop()


def test_workers_restart_on_a_port_with_connections_in_time_wait(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """kill -9 of the supervisor and its workers with idle kept-alive connections open: the
    kernel closes the server's ends first, so they stay in TIME-WAIT; a restart binds anyway."""
    import signal
    import socket

    c = CandelaProcess(tmp_path, base_config(upstream.url, workers=2)).start()
    port = c.port
    wait_for_listeners(port, 2)
    assert c.proc is not None
    held = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        held.append(s)
    pids = [c.proc.pid, *worker_pids(c.proc.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    c.proc.wait()
    for s in held:  # the client reads the kernel's FIN and closes: the server's end is TIME-WAIT
        s.settimeout(5)
        while s.recv(4096):  # the rest of the answer, then the end
            pass
        s.close()

    def time_wait() -> bool:
        tcp = Path("/proc/net/tcp").read_text().splitlines()[1:]
        return any(
            line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "06" for line in tcp
        )

    # the kernel moves the server's end to TIME-WAIT once it has the client's FIN: waited for
    # (a fixed 0.2 s before)
    until(time_wait, what="a server-side TIME-WAIT (the test set-up did not make one)")
    c.stop()
    again = CandelaProcess(tmp_path, base_config(upstream.url, workers=2), port=port)
    try:
        again.start()  # refused with "address in use" before claim_port's SO_REUSEADDR
        wait_for_listeners(port, 2)
    finally:
        again.stop()
