"""Tests for the audit writer: batching, durability, redaction, back-pressure and shared ledgers."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.audit import AuditWriter, query_entries, verify_chain
from candela_mitm.audit.redaction import REDACTED
from candela_mitm.audit.writer import _Callback, _Item
from candela_mitm.config import Audit
from candela_mitm.errors import StoreUnavailable
from tests.wait import until


def cfg(tmp_path: Path, **kw: Any) -> Audit:
    return Audit(sqlite_path=str(tmp_path / "audit.db"), **kw)


def no_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers started from now on have no entry journal (its folder cannot be written), so
    record_here commits on the caller's thread as it does with durability power_loss."""
    import candela_mitm.audit.writer as writer_module

    def unwritable(folder: Path) -> Any:
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(writer_module, "Journal", unwritable)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[AuditWriter]:
    w = AuditWriter(cfg(tmp_path))
    w.start()
    yield w
    w.close()


def stored(tmp_path: Path) -> list[dict[str, Any]]:
    return list(reversed(query_entries(tmp_path / "audit.db", limit=10_000)))


def test_record_flush_and_verify(writer: AuditWriter, tmp_path: Path) -> None:
    for i in range(100):
        assert writer.record("request", user_id="alice@example.com", tenant_id="research-team", i=i)
    assert writer.flush(10)
    rows = stored(tmp_path)
    assert [r["seq"] for r in rows] == list(range(1, 101))
    assert [r["fields"]["i"] for r in rows] == list(range(100))
    assert {(r["action"], r["user_id"], r["tenant_id"]) for r in rows} == {
        ("request", "alice@example.com", "research-team")
    }
    assert verify_chain(tmp_path / "audit.db").ok
    s = writer.stats()
    assert (s.accepted, s.entries_written, s.head_seq, s.backlog, s.healthy) == (
        100,
        100,
        100,
        0,
        True,
    )
    assert s.defensive


def test_model_policy_check_entry_has_the_documented_fields(
    writer: AuditWriter, tmp_path: Path
) -> None:
    seq = writer.record_durable(
        "model_policy_check",
        result="denied",
        model="o1-pro",
        tenant_id="contractor-pool",
        user_id="alice@example.com",
        policy_mode="allowlist",
    ).result(10)
    [entry] = query_entries(tmp_path / "audit.db", action="model_policy_check")
    assert entry["seq"] == seq
    assert entry["fields"] == {
        "result": "denied",
        "model": "o1-pro",
        "tenant_id": "contractor-pool",
        "user_id": "alice@example.com",
        "policy_mode": "allowlist",
    }
    assert entry["ts"].endswith("Z") and len(entry["ts"]) == len("2026-05-17T00:00:00.000000Z")


@pytest.mark.parametrize(
    ("fields", "user_id", "tenant_id"),
    [
        ({"user_id": "alice"}, "alice", None),
        (
            {"actor": "admin@example.com", "target": "bob", "before": {"b": 1}, "after": {"b": 2}},
            "admin@example.com",
            None,
        ),
        ({"user_id": "alice", "actor": "admin"}, "alice", None),
        ({"tenant_id": "t1"}, None, "t1"),
        ({"user_id": 42}, "42", None),
        ({}, None, None),
    ],
)
def test_principal_columns(
    writer: AuditWriter, tmp_path: Path, fields: dict, user_id: Any, tenant_id: Any
) -> None:
    writer.record_durable("x", **fields).result(10)
    [entry] = query_entries(tmp_path / "audit.db")
    assert (entry["user_id"], entry["tenant_id"], entry["fields"]) == (user_id, tenant_id, fields)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"headers": {"Authorization": "Bearer sk-live-123"}},
            {"headers": {"Authorization": REDACTED}},
        ),
        (
            {"headers": {"x-goog-api-key": "AIza123", "x-api-key": "k"}},
            {"headers": {"x-goog-api-key": REDACTED, "x-api-key": REDACTED}},
        ),
        (
            {"api_key": "sk-1", "password": "p", "Cookie": "s=1"},
            {"api_key": REDACTED, "password": REDACTED, "Cookie": REDACTED},
        ),
        ({"nested": [{"token": "t"}, {"ok": 1}]}, {"nested": [{"token": REDACTED}, {"ok": 1}]}),
        (
            {"note": "sent Bearer abc.def-ghi to upstream"},
            {"note": f"sent Bearer {REDACTED} to upstream"},
        ),
        ({"model": "gpt-4o", "status": 200}, {"model": "gpt-4o", "status": 200}),
    ],
)
def test_credentials_are_never_recorded(
    writer: AuditWriter, tmp_path: Path, fields: dict, expected: dict
) -> None:
    writer.record_durable("request", **fields).result(10)
    [entry] = query_entries(tmp_path / "audit.db")
    assert entry["fields"] == expected
    raw = (tmp_path / "audit.db").read_bytes() + Path(f"{tmp_path / 'audit.db'}-wal").read_bytes()
    for secret in (b"sk-live-123", b"AIza123", b"sk-1", b"abc.def-ghi"):
        assert secret not in raw


