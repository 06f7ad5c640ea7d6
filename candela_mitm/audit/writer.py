"""The audit writer: a bounded queue drained by one thread into batched, chained SQLite commits."""

from __future__ import annotations

import itertools
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from candela_mitm.audit.chain import Row, fields_json, fields_json_acyclic
from candela_mitm.audit.journal import (
    TRUNCATE_AT_BYTES,
    Journal,
    encode,
    journal_dir,
    replay_journals,
)
from candela_mitm.audit.mirrors import Mirror, MirrorFeeder, MirrorStats, build_mirrors
from candela_mitm.audit.redaction import PROMPT_KEYS, redact
from candela_mitm.audit.sqlite_sink import (
    Pending,
    WalSync,
    append_batch,
    connect_appender,
    connect_writer,
    forget_journal,
)
from candela_mitm.config import Audit
from candela_mitm.errors import StoreUnavailable
from candela_mitm.state.gate import WriteGate, this_process

log = logging.getLogger(__name__)

# commits made on a caller's thread (never checkpointing) between two checkpoints of the
# writer's: at one request at a time a commit writes ~5 pages, so about SQLite's own 1,000
HERE_CHECKPOINT_EVERY = 200
# A writer that has seen no entry for PARK_AFTER_S (nothing queued, nothing unsynced) sleeps
# until an entry or a commit on a caller's thread wakes it, looking again every PARK_MAX_S: it
# looked every batch_max_delay_ms, 20 wakes a second of an idle proxy (bench/README.md,
# eighteenth session). While entries come, it looks by the clock as before: an entry nobody
# waits for never wakes it then (a wake on a request's path costs that request the GIL).
PARK_AFTER_S = 1.0
PARK_MAX_S = 5.0
# How often a running writer looks for the journal of a process that died while it runs (two
# proxies sharing a ledger, one killed): its entries are appended then, not at the next start.
SWEEP_EVERY_S = 5.0
def _jsonable(value: Any) -> Any:
    # Only used when plain encoding fails: the entry is still recorded, odd values as text.
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _principal(fields: dict[str, Any], key: str) -> str | None:
    v = fields.get(key)
    return None if v is None else str(v)


Committed = Callable[[int | None, BaseException | None], None]


