"""The SQLite audit ledger: the system of record, append-only by trigger, authorizer and defensive mode."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from candela_mitm.audit.chain import GENESIS_HASH, ROW_COLUMNS, Row, row_hash

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    action TEXT NOT NULL,
    user_id TEXT,
    tenant_id TEXT,
    fields TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_action ON audit_log (action, seq);
CREATE INDEX IF NOT EXISTS audit_log_user ON audit_log (user_id, seq);
CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE is not allowed'); END;
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_journal (journal TEXT PRIMARY KEY, upto INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_meta_no_update BEFORE UPDATE ON audit_meta
BEGIN SELECT RAISE(ABORT, 'audit_meta is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER IF NOT EXISTS audit_meta_no_delete BEFORE DELETE ON audit_meta
BEGIN SELECT RAISE(ABORT, 'audit_meta is append-only: DELETE is not allowed'); END;
"""

_PROTECTED = {"audit_log", "audit_meta"}
_SQLITE_DBCONFIG_DEFENSIVE = 1010


_second: tuple[int, str] = (-1, "")


def now_ts(ns: int | None = None) -> str:
    """The current UTC time (or `ns`, nanoseconds since the epoch) in the ledger's fixed-width
    format (sorts as text): %Y-%m-%dT%H:%M:%S.%fZ, microseconds truncated as datetime.now's.

    The part up to the second is written by isoformat once a second, the microseconds each
    call (datetime.now(UTC).isoformat per call took 1.2 µs, warm; this 0.4)."""
    global _second
    if ns is None:
        ns = time.time_ns()
    sec, us = divmod(ns // 1000, 1_000_000)
    cached = _second
    if cached[0] != sec:  # two threads may both write it: the same value
        cached = _second = (sec, datetime.fromtimestamp(sec, UTC).isoformat()[:19])
    return f"{cached[1]}.{us:06d}Z"


def _authorizer(
    action: int, arg1: str | None, arg2: str | None, dbname: str | None, source: str | None
) -> int:
    # A second line of defence inside our own process: even a bug that builds SQL cannot
    # rewrite, delete or drop ledger rows or their triggers through this connection.
    if action in (sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE) and arg1 in _PROTECTED:
        return sqlite3.SQLITE_DENY
    if action in (
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_ALTER_TABLE,
    ):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def enable_defensive(conn: sqlite3.Connection, expected_path: str) -> bool:
    """Turn on SQLITE_DBCONFIG_DEFENSIVE (no writable_schema, no shadow-table writes); True if on.

    Python 3.12 has Connection.setconfig. On 3.11 the sqlite3* handle is the first field after the
    object header of CPython's connection struct; we call sqlite3_db_config through the very
    library _sqlite3 links, and only after sqlite3_db_filename on that handle names the file we
    opened, so a wrong guess about the layout is caught before anything is written through it.
    """
    setconfig = getattr(conn, "setconfig", None)
    if setconfig is not None:  # Python >= 3.12
        setconfig(_SQLITE_DBCONFIG_DEFENSIVE, True)
        return bool(conn.getconfig(_SQLITE_DBCONFIG_DEFENSIVE))  # type: ignore[attr-defined]
    if sys.implementation.name != "cpython":
        return False
    try:
        import _sqlite3

        lib = ctypes.CDLL(_sqlite3.__file__)
        handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
        if not handle:
            return False
        filename = lib.sqlite3_db_filename
        filename.restype = ctypes.c_char_p
        filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        name = filename(handle, b"main")
        if name is None or Path(name.decode()).resolve() != Path(expected_path).resolve():
            return False
        db_config = lib.sqlite3_db_config
        db_config.restype = ctypes.c_int
        out = ctypes.c_int(0)
        rc = db_config(
            ctypes.c_void_p(handle),
            ctypes.c_int(_SQLITE_DBCONFIG_DEFENSIVE),
            ctypes.c_int(1),
            ctypes.byref(out),
        )
        return rc == 0 and out.value == 1
    except (OSError, AttributeError, ValueError):
        return False


def connect_writer(
    db_path: str | Path, busy_timeout_ms: int = 5000, durability: str = "power_loss"
) -> tuple[sqlite3.Connection, bool]:
    """Open (creating if needed) the ledger for appending; returns (connection, defensive_on).

    `durability` (audit.durability): "power_loss" syncs the WAL at every commit; "process_crash"
    (synchronous=NORMAL) writes it to the OS at every commit, and the writer syncs it soon after
    (WalSync): a committed entry survives any crash of Candela's processes at once, a power cut
    once synced."""
    path = Path(db_path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL at every commit: an acknowledged entry survives power loss, not only
        # a killed process. Batching keeps that to one fsync per batch. At one request at a
        # time nothing is batched and that fsync is most of what the answer waits for
        # (bench/README.md, issue 21): NORMAL leaves it to the checkpoints.
        sync = "NORMAL" if durability == "process_crash" else "FULL"
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute("BEGIN IMMEDIATE")
        for stmt in _SCHEMA.split(";\n"):
            if stmt.strip():
                conn.execute(stmt)
        conn.execute(
            "INSERT OR IGNORE INTO audit_meta (key, value) VALUES ('schema', ?), ('log_id', ?)",
            (SCHEMA_VERSION, uuid.uuid4().hex),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        raise
    defensive = enable_defensive(conn, str(path))
    if not defensive:
        log.warning(
            "audit: SQLite defensive mode is not available; triggers still guard the ledger"
        )
    conn.set_authorizer(_authorizer)
    return conn, defensive


class WalSync:
    """Makes the ledger's committed entries survive a power cut under audit.durability
    process_crash: fsync of its write-ahead log, the file every commit appended to (SQLite's
    synchronous=NORMAL leaves that to the checkpoints, which may not come for hours at a few
    requests a minute, and skip the sync while a reader pins an old snapshot).

    The first sync of a log file (a new inode: SQLite deletes the log when its last connection
    closes and creates it again) also syncs the folder, so the file's name survives with it.
    """

    def __init__(self, db_path: str | Path) -> None:
        path = Path(db_path).expanduser()
        self.wal = f"{path}-wal"
        self.folder = str(path.parent)
        self._inode: tuple[int, int] | None = None

    def __call__(self) -> None:
        """fsync what was written to the log so far; OSError when it cannot."""
        fd = os.open(self.wal, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        inode = (st.st_dev, st.st_ino)
        if inode != self._inode:
            folder = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
            self._inode = inode


def connect_appender(db_path: str | Path, durability: str = "power_loss") -> sqlite3.Connection:
    """A second connection to a ledger connect_writer opened, for appends that never wait: a
    database locked by anyone raises at once (busy timeout 0), and it never checkpoints the log
    (a checkpoint copies up to a thousand pages and may fsync: the writer thread does it,
    AuditWriter._checkpoint_due). Same durability, same guards (authorizer, defensive mode
    where available); no schema work."""
    path = Path(db_path).expanduser()
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=0)
    try:
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        sync = "NORMAL" if durability == "process_crash" else "FULL"
        conn.execute(f"PRAGMA synchronous={sync}")
        enable_defensive(conn, str(path))
        conn.set_authorizer(_authorizer)
    except BaseException:
        conn.close()
        raise
    return conn


def log_id(conn: sqlite3.Connection) -> str | None:
    got = conn.execute("SELECT value FROM audit_meta WHERE key = 'log_id'").fetchone()
    return None if got is None else str(got[0])


def head(conn: sqlite3.Connection) -> tuple[int, str, str | None]:
    """(seq, hash, ts) of the newest entry; (0, GENESIS_HASH, None) for an empty log."""
    got = conn.execute("SELECT seq, hash, ts FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    if got is None:
        return 0, GENESIS_HASH, None
    return int(got[0]), str(got[1]), str(got[2])


# (action, user_id, tenant_id, fields_json) as prepared by the writer from a record() call.
Pending = tuple[str, str | None, str | None, str]


def append_batch(
    conn: sqlite3.Connection,
    items: Sequence[Pending],
    mark: tuple[str, int] | None = None,
    times: Sequence[int] | None = None,
) -> list[Row]:
    """Append items as one transaction, chained after whatever head the file has now.

    The head is read inside BEGIN IMMEDIATE, which holds SQLite's write lock, so several processes
    appending to one file still build one chain. Timestamps never go backwards along the chain.
    `mark` (journal name, line number): the entry journal's lines up to it are in the ledger
    with this transaction (audit/journal.py). `times`: each item's time (ns since the epoch; 0:
    now), the moment a journaled entry became durable, never before the entry ahead of it.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        seq, prev, last_ts = head(conn)
        now = now_ts()
        rows: list[Row] = []
        for i, (action, user_id, tenant_id, text) in enumerate(items):
            ts = now_ts(times[i]) if times is not None and times[i] else now
            if last_ts is not None and ts < last_ts:
                ts = last_ts
            last_ts = ts
            seq += 1
            digest = row_hash(prev, seq, ts, action, user_id, tenant_id, text)
            rows.append((seq, ts, action, user_id, tenant_id, text, prev, digest))
            prev = digest
        conn.executemany(
            f"INSERT INTO audit_log ({ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
        )
        if mark is not None:
            conn.execute(
                "INSERT INTO audit_journal (journal, upto) VALUES (?, ?)"
                " ON CONFLICT (journal) DO UPDATE SET upto = excluded.upto",
                mark,
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return rows


def journal_mark(conn: sqlite3.Connection, journal: str) -> int:
    """The last line of `journal` in the ledger (0: none)."""
    got = conn.execute("SELECT upto FROM audit_journal WHERE journal = ?", (journal,)).fetchone()
    return 0 if got is None else int(got[0])


def forget_journal(conn: sqlite3.Connection, journal: str) -> None:
    """A journal removed: its mark goes (outside a transaction: one of its own)."""
    conn.execute("DELETE FROM audit_journal WHERE journal = ?", (journal,))


def read_rows(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[Row]:
    """Entries with seq > after_seq, oldest first (the mirrors' feed)."""
    cur = conn.execute(
        f"SELECT {ROW_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    )
    return [tuple(r) for r in cur]


def count_by_field(
    conn: sqlite3.Connection, action: str, key: str, after_seq: int = 0
) -> tuple[int, dict[str | None, int]]:
    """Entries of one action after after_seq, counted by one top-level field of theirs (None
    where it is absent): (the newest seq counted, or after_seq if none, {value: count}).

    Reads only the new entries of that action, through the (action, seq) index.
    """
    cur = conn.execute(
        "SELECT json_extract(fields, ?), count(*), max(seq) FROM audit_log"
        " WHERE action = ? AND seq > ? GROUP BY 1",
        (f'$."{key}"', action, after_seq),
    )
    newest, counts = after_seq, {}
    for value, n, top in cur:
        counts[None if value is None else str(value)] = int(n)
        newest = max(newest, int(top))
    return newest, counts


def row_at(conn: sqlite3.Connection, seq: int) -> Row | None:
    got = conn.execute(f"SELECT {ROW_COLUMNS} FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    return None if got is None else tuple(got)


def as_dict(row: Row | Sequence[Any]) -> dict[str, Any]:
    """A row as the admin API and exports show it, fields parsed."""
    return {
        "seq": row[0],
        "ts": row[1],
        "action": row[2],
        "user_id": row[3],
        "tenant_id": row[4],
        "fields": json.loads(row[5]),
        "prev_hash": row[6],
        "hash": row[7],
    }