@pytest.mark.parametrize(("log_prompts", "kept"), [(False, False), (True, True)])
def test_prompts_only_when_configured(tmp_path: Path, log_prompts: bool, kept: bool) -> None:
    w = AuditWriter(cfg(tmp_path, log_prompts=log_prompts))
    w.start()
    w.record_durable(
        "request", model="m", messages=[{"role": "user", "content": "secret plan"}]
    ).result(10)
    w.close()
    [entry] = query_entries(tmp_path / "audit.db")
    assert ("messages" in entry["fields"]) is kept
    assert entry["fields"]["model"] == "m"


def test_odd_values_are_recorded_as_text(writer: AuditWriter, tmp_path: Path) -> None:
    class Thing:
        def __str__(self) -> str:
            return "thing"

    writer.record_durable(
        "x", nan=math.nan, inf=-math.inf, obj=Thing(), tup=(1, 2), s={3}, keys={1: "a"}
    ).result(10)
    [entry] = query_entries(tmp_path / "audit.db")
    assert entry["fields"] == {
        "nan": "nan",
        "inf": "-inf",
        "obj": "thing",
        "tup": [1, 2],
        "s": [3],
        "keys": {"1": "a"},
    }
    assert verify_chain(tmp_path / "audit.db").ok


def test_fields_are_captured_at_record_time(writer: AuditWriter, tmp_path: Path) -> None:
    payload = {"n": 1}
    writer.record("x", payload=payload)
    payload["n"] = 2  # the caller reuses its object: the entry must not change
    writer.flush(10)
    assert query_entries(tmp_path / "audit.db")[0]["fields"] == {"payload": {"n": 1}}


def test_full_queue_refuses_at_once_so_governance_can_fail_closed(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, queue_max_entries=5))  # not started: nothing drains
    assert [w.record("x", i=i) for i in range(7)] == [True] * 5 + [False] * 2
    fut = w.record_durable("x")
    with pytest.raises(StoreUnavailable):
        fut.result(0)
    assert (w.stats().rejected, w.stats().backlog) == (3, 5)
    w.start()
    assert w.flush(10)
    assert w.record("x", i=99)
    assert w.close()
    assert [e["fields"].get("i") for e in stored(tmp_path)] == [0, 1, 2, 3, 4, 99]
    assert not w.record("after close")
    with pytest.raises(StoreUnavailable):
        w.record_durable("after close").result(0)


def test_batches_respect_batch_max_entries(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, batch_max_entries=7))
    for i in range(50):
        w.record("x", i=i)
    w.start()
    assert w.flush(10)
    w.close()
    assert w.stats().batches_written == 8  # ceil(50 / 7)
    conn = sqlite3.connect(tmp_path / "audit.db")
    per_ts = [
        n for (n,) in conn.execute("SELECT count(*) FROM audit_log GROUP BY ts ORDER BY min(seq)")
    ]
    assert max(per_ts) <= 7


def test_entries_commit_within_batch_delay_without_flush(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=20))
    w.start()
    w.record("x")
    deadline = time.monotonic() + 30
    while w.stats().entries_written == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.stats().entries_written == 1
    w.close()


def test_durable_entry_does_not_wait_for_the_batch_delay(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=10_000))
    w.start()
    w.record("x")  # would sit for 10 s on its own
    started = time.monotonic()
    seq = w.record_durable("y").result(5)
    assert time.monotonic() - started < 2
    assert seq == 2
    w.close()


def test_record_durable_from_asyncio(writer: AuditWriter, tmp_path: Path) -> None:
    async def main() -> list[int]:
        futs = [asyncio.wrap_future(writer.record_durable("request", i=i)) for i in range(50)]
        return list(await asyncio.gather(*futs))

    seqs = asyncio.run(main())
    assert sorted(seqs) == list(range(1, 51))
    assert {e["seq"] for e in stored(tmp_path)} == set(seqs)


class Reports:
    """record_then's callback: what the writer thread reported, and when."""

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, BaseException | None]] = []
        self.event = threading.Event()
        self.thread: str | None = None

    def __call__(self, seq: int | None, error: BaseException | None) -> None:
        self.calls.append((seq, error))
        self.thread = threading.current_thread().name
        self.event.set()


def test_record_then_reports_the_commit_once_from_the_writer_thread(
    writer: AuditWriter, tmp_path: Path
) -> None:
    first, second = Reports(), Reports()
    assert writer.record("plain")
    assert writer.record_then("request", first, user_id="alice@example.com")
    assert writer.record_then("request", second, user_id="bob@example.com")
    assert first.event.wait(10) and second.event.wait(10)
    assert first.calls == [(2, None)] and second.calls == [(3, None)]
    assert first.thread == "candela-audit-writer"
    assert [e["fields"].get("user_id") for e in stored(tmp_path)] == [
        None,
        "alice@example.com",
        "bob@example.com",
    ]


