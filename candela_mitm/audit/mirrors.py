"""Audit mirrors: copies of the SQLite ledger (DuckDB, BigQuery) fed from it by background threads."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from candela_mitm.audit.chain import Row, connect_readonly
from candela_mitm.audit.sqlite_sink import head, read_rows, row_at
from candela_mitm.config import Audit
from candela_mitm.errors import ConfigError

log = logging.getLogger(__name__)


class Mirror(Protocol):
    """A sink that holds a copy of the ledger; the feeder hands it rows in seq order."""

    name: str  # also names the lock that elects the one process feeding it
    batch_max: int  # rows per write
    min_interval_s: float  # at most one write per interval unless batch_max rows wait

    def open(self) -> tuple[int, str | None]:
        """Connect; return (seq, hash) of the newest row the mirror already holds ((0, None): empty)."""
        ...

    def write(self, rows: Sequence[Row]) -> None:
        """Store rows (contiguous, right after the last one stored) or raise."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class MirrorStats:
    name: str
    role: str  # "leader" feeds the mirror; "standby" waits for the lock another process holds
    mirrored_seq: int
    lag: int  # entries in the ledger not yet in the mirror (as last seen)
    rows_written: int
    errors: int  # failed open/write attempts, each retried with backoff
    last_error: str | None
    healthy: bool  # False after a failure until the next success, or while lag > backlog max


def build_mirrors(cfg: Audit, db_path: Path) -> list[Mirror]:
    """The mirrors audit.sinks names; SQLite is always the system of record, never a mirror."""
    mirrors: list[Mirror] = []
    if "duckdb" in cfg.sinks:
        from candela_mitm.audit.duckdb_sink import duckdb_mirror

        mirrors.append(duckdb_mirror(cfg.duckdb_path))
    if "bigquery" in cfg.sinks:
        if cfg.bigquery is None:
            raise ConfigError("audit.sinks: bigquery needs an audit.bigquery section")
        from candela_mitm.audit.bigquery_sink import BigQueryMirror

        mirrors.append(BigQueryMirror(cfg.bigquery, Path(f"{db_path}.bigquery.cursor")))
    return mirrors


