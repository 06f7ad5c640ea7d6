"""Tests for the entry journal: a request's entry durable in one append, chained by the writer
thread later, and replayed into the ledger when its process died first (audit/journal.py)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.audit import AuditWriter, query_entries, verify_chain
from candela_mitm.audit import writer as writer_module
from candela_mitm.audit.journal import (
    decode,
    encode,
    journal_dir,
    last_line,
    lines_behind,
    read_entries,
    wait_for_journals,
)
from candela_mitm.config import Audit
from tests.wait import until


class Reports:
    def __init__(self) -> None:
        self.calls: list[tuple[int | None, BaseException | None]] = []
        self.thread = ""

    def __call__(self, seq: int | None, error: BaseException | None) -> None:
        self.calls.append((seq, error))
        self.thread = threading.current_thread().name


def cfg(tmp_path: Path, **kw: Any) -> Audit:
    return Audit(sqlite_path=str(tmp_path / "audit.db"), **kw)


def stored(db: Path) -> list[dict[str, Any]]:
    return list(reversed(query_entries(db, limit=10_000)))


def journals(tmp_path: Path) -> list[Path]:
    return sorted(journal_dir(tmp_path / "audit.db").glob("*.log"))


def marks(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return [(str(j), int(n)) for j, n in conn.execute("SELECT journal, upto FROM audit_journal")]


def test_a_line_is_the_entry_it_was_made_from() -> None:
    entry = ("llm_request", "al\tice@example.com", None, '{"a":"line\\nfeed","n":1}')
    line = encode(7, entry, 1_796_000_000_123_456_789)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line[:-1]) == (7, entry, 1_796_000_000_123_456_789)
    for bad in (
        b"no tab",
        b'[1, "a", null, null, 5]\t{not json',
        b'["1", "a", null, null, 5]\t{}',
        b'[1, "a", null, null]\t{}',
    ):
        assert decode(bad) is None


def test_record_here_journals_the_entry_and_those_before_it_and_returns(tmp_path: Path) -> None:
    """Written to the journal in one append, the wait ends on this thread at once; the ledger
    gets them from the writer thread in queue order, with the journal's mark."""
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))  # the writer thread never looks
    w.start()
    r = Reports()
    assert w.record("policy", user_id="alice@example.com", result="allowed")
    assert w.record_here("request", r, user_id="alice@example.com", tenant_id="t")
    assert r.calls == [(None, None)] and r.thread == threading.current_thread().name
    assert stored(db) == []  # in the journal, not yet in the ledger
    (path,) = journals(tmp_path)
    lines = list(read_entries(path))
    assert [(n, e[0], e[1], e[2]) for n, e, _ in lines] == [
        (1, "policy", "alice@example.com", None),
        (2, "request", "alice@example.com", "t"),
    ]
    assert w.journaled == 2 and w.backlog == 2
    assert w.flush(10)
    assert [e["action"] for e in stored(db)] == ["policy", "request"]
    assert marks(db) == [(path.name, 2)]
    assert verify_chain(db).ok
    assert w.close()
    assert journals(tmp_path) == [] and marks(db) == []  # all in the ledger: removed


def test_an_entry_a_batch_took_first_is_not_journaled(tmp_path: Path) -> None:
    """The writer thread took an entry for a commit before any journal write: the next journal
    write leaves it out (it is committed, not journaled), and nothing is chained twice."""
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))
    w.start()
    assert w.record("early")
    with w._turn:
        items = w._drain(w._queue)
        assert [it.jn for it in items] == [-1]
        w._queue.extendleft(reversed(items))  # (committed below, after the journaled one)
        w._taken -= len(items)
    assert w.record_here("request", Reports())
    (path,) = journals(tmp_path)
    assert [e[0] for _, e, _ in read_entries(path)] == ["request"]
    assert w.flush(10)
    assert [e["action"] for e in stored(db)] == ["early", "request"]
    assert w.close() and verify_chain(db).ok