def test_record_then_commits_at_once_like_a_durable_entry(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))  # plain entries would wait a minute
    w.start()
    r = Reports()
    t0 = time.monotonic()
    assert w.record_then("request", r)
    assert r.event.wait(10) and time.monotonic() - t0 < 30
    assert r.calls == [(1, None)]
    assert w.close()


def test_record_here_commits_on_the_calling_thread_while_the_writer_is_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_journal(monkeypatch)
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))  # the writer thread never looks
    w.start()
    r = Reports()
    assert w.record("policy", user_id="alice@example.com")  # queued, waits for the writer
    assert w.record_here("request", r, user_id="alice@example.com")
    # committed before record_here returned, on this thread, in one batch with the entry
    # queued before it, in queue order
    assert r.calls == [(2, None)] and r.thread == threading.current_thread().name
    assert w.stats().batches_written == 1 and w.backlog == 0
    assert [e["action"] for e in stored(tmp_path)] == ["policy", "request"]
    assert verify_chain(tmp_path / "audit.db").ok
    assert w.close()


@pytest.mark.parametrize("held", ["writer turn", "write gate", "sqlite lock"])
def test_record_here_leaves_the_entry_to_the_writer_thread_rather_than_wait(
    tmp_path: Path, held: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread mid-batch, another worker's write gate or another connection's SQLite
    lock: record_here never waits for them on the caller's thread (the event loop); the entry
    is queued and the writer thread commits it once they are let go. Nothing is lost."""
    no_journal(monkeypatch)
    from candela_mitm.state.gate import WriteGate

    w = AuditWriter(cfg(tmp_path))
    w.start()
    assert w.record_durable("first").result(10) == 1
    other = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    gate = WriteGate(tmp_path / "audit.db")
    if held == "writer turn":
        w._turn.acquire()
    elif held == "write gate":
        ready = threading.Event()
        release = threading.Event()

        def hold() -> None:  # a thread of its own: the gate's lock is per process
            gate.acquire(5)
            ready.set()
            release.wait(10)
            gate.release()

        holder = threading.Thread(target=hold)
        holder.start()
        assert ready.wait(5)
    else:
        other.execute("BEGIN IMMEDIATE")
    r = Reports()
    t0 = time.monotonic()
    assert w.record_here("request", r, user_id="alice@example.com")
    assert time.monotonic() - t0 < 1.0  # did not wait for the lock (busy timeout: 5 s)
    assert r.calls == []  # not committed here
    if held == "writer turn":
        w._turn.release()
    elif held == "write gate":
        release.set()
        holder.join(5)
    else:
        other.execute("COMMIT")
    assert r.event.wait(10)
    assert r.calls == [(2, None)] and r.thread == "candela-audit-writer"
    assert [e["action"] for e in stored(tmp_path)] == ["first", "request"]
    assert w.stats().sqlite_errors == 0 or held == "sqlite lock"
    other.close()
    assert w.close()


def test_a_batch_is_due_for_a_waiter_a_whole_batch_or_an_entry_that_waited_its_delay(
    tmp_path: Path,
) -> None:
    """The writer thread takes the turn only for a due batch: a plain entry younger than
    batch_max_delay_ms is left queued (a request's entry commits it with its own, on the caller's
    thread), and the writer waits until it is due."""
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=100, queue_max_entries=6))  # not started
    assert w._until_due(0.0) == pytest.approx(0.1)  # idle: a look within the delay
    assert w.record("plain")
    at = w._queue[0].at
    assert w._until_due(at + 0.03) == pytest.approx(0.07)  # young: wait until it is due
    assert w._until_due(at + 0.1) is None  # it waited its delay
    assert w.record_then("request", Reports())
    assert w._until_due(at + 0.03) is None  # someone waits for an entry: at once
    w._urgent_seen = w._urgent  # (the writer took that batch)
    w._queue.pop()
    for _ in range(2):
        assert w.record("plain")
    assert w._until_due(at + 0.03) is None  # three queued: half the queue's bound, a batch
    w.close(timeout=0.1)


def test_the_writer_lives_on_when_a_caller_committed_what_was_due_while_it_looked(
    tmp_path: Path,
) -> None:
    """The writer thread found an entry due, and before it took the turn a caller's
    record_here committed it (the writer was syncing the log, or just slow): it looks again.
    It used to take the empty queue for "stopping" and end, silently, leaving every later
    entry of its process uncommitted (seen under load with two workers)."""
    w = AuditWriter(cfg(tmp_path))
    looked = threading.Event()
    raced = threading.Event()
    real_until_due = w._until_due

    def until_due_then_a_caller_commits(now: float) -> float | None:
        wait = real_until_due(now)
        if wait is None and w._queue and not raced.is_set():
            raced.set()
            assert w._commit_here()  # as record_here on the event loop would, meanwhile
        looked.set()
        return wait

    w._until_due = until_due_then_a_caller_commits  # type: ignore[method-assign]
    w.start()
    try:
        first = w.record_durable("llm_request", span_id="first")
        assert first.result(10) == 1 and raced.wait(10)
        time.sleep(0.1)  # the writer's next looks
        assert w._thread is not None and w._thread.is_alive()
        assert w.record_durable("llm_request", span_id="second").result(10) == 2
    finally:
        w.close()
    assert [e["fields"]["span_id"] for e in reversed(query_entries(tmp_path / "audit.db"))] == [
        "first",
        "second",
    ]


def test_record_here_refused_when_the_queue_is_full(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, queue_max_entries=1))  # not started: nothing drains
    assert w.record("fills the queue")
    r = Reports()
    assert w.record_here("x", r) is False and r.calls == []
    w.close(timeout=0.1)


def test_record_then_refused_or_abandoned(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, queue_max_entries=1))  # not started: nothing drains
    assert w.record("fills the queue")
    refused = Reports()
    assert w.record_then("x", refused) is False
    assert refused.calls == []  # not accepted: the caller knows from False, no call
    w.close(timeout=0.1)
    assert w.record_then("after close", refused) is False
    w = AuditWriter(cfg(tmp_path), busy_timeout_ms=10)
    w.start()
    blocker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # every commit fails until close gives up
    abandoned = Reports()
    assert w.record_then("x", abandoned)
    assert w.close(timeout=0.3) is False
    assert abandoned.event.wait(5)
    [(seq, error)] = abandoned.calls
    assert seq is None and isinstance(error, StoreUnavailable)
    blocker.execute("ROLLBACK")
    blocker.close()


def test_a_failing_callback_does_not_stop_the_writer(
    writer: AuditWriter, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(seq: int | None, error: BaseException | None) -> None:
        raise RuntimeError("Event loop is closed")

    with caplog.at_level(logging.ERROR):
        assert writer.record_then("x", broken)
        assert writer.record_durable("y").result(10) == 2
    assert "commit callback failed" in caplog.text
    assert writer.stats().healthy


def test_failing_commits_are_retried_and_counted(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path), busy_timeout_ms=10)
    w.start()
    blocker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: every commit attempt fails
    fut = w.record_durable("x")
    deadline = time.monotonic() + 30
    while w.stats().sqlite_errors < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.stats().sqlite_errors >= 3
    assert not w.stats().healthy
    assert not fut.done()
    blocker.execute("ROLLBACK")
    assert fut.result(5) == 1
    assert w.stats().healthy
    assert w.close()
    blocker.close()


def test_close_gives_up_when_sqlite_never_recovers(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path), busy_timeout_ms=10)
    w.start()
    blocker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    fut = w.record_durable("x")
    w.record("y")
    assert w.close(timeout=0.3) is False
    with pytest.raises(StoreUnavailable):
        fut.result(5)
    assert w.stats().healthy is False
    assert w.abandoned == 2
    blocker.execute("ROLLBACK")
    blocker.close()


def test_damaged_head_stops_appending_instead_of_forking_the_chain(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path), busy_timeout_ms=10)
    w.start()
    w.record_durable("x").result(5)
    raw = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    raw.execute("DROP TRIGGER audit_log_no_update")
    raw.execute("UPDATE audit_log SET hash = 'not hex' WHERE seq = 1")
    raw.close()
    fut = w.record_durable("y")
    deadline = time.monotonic() + 30
    while w.stats().sqlite_errors < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not w.stats().healthy and not fut.done()
    assert "non-hexadecimal" in (w.last_error or "")
    assert w.close(timeout=0.2) is False
    with pytest.raises(StoreUnavailable):
        fut.result(1)


def test_late_record_during_close_is_failed_not_lost(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path))
    w.start()
    assert w.close()
    # a record() that passed the closed check just before close(): simulate by queueing directly
    fut: Future[int] = Future()
    w._queue.append(_Item(("x", None, None, "{}"), _Callback.resolving(fut)))
    assert w.close() is False
    with pytest.raises(StoreUnavailable):
        fut.result(0)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from candela_mitm.audit import AuditWriter
    from candela_mitm.config import Audit

    db, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = AuditWriter(Audit(sqlite_path=db, batch_max_entries=int(sys.argv[4])))
    w.start()
    for i in range(count):
        while not w.record("request", user_id=tag, i=i):
            pass
    assert w.close()
    """
)


