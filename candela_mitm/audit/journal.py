"""The entry journal: a request's audit entry written to the OS in one append, chained into the
ledger by the writer thread afterwards, and replayed into it at the next start if the process
died first (audit.durability process_crash).

Why (issue 21, bench/README.md "The entry journal"): at one request at a time the entry of a
request was committed to the SQLite ledger on the event loop before its answer ended, a write
transaction of its own (BEGIN IMMEDIATE, the head read, the insert into three indexes, the
commit's WAL frames): 60 µs warm, 216 µs with the caches cold at 50 requests a second. What
the promise needs (issue 4: after `kill -9`, every request whose answer the client received
has its entry) is the entry in the operating system's hands before the answer ends, which one
`write(2)` of a line to a file opened for appending gives. The writer thread then appends the
journaled entries to the ledger in batches, the chain's order unchanged, and records in the
same transaction how far into the journal it got (`audit_journal`: journal name, last line
number), so a replay never appends an entry twice.

Each process writing entries has a journal of its own, `<ledger>.journal/<pid>-<random>.log`,
holding an exclusive flock on it while it lives: a journal whose lock can be taken belongs to
a process that is gone, and the next `AuditWriter.start` (holding the ledger's write gate, so
two workers never replay one journal, and a start finds every older journal replayed when it
returns) appends its lines past the recorded mark, then removes it; a writer still running on
the same ledger does the same every few seconds (SWEEP_EVERY_S in audit/writer.py), so a
process killed beside it has its entries appended without waiting for a restart.

A line: `<header JSON> TAB <fields JSON> LF`, the header `[n, action, user_id, tenant_id,
time]` (ns since the epoch: when the line was written, the entry's time in the ledger).
The fields are the ledger's canonical JSON (ASCII, compact: no raw tab or line feed); a last
line without its line feed is a write the process never finished (and never answered on).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from candela_mitm.audit.sqlite_sink import (
    Pending,
    append_batch,
    connect_writer,
    forget_journal,
    journal_mark,
)
from candela_mitm.state.gate import WriteGate

log = logging.getLogger(__name__)

SUFFIX = ".log"
# The journal is emptied (ftruncate) once everything in it is in the ledger and it holds more
# than this: about a thousand requests' entries.
TRUNCATE_AT_BYTES = 1 << 20


def journal_dir(db_path: str | Path) -> Path:
    return Path(f"{Path(db_path).expanduser()}.journal")


def encode(n: int, entry: Pending, t_ns: int) -> bytes:
    action, user, tenant, text = entry
    return f"{json.dumps([n, action, user, tenant, t_ns])}\t{text}\n".encode()


def decode(line: bytes) -> tuple[int, Pending, int] | None:
    """(n, entry, time in ns) of one whole line; None for one that is not a journal line."""
    head, sep, text = line.partition(b"\t")
    if not sep:
        return None
    try:
        n, action, user, tenant, t_ns = json.loads(head)
        fields = text.decode("ascii")
        json.loads(fields)  # only an entry the ledger can hold: its fields are JSON
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(n, int) or not isinstance(action, str) or not isinstance(t_ns, int):
        return None
    if not all(v is None or isinstance(v, str) for v in (user, tenant)):
        return None
    return n, (action, user, tenant, fields), t_ns


def read_entries(path: Path) -> Iterator[tuple[int, Pending, int]]:
    """The whole lines of a journal, in order; a line that does not parse is logged and skipped."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # the write a dying process never finished
            got = decode(raw[:-1])
            if got is None:
                log.error("audit: journal %s: a line that is no entry was skipped", path.name)
                continue
            yield got


class Journal:
    """This process's journal: appends (from any thread, the caller serialising them), emptied
    by the writer thread when everything in it is in the ledger."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.name = f"{os.getpid()}-{secrets.token_hex(6)}{SUFFIX}"
        self.path = folder / self.name
        fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self.fd: int | None = fd
        self.size = 0

    def append(self, data: bytes) -> None:
        """One write(2) of whole lines; OSError (a short write too) when it fails."""
        fd = self.fd
        if fd is None:
            raise OSError(errno.EBADF, "the audit journal is closed")
        done = os.write(fd, data)
        self.size += done
        if done != len(data):
            raise OSError(errno.EIO, f"short write to the audit journal ({done} of {len(data)})")

    def empty(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            self.size = 0

    def close(self, remove: bool) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if remove:
            try:
                self.path.unlink()
            except OSError as e:
                log.warning("audit: journal %s not removed (%s)", self.path, e)
        os.close(fd)  # the lock goes with it, after the file


def dead_journals(folder: Path, own: str | None) -> Iterator[tuple[str, Path]]:
    """The journals in `folder` whose process is gone, each yielded locked (by this process) and
    unlocked when the caller moves on; `own` is skipped."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(SUFFIX) or name == own:
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # replayed by another start meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    continue  # its process lives
                raise
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue  # replayed and removed meanwhile; the name is another's now
            except FileNotFoundError:
                continue  # replayed and removed between our open and our lock
            yield name, path
        finally:
            os.close(fd)