class MirrorFeeder:
    """One thread per mirror: copies ledger rows past the mirror's head, retrying with backoff.

    The backlog lives in the ledger itself, not in memory: a mirror that is down for a day
    catches up from SQLite when it returns, and memory use stays at one batch. Only the process
    holding the mirror's lock file feeds it, so several workers sharing one ledger feed each
    mirror once (DuckDB also allows a single writing process per file).
    """

    def __init__(
        self,
        mirror: Mirror,
        db_path: Path,
        *,
        poll_s: float = 0.5,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        backlog_max: int = 1_000_000,
    ) -> None:
        self.mirror = mirror
        self.db_path = db_path
        self.lock_path = Path(f"{db_path}.{mirror.name}.lock")
        self.poll_s = poll_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.backlog_max = backlog_max
        self.role = "standby"
        self.mirrored_seq = 0
        self.seen_head = 0
        self.rows_written = 0
        self.errors = 0
        self.last_error: str | None = None
        self.failing = False
        self._opened = False
        self._lock_fd: int | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._last_write = 0.0
        self._phase = "open"
        self._due_in = poll_s
        self._thread = threading.Thread(
            target=self._run, name=f"candela-audit-{mirror.name}", daemon=True
        )

    @property
    def lag(self) -> int:
        return max(0, self.seen_head - self.mirrored_seq)

    def stats(self) -> MirrorStats:
        return MirrorStats(
            name=self.mirror.name,
            role=self.role,
            mirrored_seq=self.mirrored_seq,
            lag=self.lag,
            rows_written=self.rows_written,
            errors=self.errors,
            last_error=self.last_error,
            healthy=not self.failing and self.lag <= self.backlog_max,
        )

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        if not self._wake.is_set():
            self._wake.set()

    def stop(self, deadline: float | None) -> None:
        """Catch up until deadline (monotonic; None: until done) unless failing, then stop."""
        self._deadline = deadline
        self._stop.set()
        self._wake.set()
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()) + 1.0)

    def _try_lock(self) -> bool:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _release(self) -> None:
        if self._opened:
            try:
                self.mirror.close()
            except Exception as e:  # observability fails open
                log.warning("audit mirror %s: close failed: %s", self.mirror.name, e)
            self._opened = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _fail(self, what: str, e: Exception) -> None:
        self.errors += 1
        self.failing = True
        self.last_error = f"{what}: {type(e).__name__}: {e}"
        log.warning("audit mirror %s: %s (retrying)", self.mirror.name, self.last_error)
        if self._opened:
            # Reopen before the retry: the mirror re-reads its own head, so a half-done write
            # is neither lost nor stored twice.
            try:
                self.mirror.close()
            except Exception as e:  # a mirror that cannot even close is reopened next round
                log.debug("mirror %s did not close cleanly: %s", self.mirror.name, e)
            self._opened = False

    def _run(self) -> None:
        conn = None
        failures = 0
        try:
            conn = connect_readonly(self.db_path)
            while True:
                stopping = self._stop.is_set()
                if stopping and self.role != "leader" and self._try_lock():
                    # stopped before the first round: still copy what this process wrote
                    self.role = "leader"
                if stopping and (
                    self.role != "leader"
                    or self.failing
                    or (self._deadline is not None and time.monotonic() >= self._deadline)
                ):
                    return
                if self.role != "leader":
                    if not self._try_lock():
                        self._stop.wait(max(self.poll_s, 1.0))
                        continue
                    self.role = "leader"
                self._wake.clear()
                try:
                    progressed = self._step(conn, stopping)
                    failures = 0
                except Exception as e:
                    self._fail(self._phase, e)
                    failures += 1
                    backoff = min(self.retry_initial_s * 2 ** (failures - 1), self.retry_max_s)
                    self._stop.wait(backoff)
                    continue
                if stopping and not progressed:
                    return
                if not progressed:
                    self._wake.wait(min(self.poll_s, self._due_in))
                    self._due_in = self.poll_s
        except Exception as e:  # the read connection itself: count it, the writer carries on
            self.errors += 1
            self.failing = True
            self.last_error = f"feed: {type(e).__name__}: {e}"
            log.error("audit mirror %s stopped: %s", self.mirror.name, self.last_error)
        finally:
            self.role = "stopped"
            self._release()
            if conn is not None:
                conn.close()

    def _step(self, conn: sqlite3.Connection, stopping: bool) -> bool:
        """One round: open if needed, copy one batch if due; True if rows were written."""
        self.seen_head = head(conn)[0]  # first, so lag is right even while the mirror is down
        if not self._opened:
            self._phase = "open"
            seq, digest = self.mirror.open()
            self._opened = True
            if seq > 0:
                row = row_at(conn, seq)
                if row is None or (digest is not None and row[7] != digest):
                    raise RuntimeError(
                        f"mirror holds entry {seq} that the ledger does not (hash differs or entry absent): "
                        "the mirror belongs to another log or the ledger was rewritten"
                    )
            self.mirrored_seq = seq
            self.failing = False
        lag = self.seen_head - self.mirrored_seq
        if lag <= 0:
            self.failing = False
            return False
        if not stopping and lag < self.mirror.batch_max and self.mirror.min_interval_s > 0:
            due_in = self._last_write + self.mirror.min_interval_s - time.monotonic()
            if due_in > 0:
                self._due_in = due_in
                return False
        self._phase = "write"
        rows = read_rows(conn, self.mirrored_seq, self.mirror.batch_max)
        if not rows:
            return False
        self.mirror.write(rows)
        self._last_write = time.monotonic()
        self.mirrored_seq = rows[-1][0]
        self.rows_written += len(rows)
        self.failing = False
        return True