def test_several_processes_share_one_chain(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, str(db), f"worker{k}", "3000", str(batch)]
        )
        for k, batch in enumerate((5, 64, 512))
    ]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    result = verify_chain(db)
    assert (result.ok, result.count) == (True, 9000)
    conn = sqlite3.connect(db)
    for k in range(3):
        got = [
            json.loads(f)["i"]
            for (f,) in conn.execute(
                "SELECT fields FROM audit_log WHERE user_id = ? ORDER BY seq", (f"worker{k}",)
            )
        ]
        assert got == list(range(3000))  # each worker's entries complete and in its own order


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from candela_mitm.audit import AuditWriter
    from candela_mitm.config import Audit

    w = AuditWriter(Audit(sqlite_path=sys.argv[1]))
    w.start()
    out = threading.Lock()

    def client(k):
        i = 0
        while True:
            seq = w.record_durable("request", user_id=f"client{k}", i=i).result()
            with out:
                sys.stdout.write(f"{seq}\\n")
                sys.stdout.flush()
            i += 1

    for k in range(8):
        threading.Thread(target=client, args=(k,), daemon=True).start()
    n = 0
    while True:  # background load that nobody waits for, about 20,000 entries/s
        w.record("request", user_id="bulk", n=n)
        n += 1
        if n % 50 == 0:
            time.sleep(0.0025)
    """
)


def test_acknowledged_entries_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acked: list[int] = []
    deadline = time.monotonic() + 30
    while len(acked) < 3000 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait(10)
    # only lines the process finished writing count as acknowledged
    acked += [int(x) for x in rest.split("\n")[:-1] if x]
    assert len(acked) >= 3000, "the writer did not acknowledge enough entries in time"
    result = verify_chain(db)
    assert result.ok, result.reason
    conn = sqlite3.connect(db)
    present = {s for (s,) in conn.execute("SELECT seq FROM audit_log")}
    missing = set(acked) - present
    assert not missing, f"{len(missing)} acknowledged entries lost, e.g. {sorted(missing)[:5]}"
    assert result.count == len(present) > len(acked)  # the bulk load was committed too
    # after a restart the chain continues
    w = AuditWriter(Audit(sqlite_path=str(db)))
    w.start()
    seq = w.record_durable("proxy_start").result(10)
    w.close()
    assert seq == result.head_seq + 1
    assert verify_chain(db).ok


def test_throughput(tmp_path: Path) -> None:
    """Sanity, not a benchmark: prints entries/s (target >= 20,000/s batched)."""
    n = 50_000
    w = AuditWriter(cfg(tmp_path, queue_max_entries=n))
    w.start()
    started = time.perf_counter()
    for i in range(n):
        w.record(
            "request",
            user_id="alice@example.com",
            tenant_id="t1",
            model="gpt-4o",
            i=i,
            input_tokens=10,
            output_tokens=20,
            cost_usd=0.0012,
        )
    assert w.flush(120)
    rate = n / (time.perf_counter() - started)

    done = threading.Event()
    durable_count = [0]

    def client() -> None:
        while not done.is_set():
            w.record_durable("request", user_id="bob").result(10)
            durable_count[0] += 1

    threads = [threading.Thread(target=client) for _ in range(16)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(1.0)
    done.set()
    for t in threads:
        t.join()
    durable_rate = durable_count[0] / (time.perf_counter() - started)
    w.close()
    print(
        f"\naudit writer: {rate:,.0f} entries/s batched (record + commit), {durable_rate:,.0f} durable entries/s with 16 waiting clients"
    )
    assert verify_chain(tmp_path / "audit.db").count == n + durable_count[0]


# issue 7: workers sharing one ledger queue on its write gate, not in SQLite's busy handler
def test_writers_sharing_a_ledger_queue_on_its_gate(tmp_path: Path) -> None:
    import fcntl

    w = AuditWriter(cfg(tmp_path), busy_timeout_ms=100)
    w.start()
    try:
        other = os.open(
            f"{w.db_path}.lock", os.O_RDWR | os.O_CREAT
        )  # another worker's writer, committing
        fcntl.flock(other, fcntl.LOCK_EX)
        try:
            fut = w.record_durable("llm_request", user_id="u")
            # past the writer's timeout it fails, counts it, and retries: waited for (a fixed
            # 0.3 s could pass before the writer thread's first try on a loaded machine)
            until(
                lambda: (w.sqlite_errors, w.healthy),
                lambda seen: seen[0] >= 1 and not seen[1],
                what="a failed try (errors, healthy)",
            )
            assert not fut.done() and w.head_seq == 0
            assert w.sqlite_errors >= 1 and not w.healthy
        finally:
            os.close(other)  # released: the next try commits
        assert fut.result(timeout=10) == 1
        assert w.healthy
        fut2 = w.record_durable("llm_request", user_id="u")
        assert fut2.result(timeout=10) == 2
    finally:
        w.close()
    assert verify_chain(w.db_path).ok


def test_two_writers_on_one_ledger_build_one_chain(tmp_path: Path) -> None:
    """Two writers (as two workers have) appending at once: every entry, one chain."""
    writers = [AuditWriter(cfg(tmp_path)) for _ in range(2)]
    for w in writers:
        w.start()
    futures = [
        w.record_durable("llm_request", user_id=f"u{i}") for i in range(200) for w in writers
    ]
    seqs = sorted(f.result(timeout=30) for f in futures)
    for w in writers:
        w.close()
    assert seqs == list(range(1, 401))
    result = verify_chain(writers[0].db_path)
    assert result.ok and result.count == 400


@pytest.mark.parametrize(("durability", "synchronous"), [("power_loss", 2), ("process_crash", 1)])
def test_durability_sets_how_each_commit_reaches_the_disk(
    tmp_path: Path, durability: str, synchronous: int
) -> None:
    """power_loss fsyncs every commit (FULL = 2); process_crash writes it to the OS and leaves
    the fsync to checkpoints (NORMAL = 1): still every committed entry outlives the process."""
    w = AuditWriter(Audit(sqlite_path=str(tmp_path / "audit.db"), durability=durability))  # type: ignore[arg-type]
    w.start()
    try:
        assert w._conn is not None
        assert w._conn.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        w.record_durable("llm_request", user_id="u", span_id="s").result(10)
    finally:
        w.close()
    assert [e["fields"]["span_id"] for e in query_entries(tmp_path / "audit.db")] == ["s"]


def test_process_crash_is_the_default_and_power_loss_syncs_nothing_itself(tmp_path: Path) -> None:
    """process_crash (the default) keeps a WalSync for the writer thread; power_loss leaves
    every sync to SQLite's commit (FULL) and has none."""
    assert Audit().durability == "process_crash" and Audit().sync_interval_ms == 100
    assert AuditWriter(cfg(tmp_path))._sync is not None
    assert AuditWriter(cfg(tmp_path, durability="power_loss"))._sync is None