def last_line(path: Path) -> int:
    """The number of the last whole line of a journal (0: none), read from its end."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            back = min(size, 1 << 16)
            while back:
                f.seek(size - back)
                tail = f.read(back)
                end = tail.rfind(b"\n")
                if end >= 0:
                    start = tail.rfind(b"\n", 0, end) + 1
                    if start > 0 or back == size:
                        got = decode(tail[start:end])
                        return got[0] if got is not None else 0
                if back == size:
                    return 0
                back = min(size, back * 2)
    except FileNotFoundError:  # removed while read (replayed, or its process stopped cleanly)
        return 0
    return 0


def _alive(path: Path) -> bool:
    """Whether a journal's process still holds it (a journal nobody holds waits for a start)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # (our shared lock, if taken, goes with it)
    return False


def lines_behind(db_path: str | Path) -> int:
    """How many entries running proxies journaled that the ledger does not hold yet."""
    folder = journal_dir(db_path)
    try:
        names = [n for n in os.listdir(folder) if n.endswith(SUFFIX) and _alive(folder / n)]
    except FileNotFoundError:
        return 0
    if not names:
        return 0
    marks: dict[str, int] = {}
    uri = f"file:{Path(db_path).expanduser()}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        try:
            marks = dict(conn.execute("SELECT journal, upto FROM audit_journal"))
        except sqlite3.OperationalError:  # a ledger older than the journal
            marks = {}
    conn.close()
    return sum(max(0, last_line(folder / n) - marks.get(n, 0)) for n in names)


def wait_for_journals(db_path: str | Path, timeout_s: float) -> int:
    """Wait until the ledger holds every journaled entry of the running proxies (they chain
    them within `audit.journal_chain_delay_ms`), at most `timeout_s`; how many it still lacks."""
    deadline = time.monotonic() + timeout_s
    while True:
        behind = lines_behind(db_path)
        if not behind or time.monotonic() >= deadline:
            return behind
        time.sleep(0.005)


def replay_journals(
    conn: sqlite3.Connection,
    db_path: Path,
    gate: WriteGate,
    batch_max_entries: int = 512,
    busy_timeout_ms: int = 5000,
    own: str | None = None,
) -> int:
    """Append to the ledger the journaled entries of processes that died before their writer
    did, past each journal's mark, then remove the journal; how many were appended. Holds the
    ledger's write gate throughout: a worker starting beside this one waits, then finds
    nothing left."""
    folder = journal_dir(db_path)
    if not folder.is_dir():
        return 0
    if not gate.acquire(max(busy_timeout_ms / 1000, 60.0)):
        raise sqlite3.OperationalError(f"database is locked ({gate.path} held)")
    total = 0
    try:
        for name, path in dead_journals(folder, own):
            upto = journal_mark(conn, name)
            batch: list[Pending] = []
            times: list[int] = []
            replayed = 0
            for n, entry, t_ns in read_entries(path):
                if n <= upto:
                    continue
                batch.append(entry)
                times.append(t_ns)
                if len(batch) >= batch_max_entries:
                    replayed += len(append_batch(conn, batch, (name, n), times))
                    batch, times = [], []
                upto = n
            if batch:
                replayed += len(append_batch(conn, batch, (name, upto), times))
            path.unlink()
            forget_journal(conn, name)  # after the file: a crash between replays nothing
            total += replayed
            if replayed:
                log.warning(
                    "audit: %d entries of a process that died appended from its journal %s",
                    replayed,
                    name,
                )
    finally:
        gate.release()
    return total


def replay_dead_journals(db_path: str | Path) -> int:
    """replay_journals for a tool reading the ledger while no proxy may run (`candela audit`):
    what a killed proxy acknowledged is in the ledger before it is read."""
    path = Path(db_path).expanduser()
    if not journal_dir(path).is_dir():
        return 0
    conn, _ = connect_writer(path, 5000, "power_loss")
    try:
        return replay_journals(conn, path, WriteGate(path))
    finally:
        conn.close()
