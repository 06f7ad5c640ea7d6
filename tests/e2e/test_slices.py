"""governance.budgets.slices: two workers carve requests' holds from budget slices in memory,
and the budget stays exact (SQLite and Redis state)."""

from __future__ import annotations

import http.client
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.config import Config
from candela_mitm.governance.ledger import Ledger
from candela_mitm.state import open_state_store
from tests.e2e.conftest import base_config, candela_env
from tests.e2e.test_workers import (
    COST_NANO,
    NANO,
    PRICE_OUT,
    chat,
    upstream7,  # noqa: F401  (a fixture)
    wait_for_listeners,
    worker_pids,
)
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.upstream import FakeUpstream
from tests.wait import until

pytestmark = pytest.mark.e2e

BUDGET_USD = 1.0
FITS = 142  # $1.00 / $0.007
U = "alice@example.com"


def until_refused(port: int) -> list[int]:
    """One client's requests on one kept-alive connection until the first 402."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    statuses: list[int] = []
    try:
        while not statuses or statuses[-1] == 200:
            statuses.append(chat(conn))
            assert len(statuses) <= FITS + 1
    finally:
        conn.close()
    return statuses


@pytest.mark.parametrize("idle_s", [0.2, None], ids=["idle-0.2s", "idle-default"])
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_workers_carve_from_slices_and_the_budget_stays_exact(
    tmp_path: Path,
    upstream7: FakeUpstream,  # noqa: F811
    token_server: FakeTokenServer,
    backend: str,
    idle_s: float | None,
    request: pytest.FixtureRequest,
) -> None:
    state: dict[str, Any] = {"backend": "sqlite", "sqlite_path": str(tmp_path / "state.db")}
    if backend == "redis":
        server = request.getfixturevalue("redis_server_factory")()
        state = {"backend": "redis", "redis_url": server.url}
    cfg = base_config(
        upstream7.url,
        workers=2,
        state=state,
        users={U: {"tenants": ["research-team"], "daily_budget_usd": BUDGET_USD,
                   "requests_per_minute": 100_000}},
        pricing={"gpt-4o-mini": {"input": 0.0, "output": PRICE_OUT}},
    )
    cfg["governance"]["budgets"]["slices"] = {"enabled": True, "requests": 8, "headroom": 4}
    if idle_s is not None:
        cfg["governance"]["budgets"]["slices"]["idle_s"] = idle_s
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        assert c.proc is not None
        assert len(worker_pids(c.proc.pid)) == 2
        wait_for_listeners(c.port, 2)
        # 16 clients at once over both workers, each until its first 402
        with ThreadPoolExecutor(16) as pool:
            first = [s for got in pool.map(until_refused, [c.port] * 16) for s in got]
        # a worker's refusal while it holds part of the budget in a slice is no 402: it carves
        # the request from it or returns it and reserves again (Budget._second_look); what
        # the other worker's slices held when a client was refused is returned: by the
        # refusals' marks at the holder's next flush, or once idle (idle_s 0.2 s); waited for,
        # not slept (a loaded machine can take more than a second).
        # With the default idle_s (30 s), within half of it (the recall across processes
        # alone: test_a_refusal_on_one_proxy_recalls_the_slice_another_holds). Then, near the
        # end, every request reserves on its own: exactly what is left fits
        store = open_state_store(Config.model_validate({"state": state}).state)
        try:
            until(store.active_reservations, lambda held: held == [], what="every slice returned",
                  timeout=15.0)
        finally:
            store.close()
        second = until_refused(c.port)
        admitted = first.count(200) + second.count(200)
        assert admitted == FITS, (first.count(200), second.count(200))
        assert set(first) | set(second) == {200, 402}
        assert len(upstream7.requests) == FITS  # a denied request never reached the provider
    store = open_state_store(Config.model_validate({"state": state}).state)
    try:
        status = Ledger(store).status(U, BUDGET_USD)
        assert store.active_reservations() == []  # every slice returned at shutdown
        assert round(status.spent_usd * NANO) == FITS * COST_NANO
        assert status.reserved_usd == 0
        assert sum(r.requests for r in Ledger(store).usage(user=U)) == FITS
    finally:
        store.close()
    # holds were carved from slices: their entries name the slice (with 16 clients at once a
    # slice of 8 is spent in a moment and requests reserve on their own while the next is
    # taken, so about half are carved, and as few as 28 of 142 were seen in one run)
    audit = sqlite3.connect(tmp_path / "audit.db")
    (carved,) = audit.execute(
        "SELECT count(*) FROM audit_log WHERE action = 'llm_request' "
        "AND json_extract(fields, '$.slice_id') IS NOT NULL"
    ).fetchone()
    assert carved >= FITS // 8, carved



@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_refusal_on_one_proxy_recalls_the_slice_another_holds(
    tmp_path: Path,
    upstream7: FakeUpstream,  # noqa: F811
    token_server: FakeTokenServer,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """Two proxies on one store, idle_s the default (30 s): `a` holds a slice of the budget,
    unused, while a client of `b` spends until refused; `b`'s refusal leaves a recall mark and
    `a` returns its slice at its next flush, well within idle_s, so the next client of `b`
    admits exactly what is left."""
    state: dict[str, Any] = {"backend": "sqlite", "sqlite_path": str(tmp_path / "state.db")}
    if backend == "redis":
        server = request.getfixturevalue("redis_server_factory")()
        state = {"backend": "redis", "redis_url": server.url}
    cfg = base_config(
        upstream7.url,
        state=state,
        users={U: {"tenants": ["research-team"], "daily_budget_usd": BUDGET_USD,
                   "requests_per_minute": 100_000}},
        pricing={"gpt-4o-mini": {"input": 0.0, "output": PRICE_OUT}},
    )
    cfg["governance"]["budgets"]["slices"] = {"enabled": True, "requests": 8, "headroom": 4}
    env = candela_env(token_server, tmp_path)
    store = open_state_store(Config.model_validate({"state": state}).state)

    def slices_held() -> list[str]:
        return [r.request_id for r in store.active_reservations()
                if r.request_id.startswith("slice:")]

    try:
        with CandelaProcess(tmp_path, cfg, env=env) as a, CandelaProcess(tmp_path, cfg, env=env) as b:
            conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=20)
            try:
                on_a = [chat(conn), chat(conn)]  # reserved on their own twice: a slice taken
            finally:
                conn.close()
            assert on_a == [200, 200]
            until(slices_held, what="a slice held by `a`")
            first = until_refused(b.port)
            # `a`'s slice back within 15 s (idle_s is 30 s): recalled by `b`'s mark
            until(store.active_reservations, lambda held: held == [], timeout=15.0,
                  what="every slice returned")
            second = until_refused(b.port)
            admitted = len(on_a) + first.count(200) + second.count(200)
            assert admitted == FITS, (first.count(200), second.count(200))
            assert len(upstream7.requests) == FITS
        status = Ledger(store).status(U, BUDGET_USD)
        assert round(status.spent_usd * NANO) == FITS * COST_NANO and status.reserved_usd == 0
    finally:
        store.close()


RPM = 120


def window_entries(state: dict[str, Any]) -> int:
    """The entries in the rate window's log (one user's requests-per-minute): admitted
    requests, plus the unused part of blocks not yet given back."""
    if state["backend"] == "sqlite":
        db = sqlite3.connect(state["sqlite_path"], timeout=30)
        try:
            return int(db.execute("SELECT count(*) FROM rate_log").fetchone()[0])
        finally:
            db.close()
    import redis

    r = redis.Redis.from_url(state["redis_url"], decode_responses=True)
    try:
        return sum(int(r.zcard(k)) for k in r.keys("*rate*"))
    finally:
        r.close()


def count_429(port: int) -> list[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    statuses: list[int] = []
    try:
        while not statuses or statuses[-1] == 200:
            statuses.append(chat(conn))
            assert len(statuses) <= RPM + 1
    finally:
        conn.close()
    return statuses


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_workers_admit_from_rate_blocks_and_the_limit_stays_exact(
    tmp_path: Path,
    upstream7: FakeUpstream,  # noqa: F811
    token_server: FakeTokenServer,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """governance.rate_limits.leases with budget slices: most requests touch no store at all
    before they are forwarded, and no minute admits more than the limit."""
    state: dict[str, Any] = {"backend": "sqlite", "sqlite_path": str(tmp_path / "state.db")}
    redis_url = ""
    if backend == "redis":
        server = request.getfixturevalue("redis_server_factory")()
        redis_url = server.url
        state = {"backend": "redis", "redis_url": redis_url}
    cfg = base_config(
        upstream7.url,
        workers=2,
        state=state,
        users={U: {"tenants": ["research-team"], "daily_budget_usd": 1000.0,
                   "requests_per_minute": RPM}},
        pricing={"gpt-4o-mini": {"input": 0.0, "output": PRICE_OUT}},
    )
    cfg["governance"]["budgets"]["slices"] = {"enabled": True, "idle_s": 0.2}
    cfg["governance"]["rate_limits"] = {"leases": {"enabled": True, "requests": 8}}
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        wait_for_listeners(c.port, 2)
        with ThreadPoolExecutor(8) as pool:
            first = [s for got in pool.map(count_429, [c.port] * 8) for s in got]
        # blocks past their stamp (at most leases' lifetime, 1 s, after their take) and the
        # flush after it (every half lifetime): their unused part given back, when the window
        # holds one entry per admitted request; waited for, not slept (a fixed 1.5 s left no
        # room on a loaded machine, and 3 s was a guess too); the window is a minute: waiting
        # changes nothing else
        admitted_first = first.count(200)
        until(lambda: window_entries(state), lambda n: n == admitted_first,
              what=f"the rate blocks' unused part given back ({admitted_first} admitted)")
        second = count_429(c.port)
        admitted = first.count(200) + second.count(200)
        assert admitted == RPM, (first.count(200), second.count(200))
        assert set(first) | set(second) == {200, 429}
        assert len(upstream7.requests) == RPM
    # the window's entries: one per admitted request, most of them from blocks (a block's
    # entries share one stamp; a plain check's is its own microsecond)
    if backend == "sqlite":
        db = sqlite3.connect(tmp_path / "state.db")
        stamps = [n for (n,) in db.execute("SELECT count(*) FROM rate_log GROUP BY key, ts")]
        assert sum(stamps) == RPM
        assert sum(n for n in stamps if n > 1) > RPM // 2, stamps
    else:
        import redis

        r = redis.Redis.from_url(redis_url, decode_responses=True)
        members = [m for k in r.keys("*rate*") for m in r.zrange(k, 0, -1)]
        assert len(members) == RPM
        assert sum(1 for m in members if ":l" in m) > RPM // 2
    # and every hold came back: the budget has nothing reserved, the spend is exact
    store = open_state_store(Config.model_validate({"state": state}).state)
    try:
        status = Ledger(store).status(U, 1000.0)
        assert status.reserved_usd == 0 and round(status.spent_usd * NANO) == RPM * COST_NANO
    finally:
        store.close()