class _Syncs:
    """A WalSync stand-in: counts calls, optionally failing, optionally calling the real one."""

    def __init__(self, real: Any = None, fail: int = 0) -> None:
        self.real, self.fail, self.calls = real, fail, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            raise OSError(5, "Input/output error")
        if self.real is not None:
            self.real()


def test_the_log_is_synced_when_the_oldest_unsynced_commit_is_one_interval_old(
    tmp_path: Path,
) -> None:
    """The writer's looks, on a clock of the test's: nothing unsynced, no sync, and a look
    within the interval; a commit at t, no sync before t + interval, its sync at or after it,
    and the writer never waits past the next sync."""
    w = AuditWriter(cfg(tmp_path, sync_interval_ms=100))
    syncs = w._sync = _Syncs()
    assert w._sync_when_due(10.0, 5.0) == 0.1  # nothing unsynced: looks again within 100 ms
    assert w._sync_when_due(10.0, None) is None  # a batch due now stays due now
    assert syncs.calls == 0
    w._commits, w._unsynced_at = 1, 10.0  # a commit at t = 10 s
    assert w._sync_when_due(10.06, 5.0) == pytest.approx(0.04)
    assert w._sync_when_due(10.06, 0.01) == 0.01  # a batch comes first
    assert syncs.calls == 0
    assert w._sync_when_due(10.1, 5.0) == 0.1
    assert syncs.calls == 1 and w._unsynced_at is None and w._synced == 1 and w.syncs == 1