def in_ledger(db: Path) -> list[str]:
    """The ledger's actions as they are, without waiting for the journals (query_entries does)."""
    with sqlite3.connect(db) as conn:
        return [a for (a,) in conn.execute("SELECT action FROM audit_log ORDER BY seq")]


def test_journaled_entries_wait_the_chain_delay_one_not_journaled_the_batch_delay(
    tmp_path: Path,
) -> None:
    """A journaled entry is durable already: the writer chains it into the ledger within
    journal_chain_delay_ms (fewer, larger commits at few requests); an entry queued behind it
    that is not journaled is due by batch_max_delay_ms, and takes the journaled one along."""
    db = tmp_path / "audit.db"
    w = AuditWriter(
        cfg(tmp_path, batch_max_delay_ms=20, journal_chain_delay_ms=3_000, sync_interval_ms=60_000)
    )
    w.start()
    try:
        assert w.record_here("request", Reports())
        time.sleep(0.5)  # 25 batch delays: a batch delay would have chained it long ago
        assert in_ledger(db) == [] and w.backlog == 1
        assert w.record("policy")  # not journaled, and no wake: the writer looks by its due time
        until(lambda: in_ledger(db), lambda a: a == ["request", "policy"], timeout=2.0)
        # alone, a journaled entry is chained by the chain delay
        assert w.record_here("request", Reports())
        until(lambda: in_ledger(db), lambda a: len(a) == 3, timeout=6.0)
    finally:
        assert w.close()
    assert verify_chain(db).ok


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import threading
    from candela_mitm.audit import AuditWriter
    from candela_mitm.config import Audit

    db, first = sys.argv[1], int(sys.argv[2])
    w = AuditWriter(Audit(sqlite_path=db, batch_max_delay_ms=60_000))
    w.start()
    for i in range(400):
        if i == first:
            assert w.flush(10)  # the first ones reach the ledger, the journal's mark with them
        w.record("policy", i=i)
        done, ev = [], threading.Event()
        assert w.record_here("request", lambda seq, err: (done.append(err), ev.set()), i=i)
        assert ev.wait(10) and done == [None]  # (committed, when the writer held the turn)
        print(i, flush=True)
    sys.stdin.read()  # killed here
    """
)


def kill_after_400_answers(db: Path, first: int) -> None:
    """KILL_SCRIPT in a process of its own, killed (-9) once its 400 requests were answered."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(db), str(first)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    acked = [int(proc.stdout.readline()) for _ in range(400)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert acked == list(range(400))


@pytest.mark.parametrize("first", [0, 150])
def test_journaled_entries_of_a_killed_process_are_replayed_at_the_next_start(
    tmp_path: Path, first: int
) -> None:
    """kill -9 after 400 acknowledged requests, `first` of them already in the ledger: the next
    start appends the rest from the journal, once each, in order, the chain intact."""
    db = tmp_path / "audit.db"
    kill_after_400_answers(db, first)
    # what the flush committed, and any whole batch the writer thread took meanwhile
    before = len(stored(db))
    assert before >= 2 * first
    (path,) = journals(tmp_path)
    w = AuditWriter(cfg(tmp_path))
    w.start()
    assert w.replayed == 800 - before
    assert w.record_durable("proxy_start").result(10) == 801
    assert w.close()
    entries = stored(db)
    assert [(e["action"], e["fields"].get("i")) for e in entries[:-1]] == [
        (a, i) for i in range(400) for a in ("policy", "request")
    ]
    assert verify_chain(db).ok
    assert not path.exists() and journals(tmp_path) == [] and marks(db) == []