class _Callback:
    """A commit waiter lighter than a Future (no lock, no condition): on the writer thread, once,
    calls fn(seq, None) when the entry is committed or fn(None, error) when it never will be."""

    __slots__ = ("fn", "_done")

    def __init__(self, fn: Committed) -> None:
        self.fn = fn
        self._done = False

    @classmethod
    def resolving(cls, fut: Future[int]) -> _Callback:
        """A waiter that resolves `fut` (record_durable, flush): its seq, or the error."""

        def resolve(seq: int | None, error: BaseException | None) -> None:
            with suppress(InvalidStateError):  # the waiter cancelled: committed all the same
                if error is None:
                    fut.set_result(seq)  # type: ignore[arg-type]
                else:
                    fut.set_exception(error)

        return cls(resolve)

    def report(self, seq: int | None, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.fn(seq, error)
        except Exception:  # the waiter's problem, never the writer thread's
            log.exception("audit: commit callback failed")


# Field values copied as they are when recorded: nothing in them can change afterwards.
_FLAT = frozenset({str, int, float, bool, type(None)})


class _Later:
    """An entry whose fields are all flat (`_FLAT`), recorded as they are and prepared (redacted,
    encoded) by whoever commits it, when it is drained: a model policy check is recorded before
    its request is forwarded, and its encoding (~57 µs with the caches cold, at 5 requests a
    second) then runs after the answer, with the request's own entry (bench/README.md,
    eighteenth session)."""

    __slots__ = ("action", "fields")

    def __init__(self, action: str, fields: dict[str, Any]) -> None:
        self.action = action
        self.fields = fields  # a fresh dict (the call's keyword arguments), of flat values


class _Item:
    __slots__ = ("pending", "waiter", "at", "jn", "t_ns")

    def __init__(self, pending: Pending | _Later | None, waiter: _Callback | None) -> None:
        self.pending = pending  # None: a flush marker
        self.waiter = waiter  # a durable waiter: the batch holding it commits at once
        self.at = time.monotonic()  # queued at: due batch_max_delay_ms later
        self.jn = 0  # its line in the entry journal; 0 none yet, -1 taken for a commit first
        self.t_ns = 0  # when it was journaled: its time in the ledger (0: its commit's)


def _mark(items: list[_Item]) -> int:
    """The last journal line among drained items (0: none of them journaled)."""
    mark = 0
    for it in items:
        if it.jn > mark:
            mark = it.jn
    return mark


def _times(items: list[_Item]) -> list[int]:
    """When each drained entry was journaled (0: not journaled), beside `_pending`'s."""
    return [it.t_ns for it in items if it.pending is not None]


def _pending(items: list[_Item]) -> list[Pending]:
    """The entries of drained items (`_drain` prepared every `_Later` among them)."""
    out: list[Pending] = []
    for it in items:
        p = it.pending
        if p is not None:
            assert not isinstance(p, _Later)
            out.append(p)
    return out


@dataclass(frozen=True)
class AuditStats:
    backlog: int  # entries accepted and not yet committed
    queue_max: int
    accepted: int
    rejected: int  # record() calls refused because the queue was full or the writer closed
    entries_written: int  # entries this process committed
    batches_written: int
    sqlite_errors: int  # failed commit attempts (each is retried)
    head_seq: int  # newest seq this process committed
    healthy: bool  # False while commits fail
    defensive: bool  # SQLite defensive mode is on for the writer connection
    mirrors: dict[str, MirrorStats] = field(default_factory=dict)
    # durability process_crash: failed fsyncs of the log, and how long the oldest commit not
    # yet synced has waited (0: every commit is on the disk)
    sync_errors: int = 0
    unsynced_s: float = 0.0


class AuditWriter:
    """Appends audit entries to the SQLite ledger from one writer thread and feeds the mirrors.

    ``record`` never blocks: it encodes the fields on the caller's thread (so later mutation of
    the caller's objects cannot change the entry), appends to an in-memory queue of at most
    ``queue_max_entries`` and returns True. When the queue is full (SQLite has been failing or
    stalled for a long time) it returns False at once and counts a rejection: the entry is *not*
    recorded, so a governance caller must treat False as "cannot audit" and fail closed. The
    writer never drops an accepted entry: a failing commit is retried with backoff until it
    succeeds or ``close`` gives up.

    The thread commits up to ``batch_max_entries`` per transaction: what is queued, once an
    entry someone waits for (``record_durable``, ``record_then``, a flush) or a whole batch is
    queued, or once the oldest entry has waited ``batch_max_delay_ms`` (``journal_chain_delay_ms``
    for entries already in the entry journal, durable: at one connection a commit every 50 ms
    held ~2.5 entries, ~250 µs of CPU a request; entries queued during a commit form the next
    batch: group commit). Only those first two wake the thread; the others
    wait for it to look, by the oldest one's due time. Waking a thread on the other core is a
    cross-CPU interrupt: at one connection on a VM, the two wakes per request (the policy
    decision's entry, then the request's) were a fifth of the event loop's CPU.

    ``record_here`` commits on the caller's thread whatever is queued when the writer thread is
    not taking or committing a batch (it never holds the turn while it waits).

    With ``durability: process_crash`` a commit reaches the operating system, not the disk; the
    writer thread fsyncs the log (``WalSync``) at most ``sync_interval_ms`` after the first
    commit it has not synced, between batches and at close, never on a request's path.
    """

    def __init__(
        self,
        cfg: Audit,
        *,
        db_path: str | Path | None = None,
        mirrors: Sequence[Mirror] | None = None,
        mirror_poll_s: float = 0.5,
        mirror_retry_initial_s: float = 0.5,
        mirror_retry_max_s: float = 30.0,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.cfg = cfg
        self.db_path = Path(db_path if db_path is not None else cfg.sqlite_path).expanduser()
        self._mirrors = list(mirrors) if mirrors is not None else build_mirrors(cfg, self.db_path)
        self._mirror_opts = (mirror_poll_s, mirror_retry_initial_s, mirror_retry_max_s)
        self._busy_timeout_ms = busy_timeout_ms
        self._gate = WriteGate(self.db_path)
        self._queue: deque[_Item] = deque()
        self._wake = threading.Event()
        self._parked = False  # the writer sleeps until woken: whatever needs it sets _wake
        self._quiet = (0, time.monotonic())  # the writer's look at `accepted`: count, since when
        # whoever holds it takes entries from the queue and commits them: the writer thread,
        # or a caller of record_here while the writer is idle (one chain order, queue order)
        self._turn = threading.Lock()
        self._here_conn: sqlite3.Connection | None = None  # record_here's (connect_appender)
        self._urgent = 0  # bumped by each entry or flush someone waits for
        self._urgent_seen = 0  # the writer thread's last look at it
        self._here_pid = -1
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._feeders: list[MirrorFeeder] = []
        self._closed = False
        self._stopping = False
        self.queue_max = cfg.queue_max_entries
        # a queue this long wakes the writer without a waiter: a whole batch is there
        self._wake_at = max(1, min(cfg.batch_max_entries, cfg.queue_max_entries // 2))
        self._chain_delay = max(cfg.batch_max_delay_ms, cfg.journal_chain_delay_ms) / 1000
        self.accepted = 0
        self.rejected = 0
        self.abandoned = 0
        self.entries_written = 0
        self.batches_written = 0
        self.sqlite_errors = 0
        self.head_seq = 0
        self.healthy = True
        self.defensive = False
        self.last_error: str | None = None
        # process_crash: commits counted (under the turn), those the last log sync covered,
        # and when the oldest commit not covered was made (None: all synced)
        self._sync = WalSync(self.db_path) if cfg.durability == "process_crash" else None
        self._commits = 0
        self._synced = 0
        self._unsynced_at: float | None = None
        self.syncs = 0
        self.sync_errors = 0
        # commits made on a caller's thread (record_here), and how many of them the writer's
        # last WAL checkpoint followed: that connection never checkpoints (see _checkpoint_due)
        self._here_commits = 0
        self._checkpointed = 0
        self.checkpoints = 0
        # the entry journal (process_crash; audit/journal.py): this process's, while it takes
        # lines (`_journaling`); the last line written and the last one the ledger holds. It is
        # written holding the turn, as a batch is taken and committed: a queued entry is
        # journaled or taken for a commit first, never both unknowingly, and nothing else (no
        # lock on `record`) is shared with the writer thread. Items taken from the queue, and
        # looked at by a journal write (the queue's journaled part is its first ones): counted
        # under the turn.
        self._journal: Journal | None = None
        self._journaling = False
        self._journal_pid = -1
        self._taken = 0
        self._passed = 0
        self._jn = 0
        self._jcommitted = 0
        self.journaled = 0
        self.journal_errors = 0
        self.replayed = 0
        self._sweep_at = time.monotonic() + SWEEP_EVERY_S

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open (creating) the ledger, then start the writer and mirror threads.

        Call it in the process that records (after a fork, never before). Raises sqlite3.Error or
        OSError when the ledger cannot be opened, so a proxy fails at start, not on a request.
        """
        if self._thread is not None:
            return
        self._conn, self.defensive = connect_writer(
            self.db_path, self._busy_timeout_ms, self.cfg.durability
        )
        if self.cfg.durability == "process_crash":
            try:
                self._replay_journals(self._conn)
            except BaseException:
                self._conn.close()
                self._conn = None
                raise
            try:
                self._journal = Journal(journal_dir(self.db_path))
                self._journaling = True
                self._journal_pid = this_process()
            except OSError as e:
                log.warning("audit: no entry journal (%s); entries commit before answers", e)
        self._thread = threading.Thread(target=self._run, name="candela-audit-writer", daemon=True)
        self._thread.start()
        poll, initial, most = self._mirror_opts
        for mirror in self._mirrors:
            feeder = MirrorFeeder(
                mirror,
                self.db_path,
                poll_s=poll,
                retry_initial_s=initial,
                retry_max_s=most,
                backlog_max=self.cfg.mirror_backlog_max,
            )
            feeder.start()
            self._feeders.append(feeder)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting, commit everything queued, stop the mirrors; True if nothing was lost.

        If SQLite still fails when timeout runs out, the queued entries are abandoned (counted in
        ``abandoned``) and their durable futures fail with StoreUnavailable.
        """
        self._closed = True
        self._stopping = True
        self._wake.set()
        drained = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abandon.set()
                self._wake.set()
                self._thread.join(5.0)
                drained = False
        # Entries left here were queued too late (a record() racing close) or never had a writer.
        if self._queue and (self._thread is None or not self._thread.is_alive()):
            drained = False
            self._fail_all(list(self._queue), "the audit writer closed before writing the entry")
            self._queue.clear()
        if self._turn.acquire(timeout=5.0):  # (held for good only by a writer thread stuck)
            here, self._here_conn = self._here_conn, None
            self._turn.release()
            if here is not None:
                here.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for feeder in self._feeders:
            feeder.stop(deadline)
        return drained and self.abandoned == 0

    def _replay_journals(self, conn: sqlite3.Connection) -> None:
        own = self._journal.name if self._journal is not None else None
        self.replayed += replay_journals(
            conn, self.db_path, self._gate, self.cfg.batch_max_entries, self._busy_timeout_ms, own
        )

    # -- recording ---------------------------------------------------------------------------

    def _prepare(self, action: str, fields: dict[str, Any]) -> Pending:
        clean = redact(fields)
        if not self.cfg.log_prompts:
            for key in PROMPT_KEYS.intersection(clean):
                del clean[key]
        try:
            text = fields_json_acyclic(clean)  # redact's copy holds no cycle
        except (TypeError, ValueError):
            text = fields_json(_jsonable(clean))
        # user_id is whom the entry is about: the requesting user, or the admin acting.
        user = _principal(clean, "user_id") or _principal(clean, "actor")
        return (str(action), user, _principal(clean, "tenant_id"), text)

    def _enqueue(self, item: _Item, wake: bool = True, urgent: bool = True) -> bool:
        if self._closed or len(self._queue) >= self.queue_max:
            self.rejected += 1
            return False
        q = self._queue
        q.append(item)
        self.accepted += 1
        urgent = urgent and item.waiter is not None  # (a journaled one waits for no commit)
        if urgent:
            # changed, not counted: two threads adding at once may add one, still a change
            self._urgent += 1
        if (
            wake
            and (urgent or len(q) >= self._wake_at or self._parked)
            and not self._wake.is_set()
        ):
            self._wake.set()
        return True

    def record(self, action: str, /, **fields: Any) -> bool:
        """Queue an entry; False (at once, never blocking) if it was not accepted: fail closed.
        Flat fields are kept as they are and prepared when the entry is committed (`_Later`)."""
        for v in fields.values():
            if type(v) not in _FLAT:
                return self._enqueue(_Item(self._prepare(action, fields), None))
        return self._enqueue(_Item(_Later(action, fields), None))

    def prepare_queued(self) -> int:
        """Prepare (redact, encode) the queued entries recorded flat (`_Later`: a request's
        model policy check) that no journal write or batch has taken yet; how many. For a
        request alone in its process, while its upstream works (addons/audit.py): its answer's
        journal write then encodes only its own entry. Nothing when the writer thread holds the
        turn (it prepares what it takes)."""
        if not self._queue or not self._turn.acquire(blocking=False):
            return 0
        try:
            ahead = self._passed - self._taken  # the queue's first ones: journaled already
            # a snapshot in one C call: other threads may append meanwhile
            todo = list(itertools.islice(self._queue, ahead if ahead > 0 else 0, None))
            n = 0
            for it in todo:
                p = it.pending
                if type(p) is _Later:
                    it.pending = self._prepared(p)
                    n += 1
            return n
        finally:
            self._turn.release()

    def _prepared(self, later: _Later) -> Pending:
        try:
            return self._prepare(later.action, later.fields)
        except Exception:  # (flat values encode; never lose the entry if one does not)
            log.exception("audit: %s entry encoded as text", later.action)
            return self._prepare(later.action, {k: repr(v) for k, v in later.fields.items()})

    def record_durable(self, action: str, /, **fields: Any) -> Future[int]:
        """Queue an entry; the future resolves to its seq once committed (fsynced).

        From asyncio: ``seq = await asyncio.wrap_future(writer.record_durable(...))``. If the
        entry is not accepted the future has already failed with StoreUnavailable.
        """
        fut: Future[int] = Future()
        if not self._enqueue(_Item(self._prepare(action, fields), _Callback.resolving(fut))):
            fut.set_exception(StoreUnavailable("the audit queue is full or closed"))
        return fut

    def record_then(self, action: str, committed: Committed, /, **fields: Any) -> bool:
        """Queue an entry and call ``committed(seq, None)`` on the writer thread once it is
        committed (fsynced), or ``committed(None, error)`` if it never will be; False (and no
        call) if it was not accepted. record_durable without a Future: the proxy waits for one
        commit per request (addons/audit.py)."""
        return self._enqueue(_Item(self._prepare(action, fields), _Callback(committed)))

    def record_here(self, action: str, committed: Committed, /, **fields: Any) -> bool:
        """record_then, made durable on the calling thread when it can be: with the entry
        journal, the entry and every one queued before it not yet journaled are written to it
        in one append and ``committed(None, None)`` is called before this returns (the writer
        thread chains them into the ledger within ``batch_max_delay_ms``: audit/journal.py).
        Without it (power_loss, or a journal that failed), committed on this thread when the
        writer thread is idle: the entry and everything queued before it, as one batch (and
        ``committed(seq, None)`` called here). When the writer is busy, the ledger is failing
        or another process holds its write gate, the writer thread commits it as record_then
        would.

        For one request at a time (addons/audit.py): a commit through the writer thread costs
        two thread wakes (to it and back to the event loop), about 110 µs on a 2-core VM, more
        than the commit itself without its fsync (bench/README.md, issue 21). It blocks the
        caller for the commit (its fsync with power_loss): only worth it when nothing else waits.
        """
        journaling = self.journaling
        item = _Item(self._prepare(action, fields), _Callback(committed))
        if not self._enqueue(item, wake=False, urgent=not journaling):
            return False
        if journaling:
            if self._journal_here() and item.jn > 0:
                return True
            self._urgent += 1  # not journaled: its commit is waited for
        if not self._commit_here() or self._queue:
            self._wake.set()  # the writer thread commits it (or what a full batch left)
        return True

    @property
    def journaling(self) -> bool:
        """record_here makes entries durable in the journal (one append, nothing waited for)."""
        return self._journaling and self._journal_pid == this_process() and self.healthy

    def _journal_here(self) -> bool:
        """Journal every queued entry not journaled yet, in queue order, in one write, while
        the writer thread is not taking or committing a batch, and report their waiters
        (``committed(None, None)``, on this thread); False when the writer holds the turn or
        the journal fails (and then takes no more): their commit is waited for."""
        if not self._turn.acquire(blocking=False):
            return False
        try:
            q = self._queue
            ahead = self._passed - self._taken  # the queue's first ones were looked at
            if ahead < 0:
                ahead = 0
            # a snapshot in one C call: other threads may append meanwhile (not to this one)
            todo = list(itertools.islice(q, ahead, None))
            lines: list[bytes] = []
            n = self._jn
            now = time.time_ns()
            for it in todo:
                p = it.pending
                if p is None or it.jn:
                    continue
                if type(p) is _Later:
                    p = it.pending = self._prepared(p)
                n += 1
                it.jn = n
                it.t_ns = now
                lines.append(encode(n, p, now))  # type: ignore[arg-type]
            try:
                if lines:
                    self._journal.append(b"".join(lines))  # type: ignore[union-attr]
            except OSError as e:
                # the lines of it that were written are in the queue: committed, and marked
                self._jn = n
                self.journal_errors += 1
                self._journaling = False
                log.error("audit: the entry journal failed (%s); entries commit before answers", e)
                return False
            self._jn = n
            self._passed = self._taken + ahead + len(todo)
            self.journaled += len(lines)
            for it in todo:
                w = it.waiter
                if w is not None and it.jn > 0:
                    it.waiter = None
                    w.report(None)
            return True
        finally:
            self._turn.release()

    def _commit_here(self) -> bool:
        if self._conn is None or self._stopping or not self.healthy:
            return False
        if not self._turn.acquire(blocking=False):
            return False  # the writer thread is taking or committing a batch
        try:
            conn = self._here_conn
            if conn is None or self._here_pid != this_process():
                # a connection of its own, whose busy timeout is 0 (the writer's waits for a
                # lock: switching it per commit cost a statement after each commit)
                try:
                    conn = self._here_conn = connect_appender(self.db_path, self.cfg.durability)
                except sqlite3.Error:
                    return False
                self._here_pid = this_process()
            items = self._drain(self._queue)
            pending = _pending(items)
            try:
                mark = _mark(items)
                times = _times(items) if mark else None
                rows = self._append(conn, pending, False, mark, times) if pending else []
            except (sqlite3.Error, ValueError, OSError):
                # busy, or failing: the writer thread retries (and counts, and logs)
                self._queue.extendleft(reversed(items))
                self._taken -= len(items)
                return False
            if rows:
                self._here_commits += 1  # before _committed wakes a parked writer to look at it
            self._committed(items, rows)
            return True
        finally:
            self._turn.release()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every entry accepted before this call is committed; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            return not self._queue
        fut: Future[int] = Future()
        # markers bypass the bound: they hold no entry
        self._queue.append(_Item(None, _Callback.resolving(fut)))
        self._urgent += 1
        self._wake.set()
        try:
            fut.result(timeout)
        except Exception:
            return False
        return True

    # -- stats -------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def stats(self) -> AuditStats:
        return AuditStats(
            backlog=len(self._queue),
            queue_max=self.queue_max,
            accepted=self.accepted,
            rejected=self.rejected,
            entries_written=self.entries_written,
            batches_written=self.batches_written,
            sqlite_errors=self.sqlite_errors,
            head_seq=self.head_seq,
            healthy=self.healthy,
            defensive=self.defensive,
            mirrors={f.mirror.name: f.stats() for f in self._feeders},
            sync_errors=self.sync_errors,
            unsynced_s=0.0 if (at := self._unsynced_at) is None else time.monotonic() - at,
        )

    # -- the writer thread -------------------------------------------------------------------

    def _take_batch(self) -> list[_Item] | None:
        """The next batch, with the turn (``_turn``) held: the caller commits it, then releases
        the turn; None (turn not held) once stopping with nothing queued.

        A batch is taken once something in the queue is due: an entry someone waits for (a
        durable one, a flush), a whole batch, or an entry that has waited
        ``batch_max_delay_ms``. Until then the writer waits without the turn, so a caller's
        record_here commits at once what is queued (the entries of its request among them)."""
        q = self._queue
        while True:
            self._wake.clear()
            self._checkpoint_due()
            now = time.monotonic()
            self._sweep_due(now)
            wait = self._until_due(now)
            if self._sync is not None:
                wait = self._sync_when_due(now, wait)
            if wait is None:
                if not q:
                    if self._stopping:
                        return None  # stopping, nothing queued
                    # what was due was committed on a caller's thread meanwhile (record_here
                    # drains the queue while the writer looks or syncs): look again, never exit
                    continue
                self._turn.acquire()
                seen = self._urgent
                if q:
                    items = self._drain(q)
                    if not q:
                        # those counted from now: the next batch. With entries left (a batch
                        # is at most batch_max_entries), one someone waits for may be among
                        # them: the next look takes them at once
                        self._urgent_seen = seen
                    return items
                self._urgent_seen = seen
                self._turn.release()  # committed meanwhile on a caller's thread
                continue
            if self._quiet_for(now) >= PARK_AFTER_S and self._idle():
                # the flag first, then a second look: an entry or commit from now on wakes it
                self._parked = True
                if self._idle():
                    self._wake.wait(PARK_MAX_S)
                self._parked = False
                continue
            self._wake.wait(wait)

    def _quiet_for(self, now: float) -> float:
        """How long the writer has seen no entry accepted."""
        seen, since = self._quiet
        if seen != self.accepted:
            self._quiet = (self.accepted, now)
            return 0.0
        return now - since

    def _idle(self) -> bool:
        """Nothing for the writer to look at until someone wakes it: nothing queued, nothing
        unsynced, no checkpoint due."""
        return (
            not self._queue
            and self._unsynced_at is None
            and not self._stopping
            and self._here_commits - self._checkpointed < HERE_CHECKPOINT_EVERY
        )

    def _until_due(self, now: float) -> float | None:
        """None when a batch is due (or the writer stops), else how long to wait for one."""
        q = self._queue
        delay = self.cfg.batch_max_delay_ms / 1000
        if not q:
            # an entry queued without a wake is looked at by its due time
            return None if self._stopping else delay
        if self._stopping or self._urgent != self._urgent_seen or len(q) >= self._wake_at:
            return None
        try:
            head = q[0]
            due = head.at + delay
            if head.jn > 0:
                # the journaled ones (the queue's first `ahead`) are durable already: chained
                # within the longer delay; the first one past them within batch_max_delay_ms
                due = head.at + self._chain_delay
                ahead = self._passed - self._taken
                if ahead < len(q):
                    due = min(due, q[max(ahead, 0)].at + delay)
        except IndexError:  # drained meanwhile by a commit on a caller's thread
            return None
        wait = due - now
        # never asleep past batch_max_delay_ms: an entry queued meanwhile without a wake (one
        # not journaled) is due by then
        return None if wait <= 0 else min(wait, delay)

    def _checkpoint_due(self) -> None:
        """Copy the log back into the ledger file (a PASSIVE checkpoint: nobody waits for it)
        once HERE_CHECKPOINT_EVERY commits were made on a caller's thread since the last one.

        That connection is the event loop's (record_here) and never checkpoints: SQLite runs the
        checkpoint in the commit that takes the log past 1,000 pages, copying them into the file
        and, with synchronous NORMAL or FULL, fsyncing it: measured alone, 3,000 commits 2 ms
        apart, 18-19 took over 2 ms (up to 6.5), against 1-3 without, and on the loop every
        connection's requests wait behind such a commit (bench/README.md, issue 21). The
        writer's own commits checkpoint as SQLite does, on this thread."""
        here = self._here_commits
        if here - self._checkpointed < HERE_CHECKPOINT_EVERY or self._conn is None:
            return
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:  # busy or failing: the next look tries again
            log.debug("audit: WAL checkpoint not done (%s)", e)
            return
        self._checkpointed = here
        self.checkpoints += 1

    def _sweep_due(self, now: float) -> None:
        """Every SWEEP_EVERY_S, append the journals of processes that died since (on this
        thread, without the turn: the ledger's write gate orders it with every other append)."""
        if now < self._sweep_at or self._journal is None or self._conn is None:
            return
        self._sweep_at = now + SWEEP_EVERY_S
        try:
            self._replay_journals(self._conn)
        except (sqlite3.Error, OSError) as e:  # tried again at the next sweep
            log.warning("audit: the journals of processes that died not appended yet (%s)", e)

    def _sync_when_due(self, now: float, wait: float | None) -> float | None:
        """Sync the log if its oldest unsynced commit is `sync_interval_ms` old; then how long
        the writer may wait: `wait` (None: a batch is due now), or less when the next sync (or
        the next look for a commit made on a caller's thread) comes first."""
        interval = self.cfg.sync_interval_ms / 1000
        at = self._unsynced_at
        if at is not None and at + interval <= now:
            self._sync_log()
            at = self._unsynced_at
        if wait is None:
            return None
        # nothing unsynced: a commit made on a caller's thread meanwhile is looked at within
        # the interval; else the oldest unsynced one is synced when its interval ends
        until = interval if at is None else max(at + interval - now, 0.001)
        return until if until < wait else wait

    def _sync_log(self) -> bool:
        """fsync the log (process_crash), off the turn: commits on a caller's thread go on
        meanwhile, and only those counted before it began are marked synced. A failed sync is
        counted and logged and tried again at the next look (the entries are committed: a
        process crash still keeps them)."""
        sync = self._sync
        if sync is None:
            return True
        covered = self._commits  # commits counted after their transaction ended
        began = time.monotonic()
        try:
            sync()
        except OSError as e:
            self.sync_errors += 1
            if self.sync_errors % 100 == 1:
                log.warning("audit: the log could not be synced to the disk (%s); retrying", e)
            self._unsynced_at = began  # tried again in sync_interval_ms
            return False
        self.syncs += 1
        # (a writer thread that died holding the turn: the state stays unsynced, conservative)
        if self._turn.acquire(timeout=5.0):
            try:
                self._synced = covered
                self._unsynced_at = None if self._commits == covered else began
            finally:
                self._turn.release()
        return True

    def _drain(self, q: deque[_Item]) -> list[_Item]:
        """Up to a batch of what is queued, at once, each entry prepared (`_Later`); with the
        turn held. An entry not journaled by then is committed without it (`jn` -1)."""
        items = self._take(q)
        self._taken += len(items)
        for it in items:
            if it.jn == 0 and it.pending is not None:
                it.jn = -1
            if type(it.pending) is _Later:
                it.pending = self._prepared(it.pending)
        return items

    def _take(self, q: deque[_Item]) -> list[_Item]:
        items: list[_Item] = []
        entries = 0
        while q and entries < self.cfg.batch_max_entries:
            item = q.popleft()
            items.append(item)
            if item.pending is not None:
                entries += 1
        return items

    def _run(self) -> None:
        conn = self._conn
        assert conn is not None
        items: list[_Item] = []
        try:
            while True:
                taken = self._take_batch()
                if taken is None:
                    return
                items = taken
                try:
                    if not self._commit(conn, items):
                        self._fail_all(items, "the audit ledger could not be written before close")
                        items = []
                        return
                finally:
                    self._turn.release()
        except (
            BaseException
        ) as e:  # a bug, not a store failure: refuse further entries (fail closed)
            self._closed = True
            self.healthy = False
            self.last_error = f"writer thread died: {type(e).__name__}: {e}"
            log.exception("audit: writer thread died")
            self._fail_all(items, self.last_error)
            raise
        finally:
            rest = list(self._queue)
            if rest and self._closed:
                self._queue.clear()
                self._fail_all(rest, self.last_error or "the audit writer stopped")
            if self._unsynced_at is not None:
                self._sync_log()  # what was committed reaches the disk before the writer ends
            self._close_journal(conn)
            conn.close()

    def _append(
        self,
        conn: sqlite3.Connection,
        pending: list[Pending],
        wait: bool = True,
        mark: int = 0,
        times: list[int] | None = None,
    ) -> list[Row]:
        """One batch, appended while holding the ledger's write gate: the writers of other
        workers sharing this file queue on it instead of sleeping in SQLite's busy handler
        (1, 2, 5, 10 ms ... while a commit and its fsync take a fraction of a millisecond).
        Without `wait`, a gate held by anyone else raises at once (and `conn`'s busy timeout
        says how long SQLite's own lock is waited for)."""
        if not self._gate.acquire(self._busy_timeout_ms / 1000 if wait else 0.0):
            raise sqlite3.OperationalError(
                f"database is locked (another writer held {self._gate.path}"
                + (f" for over {self._busy_timeout_ms} ms)" if wait else ")")
            )
        try:
            journal = self._journal
            if mark <= 0 or journal is None:
                return append_batch(conn, pending)
            rows = append_batch(conn, pending, (journal.name, mark), times)
            self._jcommitted = mark
            return rows
        finally:
            self._gate.release()

    def _commit(self, conn: sqlite3.Connection, items: list[_Item]) -> bool:
        pending = _pending(items)
        mark = _mark(items)
        times = _times(items) if mark else None
        attempt = 0
        while True:
            try:
                rows = self._append(conn, pending, True, mark, times) if pending else []
                break
            except (sqlite3.Error, ValueError, OSError) as e:
                # ValueError: the head entry's hash is not hex (a damaged ledger): we cannot
                # chain after it, so we keep failing (and governance fails closed) until fixed.
                self.sqlite_errors += 1
                self.healthy = False
                self.last_error = str(e)
                if attempt % 30 == 0:  # about once per 30 s once the backoff has grown
                    log.warning(
                        "audit: commit of %d entries failed (%s); retrying", len(pending), e
                    )
                if self._abandon.is_set():
                    return False
                self._abandon.wait(min(0.01 * 2**attempt, 1.0))
                attempt += 1
        self.healthy = True
        self._committed(items, rows)
        journal = self._journal
        if journal is not None:
            if not self._journaling:
                self._resume_journal(journal)
            elif mark > 0 and journal.size > TRUNCATE_AT_BYTES:
                self._empty_journal(journal)
        return True

    def _empty_journal(self, journal: Journal) -> None:
        """Empty the journal once the ledger holds every line in it (its numbering goes on);
        with the turn held: no journal write meanwhile."""
        if self._jcommitted != self._jn:
            return  # lines written since the last commit: the next one looks again
        try:
            journal.empty()
        except OSError as e:
            log.warning("audit: the entry journal could not be emptied (%s)", e)

    def _resume_journal(self, journal: Journal) -> None:
        """After a journal write failed (disk full), journal again once the ledger holds every
        line: emptied first (a failed write may have left half a line). With the turn held."""
        if self._jcommitted != self._jn or self._journal_pid != this_process():
            return
        try:
            journal.empty()
        except OSError:
            return  # tried again after the next commit
        self._passed = self._taken  # what is queued now is looked at by the next write
        self._journaling = True
        log.warning("audit: the entry journal is written again")

    def _close_journal(self, conn: sqlite3.Connection) -> None:
        """At the writer's end: a journal whose every line is in the ledger goes, with its
        mark; one that still holds entries (the ledger failed) stays for the next start."""
        journal, self._journal = self._journal, None
        self._journaling = False
        if journal is None:
            return
        done = not self._queue and self._jcommitted == self._jn
        journal.close(remove=done)
        if done:
            try:
                forget_journal(conn, journal.name)
            except sqlite3.Error as e:  # a mark without its journal: harmless
                log.debug("audit: journal mark kept (%s)", e)

    def _committed(self, items: list[_Item], rows: list[Row]) -> None:
        """After a commit, with the turn held (the writer thread's or record_here's)."""
        if rows:
            self.entries_written += len(rows)
            self.batches_written += 1
            self.head_seq = rows[-1][0]
            if self._sync is not None:
                self._commits += 1
                if self._unsynced_at is None:
                    self._unsynced_at = time.monotonic()
            if self._parked:  # committed on a caller's thread: its sync (or checkpoint) is due
                self._wake.set()
        seqs = iter(rows)
        for it in items:
            seq = next(seqs)[0] if it.pending is not None else self.head_seq
            if it.waiter is not None:
                it.waiter.report(seq)
        for feeder in self._feeders:
            feeder.wake()

    def _fail_all(self, items: list[_Item], why: str) -> None:
        for it in items:
            if it.pending is not None:
                self.abandoned += 1
            if it.waiter is not None:
                it.waiter.report(None, StoreUnavailable(why))
        if self.abandoned:
            log.error("audit: %d entries abandoned: %s", self.abandoned, why)