def test_a_failed_sync_is_counted_and_tried_again_an_interval_later(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, sync_interval_ms=100))
    syncs = w._sync = _Syncs(fail=1)
    w._commits, w._unsynced_at = 3, 10.0
    assert w._sync_when_due(10.2, None) is None
    assert (syncs.calls, w.sync_errors, w.syncs, w._synced) == (1, 1, 0, 0)
    assert w._unsynced_at is not None  # still owed
    w._unsynced_at = 10.2
    w._sync_when_due(10.25, 5.0)
    assert syncs.calls == 1  # not before the interval
    w._sync_when_due(10.3, 5.0)
    assert (syncs.calls, w.syncs, w._synced, w._unsynced_at) == (2, 1, 3, None)


def test_commits_made_during_a_sync_stay_owed(tmp_path: Path) -> None:
    """Only the commits counted before the fsync began are marked synced."""
    w = AuditWriter(cfg(tmp_path))

    def sync_while_a_commit_lands() -> None:
        w._commits += 1  # a caller's thread committed while the fsync ran

    w._sync = sync_while_a_commit_lands
    w._commits, w._unsynced_at = 1, 1.0
    assert w._sync_log()
    assert w._synced == 1 and w._commits == 2 and w._unsynced_at is not None


def test_process_crash_commits_are_synced_soon_after_and_at_close(tmp_path: Path) -> None:
    """On a real ledger: entries committed by the writer thread and on the caller's thread
    (record_here) are owed a sync until the writer thread makes it, a sync is made for many
    commits together, and close syncs what is still owed."""
    w = AuditWriter(cfg(tmp_path, sync_interval_ms=20))
    w.start()
    try:
        syncs = w._sync = _Syncs(real=w._sync)
        for i in range(20):
            w.record_durable("llm_request", user_id="u", span_id=f"s{i}").result(10)
        done: list[int] = []
        assert w.record_here("llm_request", lambda seq, err: done.append(seq or 0), span_id="h")
        deadline = time.monotonic() + 30
        while (w._unsynced_at is not None or not syncs.calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w._unsynced_at is None and w._synced == w._commits and w.sync_errors == 0
        assert 1 <= syncs.calls <= w._commits
        w._sync = _Syncs(real=syncs.real)  # a long interval from now: only close syncs
        w.cfg = w.cfg.model_copy(update={"sync_interval_ms": 60_000})
        w.record_durable("llm_request", user_id="u", span_id="last").result(10)
        assert w._unsynced_at is not None
    finally:
        w.close()
    assert w._unsynced_at is None and w._sync.calls == 1  # type: ignore[union-attr]
    assert len(query_entries(tmp_path / "audit.db", limit=100)) == 22


def test_wal_sync_fsyncs_the_log_and_its_folder_once_per_log_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from candela_mitm.audit import sqlite_sink

    w = AuditWriter(cfg(tmp_path))
    w.start()
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    try:
        w.record_durable("llm_request", span_id="s").result(10)
        monkeypatch.setattr(sqlite_sink.os, "fsync", fsync)
        sync = sqlite_sink.WalSync(tmp_path / "audit.db")
        sync()
        sync()
    finally:
        monkeypatch.undo()
        w.close()
    wal = str(tmp_path / "audit.db-wal")
    assert synced == [wal, str(tmp_path), wal]


class _CountingEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


def test_only_a_waited_for_entry_or_a_full_batch_wakes_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While entries come (the writer has seen one within PARK_AFTER_S, an hour here), an entry
    nobody waits for is committed at the writer's next look (every batch_max_delay_ms) or with
    the next durable one, without a wake of its own; a durable entry, a flush and a whole batch
    queued wake it at once."""
    import candela_mitm.audit.writer as writer_module

    monkeypatch.setattr(writer_module, "PARK_AFTER_S", 3600.0)
    w = AuditWriter(cfg(tmp_path, batch_max_entries=4, batch_max_delay_ms=20))
    wake = w._wake = _CountingEvent()
    w.start()
    try:
        time.sleep(0.05)  # the writer idles, looking by the clock
        base = wake.sets
        assert w.record("model_policy_check", result="allowed", model="m")
        assert wake.sets == base
        deadline = time.monotonic() + 30
        while w.stats().backlog and time.monotonic() < deadline:  # committed at its next look
            time.sleep(0.005)
        assert w.stats().backlog == 0 and wake.sets == base

        for i in range(2):
            assert w.record("model_policy_check", result="allowed", model=f"m{i}")
        assert wake.sets == base
        seq = w.record_durable("llm_request", user_id="u").result(10)  # woken: commits all three
        assert wake.sets == base + 1 and seq == 4 and w.stats().backlog == 0

        for i in range(4):  # a whole batch: the fourth wakes it
            assert w.record("model_policy_check", result="allowed", model=f"b{i}")
        assert wake.sets == base + 2
        assert w.flush(10)
    finally:
        w.close()
    assert [e["action"] for e in stored(tmp_path)].count("model_policy_check") == 7
    assert verify_chain(tmp_path / "audit.db").ok


def test_commits_on_the_calling_thread_never_checkpoint_the_log(tmp_path: Path) -> None:
    """record_here's connection (the event loop's) leaves the log to grow past SQLite's 1,000
    pages without copying it into the ledger file (a checkpoint there held the loop 10-120 ms);
    nothing is lost: every entry is read back, chained."""
    # the writer thread never looks (no sync under power_loss, a batch delay of a minute)
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000, durability="power_loss"))
    w.start()
    db = tmp_path / "audit.db"
    before = db.stat().st_size
    for _ in range(400):  # ~1,200 pages of log
        assert w.record_here("request", Reports(), user_id="alice@example.com", blob="x" * 12_000)
    assert w.stats().batches_written == 400 and w.checkpoints == 0
    assert db.stat().st_size == before  # nothing copied back into the file
    assert Path(f"{db}-wal").stat().st_size > 1_000 * 4096
    assert len(stored(tmp_path)) == 400 and verify_chain(db).ok
    assert w.close()


def test_the_writer_thread_checkpoints_after_commits_on_callers_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_journal(monkeypatch)
    from candela_mitm.audit import writer as writer_module

    monkeypatch.setattr(writer_module, "HERE_CHECKPOINT_EVERY", 20)
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=10))  # it looks every 10 ms
    w.start()
    db = tmp_path / "audit.db"
    before = db.stat().st_size
    for _ in range(19):
        assert w.record_here("request", Reports(), user_id="alice@example.com", blob="x" * 3000)
    time.sleep(0.1)  # several looks: not due yet
    assert w.checkpoints == 0 and db.stat().st_size == before
    assert w.record_here("request", Reports(), user_id="alice@example.com", blob="x" * 3000)
    until(lambda: w.checkpoints == 1)
    assert db.stat().st_size > before  # the 20 entries copied into the ledger file
    assert len(stored(tmp_path)) == 20 and verify_chain(db).ok
    assert w.close()


class CountedEvent(threading.Event):
    """The writer's wake: how many times the writer thread waited on it, and whether it is
    waiting now."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0
        self.waiting = False

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        self.waiting = True
        try:
            return super().wait(timeout)
        finally:
            self.waiting = False