def test_a_running_writer_appends_the_journal_of_a_process_killed_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two proxies share a ledger and one is killed: the other appends the dead one's journal
    within a sweep, without a restart; its own journal is left to it."""
    monkeypatch.setattr(writer_module, "SWEEP_EVERY_S", 0.05)
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path))
    w.start()
    assert w.record_durable("proxy_start").result(10) == 1
    kill_after_400_answers(db, 0)
    assert w.record_here("request", Reports(), i="mine")  # (only in this writer's journal)
    until(lambda: w.replayed, lambda n: n > 0, what="the dead journal appended")
    assert len(journals(tmp_path)) == 1  # this writer's own
    assert w.close()
    entries = stored(db)
    assert len(entries) == 802 and w.replayed <= 800
    assert sorted(
        (e["fields"]["i"], e["action"]) for e in entries if e["action"] in ("policy", "request")
        and e["fields"]["i"] != "mine"
    ) == sorted((i, a) for i in range(400) for a in ("policy", "request"))
    assert verify_chain(db).ok and journals(tmp_path) == [] and marks(db) == []


def test_a_live_process_journal_is_left_to_it(tmp_path: Path) -> None:
    """A second writer on the same ledger (another worker) starts while the first one's entry
    is only journaled: it replays nothing; the first one chains its own entry."""
    db = tmp_path / "audit.db"
    first = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))
    first.start()
    assert first.record_here("request", Reports(), i=1)
    second = AuditWriter(cfg(tmp_path))
    second.start()
    assert second.replayed == 0 and len(journals(tmp_path)) == 2
    assert second.close()
    assert first.close()
    assert [e["action"] for e in stored(db)] == ["request"]
    assert journals(tmp_path) == [] and verify_chain(db).ok


def test_an_unfinished_last_line_and_a_damaged_one_are_not_replayed(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path))
    w.start()  # (creates the ledger)
    assert w.close()
    folder = journal_dir(db)
    path = folder / "99999-dead.log"
    path.write_bytes(
        encode(1, ("a", None, None, '{"n":1}'), 1)
        + b"garbage\n"
        + encode(2, ("b", None, None, '{"n":2}'), 2)
        + encode(3, ("c", None, None, '{"n":3}'), 3)[:-5]
    )
    w = AuditWriter(cfg(tmp_path))
    w.start()
    assert w.replayed == 2
    assert w.close()
    assert [e["action"] for e in stored(db)] == ["a", "b"] and verify_chain(db).ok
    assert journals(tmp_path) == []


def test_the_journal_is_emptied_once_the_ledger_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import candela_mitm.audit.writer as writer_module

    monkeypatch.setattr(writer_module, "TRUNCATE_AT_BYTES", 500)
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))
    w.start()
    for i in range(5):
        assert w.record_here("request", Reports(), i=i, blob="x" * 200)
    (path,) = journals(tmp_path)
    assert path.stat().st_size > 1000
    assert w.flush(10)
    # every line in the ledger: emptied (by the writer thread, after the flush's commit reports)
    until(lambda: path.stat().st_size, lambda size: size == 0, what="the journal's size")
    until(lambda: not w._turn.locked(), what="the writer done with its batch")
    assert w.record_here("request", Reports(), i=5)
    assert [n for n, _, _ in read_entries(path)] == [6]  # numbering goes on
    assert w.flush(10) and marks(db) == [(path.name, 6)]
    assert w.close()
    assert [e["fields"]["i"] for e in stored(db)] == list(range(6))


def test_a_failing_journal_falls_back_to_the_commit_before_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))
    w.start()
    assert w._journal is not None

    def full(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w._journal, "append", full)
    first, second = Reports(), Reports()
    assert w.record_here("request", first, i=1)
    assert first.calls == [(1, None)]  # committed here, with its seq, before returning
    assert w.journal_errors == 1
    assert w.record_here("request", second, i=2)
    assert second.calls == [(2, None)] and w.journal_errors == 1  # no more journal tries
    monkeypatch.undo()  # space is back
    w.record("plain")
    assert w.flush(10)  # a commit with the ledger holding every journaled line: journal again
    until(lambda: w.journaling, what="the journal written again")  # (after the flush's commit)
    until(lambda: not w._turn.locked(), what="the writer done with its batch")
    third = Reports()
    assert w.record_here("request", third, i=3)
    assert third.calls == [(None, None)]
    (path,) = journals(tmp_path)
    assert [e[0] for _, e, _ in read_entries(path)] == ["request"]  # emptied first
    assert w.close()
    assert [e["fields"].get("i") for e in stored(db)] == [1, 2, None, 3] and verify_chain(db).ok


def test_power_loss_durability_has_no_journal(tmp_path: Path) -> None:
    w = AuditWriter(cfg(tmp_path, durability="power_loss", batch_max_delay_ms=60_000))
    w.start()
    r = Reports()
    assert w.record_here("request", r)
    assert r.calls == [(1, None)]  # committed (and fsynced) before the answer
    assert journals(tmp_path) == []
    assert w.close()


def test_record_here_with_the_journal_does_not_wake_the_writer(tmp_path: Path) -> None:
    """The journaled entry waits for its due time: no wake of the writer thread per request."""
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=200))
    w.start()
    time.sleep(0.05)
    w._wake.clear()
    assert w.record_here("request", Reports())
    assert not w._wake.is_set()
    assert w.flush(10) and w.close()


def test_an_entry_keeps_the_time_it_was_journaled(tmp_path: Path) -> None:
    """Its time in the ledger is when it became durable (the answer's end), not when the
    writer thread chained it: replays of the log (`candela policy replay`) read it so."""
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))
    w.start()
    assert w.record_here("request", Reports(), i=1)
    (path,) = journals(tmp_path)
    [(_, _, t_ns)] = list(read_entries(path))
    time.sleep(0.3)
    assert w.flush(10)
    assert w.close()
    [entry] = stored(db)
    from candela_mitm.audit.sqlite_sink import now_ts

    assert entry["ts"] == now_ts(t_ns)


def test_readers_wait_for_the_running_proxies_journaled_entries(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=300))
    w.start()
    assert lines_behind(db) == 0
    for i in range(3):
        assert w.record_here("request", Reports(), i=i)
    (path,) = journals(tmp_path)
    assert last_line(path) == 3 and lines_behind(db) == 3
    assert wait_for_journals(db, 10) == 0  # chained by the writer within its batch delay
    assert len(stored(db)) == 3
    assert wait_for_journals(db, 0) == 0
    assert w.close()


CANDELA = str(Path(sys.executable).parent / "candela")


def test_candela_audit_appends_a_dead_proxys_journal_before_it_reads(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(db), "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(400):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    q = subprocess.run(
        [CANDELA, "audit", "--db", str(db), "query", "SELECT count(*) AS n FROM audit",
         "--format", "csv"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert q.returncode == 0, q.stderr
    assert q.stdout.split() == ["n", "800"]
    assert journals(tmp_path) == [] and verify_chain(db).ok


def test_prepare_queued_prepares_the_flat_entries_no_journal_write_took_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a request alone does while its upstream works (addons/audit.py): the flat entries
    queued (its policy check) are redacted and encoded then, once; the answer's journal write
    encodes only its own entry, and what is stored is the same. Nothing while the writer
    thread holds the turn."""
    db = tmp_path / "audit.db"
    w = AuditWriter(cfg(tmp_path, batch_max_delay_ms=60_000))  # the writer thread never looks
    w.start()
    prepared: list[str] = []
    real = w._prepare

    def spy(action: str, fields: dict[str, Any]) -> Any:
        prepared.append(action)
        return real(action, fields)

    monkeypatch.setattr(w, "_prepare", spy)
    assert w.prepare_queued() == 0  # nothing queued
    assert w.record("policy", user_id="alice@example.com", api_key="sk-1")
    with w._turn:  # the writer thread takes a batch: left to it
        assert w.prepare_queued() == 0
    assert prepared == []
    assert w.prepare_queued() == 1 and prepared == ["policy"]
    assert w.prepare_queued() == 0  # prepared once
    assert w.record_here("request", Reports(), user_id="alice@example.com")
    assert prepared == ["policy", "request"]
    assert w.record("later")
    assert w.prepare_queued() == 1  # past the journaled ones only
    assert w.flush(10)
    entries = stored(db)
    assert [e["action"] for e in entries] == ["policy", "request", "later"]
    assert entries[0]["fields"]["api_key"] == "[redacted]"
    assert w.close() and verify_chain(db).ok