def test_an_idle_writer_sleeps_until_an_entry_or_a_commit_here_wakes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No entry for PARK_AFTER_S, nothing queued, nothing unsynced: the writer thread waits
    until woken (it looked every batch_max_delay_ms before, 20 times a second). A queued entry
    still commits within its delay, and a commit on a caller's thread is still synced within
    the interval: both wake it (PARK_MAX_S, its look without a wake, is an hour here: only a
    wake can do either)."""
    no_journal(monkeypatch)
    import candela_mitm.audit.writer as writer_module

    monkeypatch.setattr(writer_module, "PARK_MAX_S", 3600.0)
    monkeypatch.setattr(writer_module, "PARK_AFTER_S", 0.1)
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=10, sync_interval_ms=10))
    wake = w._wake = CountedEvent()
    w.start()
    # asleep: parked and inside its wait (not between the flag and the wait)
    until(lambda: w._parked and wake.waiting, what="the writer asleep")
    before = wake.waits
    time.sleep(0.3)  # 30 looks at the old batch delay
    assert wake.waits == before and w._parked

    assert w.record("policy", user_id="alice@example.com")  # no waiter: woken for it all the same
    until(lambda: w.stats().entries_written, lambda n: n == 1, what="the entry committed")
    until(lambda: w.syncs, lambda n: n == 1, what="the writer's commit synced")
    until(lambda: w._parked, what="the writer asleep again")

    r = Reports()
    assert w.record_here("request", r, user_id="alice@example.com")
    assert r.calls == [(2, None)]  # committed on this thread, while the writer slept
    until(lambda: w.syncs, lambda n: n == 2, what="the commit made here synced")
    assert verify_chain(tmp_path / "audit.db").ok
    assert w.close()


def test_flat_fields_are_kept_as_recorded_and_prepared_by_whoever_commits_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry nobody waits for whose fields are all flat (a model policy check, recorded
    before its request is forwarded) is redacted and encoded when it is committed: here by the
    request's own record_here, after it, on the caller's thread; what is stored is what an
    eager preparation stores."""
    no_journal(monkeypatch)
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))  # the writer thread never looks
    w.start()
    prepared: list[tuple[str, str]] = []
    real = w._prepare

    def spy(action: str, fields: dict[str, Any]) -> Any:
        prepared.append((action, threading.current_thread().name))
        return real(action, fields)

    monkeypatch.setattr(w, "_prepare", spy)
    assert w.record(
        "model_policy_check",
        result="allowed",
        user_id="alice@example.com",
        api_key="sk-1",
        note="Authorization: Bearer abc.def",
        n=3,
        ok=True,
        none=None,
        f=1.5,
    )
    assert prepared == []  # nothing redacted or encoded on the request's path
    r = Reports()
    assert w.record_here("llm_request", r, user_id="alice@example.com")
    here = threading.current_thread().name
    assert prepared == [("llm_request", here), ("model_policy_check", here)]
    assert r.calls == [(2, None)]
    first = stored(tmp_path)[0]
    assert first["action"] == "model_policy_check" and first["user_id"] == "alice@example.com"
    fields = first["fields"]
    assert fields["api_key"] == REDACTED and "abc.def" not in fields["note"]
    assert (fields["n"], fields["ok"], fields["none"], fields["f"]) == (3, True, None, 1.5)
    assert verify_chain(tmp_path / "audit.db").ok
    assert w.close()


def test_a_flat_entry_that_cannot_be_encoded_is_recorded_as_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = AuditWriter(cfg(tmp_path))
    w.start()
    real, calls = w._prepare, []

    def first_fails(action: str, fields: dict[str, Any]) -> Any:
        calls.append(action)
        if len(calls) == 1:
            raise RuntimeError("cannot encode")
        return real(action, fields)

    monkeypatch.setattr(w, "_prepare", first_fails)
    assert w.record("model_policy_check", n=3)
    assert w.flush(10)
    assert [e["fields"] for e in stored(tmp_path)] == [{"n": "3"}]
    assert w.stats().entries_written == 1 and w.healthy
    assert w.close()


def test_an_entry_waited_for_beyond_a_whole_batch_is_committed_at_once(tmp_path: Path) -> None:
    """A batch is at most batch_max_entries: an entry someone waits for that did not fit in it
    is taken by the next look, not left for batch_max_delay_ms (it was, once the wait that
    made the first batch due had been counted as seen)."""
    w = AuditWriter(cfg(tmp_path, batch_max_entries=4, batch_max_delay_ms=60_000))
    w.start()
    with w._turn:  # the writer busy: everything below is queued before it looks
        for i in range(6):
            assert w.record("plain", i=i)
        r = Reports()
        assert w.record_then("request", r)
    assert r.event.wait(10), "the entry waited for was left for the batch delay"
    assert r.calls == [(7, None)]
    assert w.close()
