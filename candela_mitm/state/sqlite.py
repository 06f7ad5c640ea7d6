"""SQLite state store: the embedded backend, exact across the threads and processes of one host."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from candela_mitm.errors import StoreUnavailable
from candela_mitm.state.gate import WriteGate, this_process
from candela_mitm.state.migrations import migrate
from candela_mitm.state.ports import (
    RECALLS_KEPT,
    ActiveReservation,
    BatchAborted,
    DayTotals,
    GrantRow,
    JobRecord,
    KeyRecord,
    Lease,
    NewReservation,
    RateHit,
    RateTake,
    ReserveResult,
    SettlePlan,
    SettleResult,
    SliceRecall,
    SpendPart,
    SpendRow,
    StateStore,
    TenantRecord,
    TokenAdmit,
    UserRecord,
    WouldWait,
    plan_reserve,
    plan_settle_held,
    shrink_holds,
    token_fits_at,
)

# Commits made without waiting (on the event loop) between two WAL checkpoints: each commit adds
# a few pages, SQLite's own default is to checkpoint at 1000.
CHECKPOINT_EVERY = 100

T = TypeVar("T")
log = logging.getLogger(__name__)


def _busy(e: sqlite3.OperationalError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(e) or "busy" in str(e)


class _NoWaitScope:
    """One call_without_waiting: whether a write committed, whether a step refused to wait."""

    __slots__ = ("wrote", "refused")

    def __init__(self) -> None:
        self.wrote = False
        self.refused = False


class _Checkpointer:
    """Copies the WAL back into the database (PASSIVE: never blocks a writer) off the caller's
    thread, when poked: connections that must not wait do not checkpoint themselves."""

    def __init__(self, store: SqliteStateStore) -> None:
        self._store = store
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = -1

    def poke(self) -> None:
        if self._pid != this_process() or self._thread is None:  # none yet, or one of a parent
            self._event = threading.Event()
            self._thread = threading.Thread(
                target=self._run, name="candela-state-checkpoint", daemon=True
            )
            self._pid = this_process()
            self._thread.start()
        self._event.set()

    def _run(self) -> None:
        while True:
            self._event.wait()
            self._event.clear()
            if self._store.closed:
                return
            try:
                self._store.checkpoint()
            except StoreUnavailable:
                log.warning("SQLite state store: WAL checkpoint failed", exc_info=True)

    def stop(self) -> None:
        self._event.set()


# A reservation and its user's row for its period, in one statement (settle, settle_part).
_RESERVATION_AND_DAY = (
    "SELECT r.user_id, r.tenant, r.day, r.budget, r.daily_hold, r.grant_holds, "
    "r.status, d.spent, d.from_grants, d.reserved, r.period, r.tenant_period, "
    "r.tenant_hold, r.key_id, r.key_period, r.key_hold "
    "FROM reservations r LEFT JOIN days d ON d.user_id = r.user_id "
    "AND d.day = (CASE r.period WHEN '' THEN r.day ELSE r.period END) "
    "WHERE r.reservation_id = ?"
)


# What a reserve reads before it decides: the user's row for its period, and the tenant's and
# the API key's rows when named, in one statement (up to three before: a statement costs 7-20 us
# in the server between requests; bench/README.md, eleventh session). A row that does not exist
# reads as NULLs.
_RESERVE_ROWS = (
    "SELECT d.spent, d.from_grants, d.reserved, t.spent, t.reserved, k.spent, k.reserved "
    "FROM (SELECT 1) "
    "LEFT JOIN days d ON d.user_id = ?1 AND d.day = ?2 "
    "LEFT JOIN tenant_periods t ON t.tenant = ?3 AND t.period = ?4 "
    "LEFT JOIN key_periods k ON k.key_id = ?5 AND k.period = ?6"
)


class _Settling(NamedTuple):
    """A reservation being settled (settle, settle_part): its budget rows, and the plan."""

    user_id: str
    tenant: str
    day: str
    period: str  # the user's budget row
    tenant_period: str
    tenant_hold: int
    key_id: str
    key_period: str
    key_hold: int
    plan: SettlePlan


def _settle_plan(
    c: sqlite3.Connection, reservation_id: str, cost: int, now_us: int
) -> _Settling | None:
    """Read an active (or reclaimed) reservation and plan the draw of `cost` on it. None: the
    reservation is unknown, settled or released."""
    # the reservation and its day's row, in one statement
    r = c.execute(_RESERVATION_AND_DAY, (reservation_id,)).fetchone()
    if r is None or r[6] not in ("active", "reclaimed"):
        return None
    user_id = r[0]

    def grants_free(own: Mapping[str, int]) -> list[tuple[str, int]]:
        marks = ",".join("?" * len(own))
        rows: list[tuple[str, int]] = c.execute(
            "SELECT grant_id, amount - used - held FROM grants WHERE user_id = ? AND "
            f"(expires_us > ? OR grant_id IN ({marks})) ORDER BY expires_us, grant_id",
            (user_id, now_us, *own),
        ).fetchall()
        return rows

    day = (r[7], r[8], r[9]) if r[7] is not None else (0, 0, 0)
    plan = plan_settle_held(cost, r[6], r[4], json.loads(r[5]), r[3], day, grants_free)
    return _Settling(
        user_id, r[1], r[2], r[10] or r[2], r[11], r[12], r[13], r[14], r[15], plan
    )


def _book_settle(
    c: sqlite3.Connection,
    s: _Settling,
    cost: int,
    daily_back: int,
    grants_back: Mapping[str, int],
    tenant_back: int,
    key_back: int,
) -> None:
    """Write a planned settle to the budget rows and grants: `cost` spent on each row, its draws
    used, and the holds given back (`*_back`: what each row's reservation shrinks by)."""
    c.execute(
        "INSERT INTO days (user_id, day, spent, from_grants, reserved) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (user_id, day) DO UPDATE SET spent = spent + excluded.spent, "
        "from_grants = from_grants + excluded.from_grants, "
        "reserved = reserved + excluded.reserved",
        (s.user_id, s.period, cost, sum(s.plan.draws.values()), -daily_back),
    )
    if s.tenant_period:
        c.execute(
            "INSERT INTO tenant_periods (tenant, period, spent, reserved) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (tenant, period) DO UPDATE SET "
            "spent = spent + excluded.spent, reserved = reserved + excluded.reserved",
            (s.tenant, s.tenant_period, cost, -tenant_back),
        )
    if s.key_period:  # the key's row, when a key budget was named
        c.execute(
            "INSERT INTO key_periods (key_id, period, spent, reserved) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (key_id, period) DO UPDATE SET "
            "spent = spent + excluded.spent, reserved = reserved + excluded.reserved",
            (s.key_id, s.key_period, cost, -key_back),
        )
    for grant_id in grants_back.keys() | s.plan.draws.keys():
        c.execute(
            "UPDATE grants SET used = used + ?, held = held - ? WHERE grant_id = ?",
            (s.plan.draws.get(grant_id, 0), grants_back.get(grant_id, 0), grant_id),
        )


def _bump_generation(c: sqlite3.Connection) -> None:
    """One change more to the settings the admin API sets, in the caller's write transaction."""
    c.execute("UPDATE settings_generation SET n = n + 1 WHERE id = 0")


class SqliteStateStore(StateStore):
    """One database file shared by every thread (a connection each) and process (WAL).

    Writes run in `BEGIN IMMEDIATE` transactions, so the check and the change of a reserve or a
    rate hit happen under one write lock; a lock held past `busy_timeout_ms` fails closed.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout_ms: int = 2000):
        self.path = Path(path).expanduser()
        if str(path) == ":memory:":
            raise ValueError(
                "the SQLite state store needs a file: each thread has its own connection"
            )
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"SQLite state store {self.path}: {e.strerror or e}") from e
        self._gate = WriteGate(self.path)
        self._nowait_commits = 0
        self._checkpointer = _Checkpointer(self)
        with self._tx() as c:  # under the write lock: one process runs each step
            migrate(c, f"SQLite state store {self.path}")

    # -- connections and transactions ----------------------------------------------------------
    def _unavailable(self, e: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite state store {self.path}: {e}")

    def _connect(self, busy_timeout_ms: int) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # only so that close() may close every thread's
            )
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: a commit is durable against a crash of the process, not of the host
            # (no fsync per commit); losing the last moments of counters to a power cut is
            # acceptable, blocking every request on an fsync is not.
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            raise self._unavailable(e) from e
        with self._lock:
            self._conns.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable(f"SQLite state store {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        # A connection inherited through fork() must not be used by the child.
        if conn is not None and self._local.pid == this_process():
            return conn
        conn = self._connect(self._busy_timeout_ms)
        self._local.conn = conn
        self._local.pid = this_process()
        return conn

    def _nowait_conn(self) -> sqlite3.Connection:
        """This thread's connection for call_without_waiting: a busy database answers at once
        (busy_timeout 0), and it never checkpoints the WAL itself (a checkpoint may fsync):
        the checkpointer thread does, every CHECKPOINT_EVERY commits made this way."""
        if self._closed:
            raise StoreUnavailable(f"SQLite state store {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "nowait_conn", None)
        if conn is not None and self._local.nowait_pid == this_process():
            return conn
        conn = self._connect(0)
        try:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as e:
            raise self._unavailable(e) from e
        self._local.nowait_conn = conn
        self._local.nowait_pid = this_process()
        return conn

    def _tx(self, write: bool = True) -> AbstractContextManager[sqlite3.Connection]:
        """The transaction a store method runs in. Not a generator itself: inside batch() (every
        hot-path call, state/calls.py) the joined transaction is handed over by nullcontext, and
        a call without waiting gets its transaction directly: an idle user's admission went
        through six generator context managers, now three (bench/README.md, eleventh session)."""
        joined: sqlite3.Connection | None = getattr(self._local, "batch", None)
        if joined is not None:  # inside batch(): one transaction for the whole block
            return nullcontext(joined)
        scope: _NoWaitScope | None = getattr(self._local, "scope", None)
        if scope is not None and not scope.wrote:
            return self._tx_without_waiting(scope, write)
        return self._tx_waiting(write)

    @contextmanager
    def _tx_waiting(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A transaction that waits for the write lock (up to busy_timeout_ms), then fails closed."""
        conn = self._conn()
        if not write:
            with self._in_tx(conn, "BEGIN"):
                yield conn
            return
        try:
            gated = self._gate.acquire(self._busy_timeout_ms / 1000)
        except OSError as e:
            raise self._unavailable(e) from e
        if not gated:
            raise StoreUnavailable(
                f"SQLite state store {self.path}: database is locked (by another writer of "
                f"this store for over {self._busy_timeout_ms} ms)"
            )
        try:
            with self._in_tx(conn, "BEGIN IMMEDIATE"):
                yield conn
        finally:
            self._gate.release()

    @contextmanager
    def _tx_without_waiting(
        self, scope: _NoWaitScope, write: bool
    ) -> Iterator[sqlite3.Connection]:
        """A transaction that refuses (WouldWait, nothing changed) rather than wait for a lock."""
        if scope.refused:
            raise WouldWait("an earlier step of this call would have waited")
        conn = self._nowait_conn()
        if write:
            try:
                gated = self._gate.try_acquire()
            except OSError as e:
                raise self._unavailable(e) from e
            if not gated:
                scope.refused = True
                raise WouldWait("another writer holds the state store")
        try:
            try:
                with self._in_tx(conn, "BEGIN IMMEDIATE" if write else "BEGIN"):
                    yield conn
            except StoreUnavailable as e:
                # rolled back: a busy database (a checkpoint, another tool's writer) is a wait
                if isinstance(e.__cause__, sqlite3.OperationalError) and _busy(e.__cause__):
                    scope.refused = True
                    raise WouldWait(str(e)) from e
                raise
        finally:
            if write:
                self._gate.release()
        if write:
            scope.wrote = True
            self._nowait_commits += 1
            if self._nowait_commits % CHECKPOINT_EVERY == 0:
                self._checkpointer.poke()

    def call_without_waiting(self, fn: Callable[..., T], *args: Any) -> T:
        if getattr(self._local, "scope", None) is not None or getattr(
            self._local, "batch", None
        ) is not None:
            raise RuntimeError("call_without_waiting cannot nest or run inside batch()")
        scope = _NoWaitScope()
        self._local.scope = scope
        try:
            result = fn(*args)
        except WouldWait:
            raise
        except BaseException as e:
            if scope.refused:  # fn turned the refusal into another error: still a wait
                raise WouldWait("the state store was busy") from e
            raise
        finally:
            self._local.scope = None
        if scope.refused:  # fn swallowed the refusal: what it answered is not the store's
            raise WouldWait("the state store was busy")
        return result

    joins_calls = True
    # each one read transaction (BEGIN, no write gate): run_calls runs a turn of these alone
    reads = frozenset({"get_user", "get_tenant", "api_key", "settings_generation"})

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        conn: sqlite3.Connection | None = getattr(self._local, "batch", None)
        if conn is None:
            raise RuntimeError("savepoint() is only for calls inside batch()")
        try:
            conn.execute("SAVEPOINT candela_call")
        except sqlite3.Error as e:
            raise BatchAborted(str(e)) from e
        try:
            yield
        except BaseException as e:
            try:
                conn.execute("ROLLBACK TO candela_call")
                conn.execute("RELEASE candela_call")
            except sqlite3.Error as undo:
                raise BatchAborted(f"could not undo a failed call: {undo}") from e
            if isinstance(e, sqlite3.Error):  # inside a batch the statements' errors come raw
                raise self._unavailable(e) from e
            raise
        try:
            conn.execute("RELEASE candela_call")
        except sqlite3.Error as e:
            raise BatchAborted(str(e)) from e

    def in_batch(self) -> bool:
        return getattr(self._local, "batch", None) is not None

    @contextmanager
    def batch(self) -> Iterator[None]:
        if getattr(self._local, "batch", None) is not None:
            yield  # nested: already one transaction
            return
        with self._tx(write=True) as c:
            self._local.batch = c
            try:
                yield
            finally:
                self._local.batch = None

    @contextmanager
    def _in_tx(self, conn: sqlite3.Connection, begin: str) -> Iterator[None]:
        try:
            conn.execute(begin)
        except sqlite3.Error as e:
            raise self._unavailable(e) from e
        try:
            yield
        except BaseException as e:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise self._unavailable(e) from e
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise self._unavailable(e) from e

    def ping(self) -> None:
        with self._tx(write=False) as c:
            c.execute("SELECT count(*) FROM users").fetchone()

    @property
    def closed(self) -> bool:
        return self._closed

    def checkpoint(self) -> None:
        """Copy what the WAL holds back into the database file, without waiting for anyone."""
        try:
            self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            raise self._unavailable(e) from e

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        self._checkpointer.stop()
        for conn in conns:
            with suppress(sqlite3.Error):
                conn.close()
        self._gate.close()

    # -- users ---------------------------------------------------------------------------------
    def get_user(self, user_id: str, include_deleted: bool = False) -> UserRecord | None:
        with self._tx(write=False) as c:
            row = c.execute("SELECT record FROM users WHERE user_id = ?", (user_id,)).fetchone()
        if row is None:
            return None
        record = UserRecord.from_json(json.loads(row[0]))
        return record if include_deleted or not record.deleted else None

    def put_user(self, record: UserRecord) -> None:
        data = json.dumps({**record.to_json(), "deleted": False, "deleted_at": None})
        with self._tx() as c:
            c.execute(
                "INSERT INTO users (user_id, record, deleted) VALUES (?, ?, 0) "
                "ON CONFLICT (user_id) DO UPDATE SET record = excluded.record, deleted = 0",
                (record.user_id, data),
            )
            _bump_generation(c)

    def delete_user(self, user_id: str, now_us: int) -> bool:
        with self._tx() as c:
            row = c.execute(
                "SELECT record FROM users WHERE user_id = ? AND deleted = 0", (user_id,)
            ).fetchone()
            if row is None:
                return False
            data = {**json.loads(row[0]), "deleted": True, "deleted_at": now_us}
            c.execute(
                "UPDATE users SET record = ?, deleted = 1 WHERE user_id = ?",
                (json.dumps(data), user_id),
            )
            _bump_generation(c)
            return True

    def list_users(self, include_deleted: bool = False) -> list[UserRecord]:
        query = "SELECT record FROM users"
        if not include_deleted:
            query += " WHERE deleted = 0"
        with self._tx(write=False) as c:
            rows = c.execute(query + " ORDER BY user_id").fetchall()
        return [UserRecord.from_json(json.loads(r[0])) for r in rows]

    # -- ledger --------------------------------------------------------------------------------
    @staticmethod
    def _day_row(c: sqlite3.Connection, user_id: str, day: str) -> tuple[int, int, int]:
        row = c.execute(
            "SELECT spent, from_grants, reserved FROM days WHERE user_id = ? AND day = ?",
            (user_id, day),
        ).fetchone()
        return (row[0], row[1], row[2]) if row else (0, 0, 0)

    @staticmethod
    def _tenant_row(c: sqlite3.Connection, tenant: str, period: str) -> tuple[int, int]:
        row = c.execute(
            "SELECT spent, reserved FROM tenant_periods WHERE tenant = ? AND period = ?",
            (tenant, period),
        ).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    @staticmethod
    def _key_row(c: sqlite3.Connection, key_id: str, period: str) -> tuple[int, int]:
        row = c.execute(
            "SELECT spent, reserved FROM key_periods WHERE key_id = ? AND period = ?",
            (key_id, period),
        ).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def reserve(self, new: NewReservation) -> ReserveResult:
        with self._tx() as c:
            period = new.user_period
            # the user's, the tenant's and the key's rows in one statement (the last two only
            # when named: NULL matches no row); the grants in the next
            d_spent, d_grants, d_reserved, t_spent, t_reserved, k_spent, k_reserved = c.execute(
                _RESERVE_ROWS,
                (
                    new.user_id,
                    period,
                    new.tenant if new.on_tenant_row else None,
                    new.tenant_period,
                    new.key_id if new.on_key_row else None,
                    new.key_period,
                ),
            ).fetchone()
            grants = c.execute(
                "SELECT grant_id, amount - used - held FROM grants "
                "WHERE user_id = ? AND expires_us > ? ORDER BY expires_us, grant_id",
                (new.user_id, new.now_us),
            ).fetchall()
            got = plan_reserve(
                new,
                (d_spent or 0, d_grants or 0, d_reserved or 0),
                grants,
                lambda: (t_spent or 0, t_reserved or 0),
                lambda: (k_spent or 0, k_reserved or 0),
            )
            if not got.ok:
                return got
            daily, holds, t_hold, k_hold = (
                got.daily_hold, got.grant_holds, got.tenant_hold, got.key_hold
            )
            keyed = new.on_key_row
            if daily:
                c.execute(
                    "INSERT INTO days (user_id, day, reserved) VALUES (?, ?, ?) "
                    "ON CONFLICT (user_id, day) DO UPDATE SET reserved = reserved + excluded.reserved",
                    (new.user_id, period, daily),
                )
            if t_hold:
                c.execute(
                    "INSERT INTO tenant_periods (tenant, period, reserved) VALUES (?, ?, ?) "
                    "ON CONFLICT (tenant, period) DO UPDATE SET "
                    "reserved = reserved + excluded.reserved",
                    (new.tenant, new.tenant_period, t_hold),
                )
            if k_hold:
                c.execute(
                    "INSERT INTO key_periods (key_id, period, reserved) VALUES (?, ?, ?) "
                    "ON CONFLICT (key_id, period) DO UPDATE SET "
                    "reserved = reserved + excluded.reserved",
                    (new.key_id, new.key_period, k_hold),
                )
            for grant_id, take in holds.items():
                c.execute("UPDATE grants SET held = held + ? WHERE grant_id = ?", (take, grant_id))
            c.execute(
                "INSERT INTO reservations (reservation_id, user_id, tenant, day, amount, budget, "
                "daily_hold, grant_holds, request_id, owner, created_us, status, model, provider, "
                "period, tenant_period, tenant_hold, key_id, key_period, key_hold) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.reservation_id,
                    new.user_id,
                    new.tenant,
                    new.day,
                    new.amount,
                    new.budget,
                    daily,
                    json.dumps(holds) if holds else "{}",  # most hold no grant
                    new.request_id,
                    new.owner,
                    new.now_us,
                    new.model,
                    new.provider,
                    period,
                    new.tenant_period if new.on_tenant_row else "",
                    t_hold,
                    new.key_id if keyed else "",
                    new.key_period if keyed else "",
                    k_hold,
                ),
            )
            return got

    def settle(
        self,
        reservation_id: str,
        cost: int,
        tokens_in: int,
        tokens_out: int,
        model: str,
        provider: str,
        now_us: int,
    ) -> SettleResult:
        with self._tx() as c:
            s = _settle_plan(c, reservation_id, cost, now_us)
            if s is None:
                return SettleResult(False)
            plan = s.plan
            # every hold it has left goes back
            _book_settle(
                c, s, cost, plan.own_daily, plan.own, s.tenant_hold if plan.active else 0,
                s.key_hold if plan.active else 0,
            )
            c.execute(
                "UPDATE reservations SET status = 'settled', cost = ?, finished_us = ? "
                "WHERE reservation_id = ?",
                (cost, now_us, reservation_id),
            )
            c.execute(
                "INSERT INTO spend (day, user_id, tenant, model, provider, cost, tokens_in, "
                "tokens_out, requests) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT (day, user_id, tenant, model, provider) DO UPDATE SET "
                "cost = cost + excluded.cost, tokens_in = tokens_in + excluded.tokens_in, "
                "tokens_out = tokens_out + excluded.tokens_out, requests = requests + 1",
                (s.day, s.user_id, s.tenant, model, provider, cost, tokens_in, tokens_out),
            )
            return SettleResult(True, cost, plan.daily, plan.draws)

    def settle_part(
        self, reservation_id: str, parts: Sequence[SpendPart], now_us: int
    ) -> SettleResult:
        cost = sum(p.cost for p in parts)
        with self._tx() as c:
            s = _settle_plan(c, reservation_id, cost, now_us)
            if s is None:
                return SettleResult(False)
            plan = s.plan
            # the holds shrink by what was drawn from them; the rest stays held
            used_daily, used_grants = shrink_holds(plan.own_daily, plan.own, plan.daily, plan.draws)
            t_used = min(s.tenant_hold, cost) if plan.active and s.tenant_period else 0
            k_used = min(s.key_hold, cost) if plan.active and s.key_period else 0
            _book_settle(c, s, cost, used_daily, used_grants, t_used, k_used)
            left = {g: h - used_grants.get(g, 0) for g, h in plan.own.items()}
            c.execute(
                "UPDATE reservations SET daily_hold = daily_hold - ?, tenant_hold = tenant_hold - ?, "
                "key_hold = key_hold - ?, grant_holds = CASE status WHEN 'active' THEN ? "
                "ELSE grant_holds END, settled = settled + ?, parts = parts + ? "
                "WHERE reservation_id = ?",
                (
                    used_daily, t_used, k_used, json.dumps({g: h for g, h in left.items() if h}),
                    cost, sum(p.requests for p in parts), reservation_id,
                ),
            )
            c.executemany(
                "INSERT INTO spend (day, user_id, tenant, model, provider, cost, tokens_in, "
                "tokens_out, requests) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (day, user_id, tenant, model, provider) DO UPDATE SET "
                "cost = cost + excluded.cost, tokens_in = tokens_in + excluded.tokens_in, "
                "tokens_out = tokens_out + excluded.tokens_out, "
                "requests = requests + excluded.requests",
                [
                    (s.day, s.user_id, s.tenant, p.model, p.provider, p.cost, p.tokens_in,
                     p.tokens_out, p.requests)
                    for p in parts
                ],
            )
            return SettleResult(True, cost, plan.daily, plan.draws)

    def release(self, reservation_id: str, now_us: int, reclaim: bool = False) -> bool:
        with self._tx() as c:
            r = c.execute(
                "SELECT user_id, CASE period WHEN '' THEN day ELSE period END, daily_hold, "
                "grant_holds, status, tenant, tenant_period, tenant_hold, key_id, key_period, "
                "key_hold FROM reservations WHERE reservation_id = ?",
                (reservation_id,),
            ).fetchone()
            if r is None or r[4] != "active":
                return False
            if r[2]:
                c.execute(
                    "UPDATE days SET reserved = reserved - ? WHERE user_id = ? AND day = ?",
                    (r[2], r[0], r[1]),
                )
            if r[6] and r[7]:
                c.execute(
                    "UPDATE tenant_periods SET reserved = reserved - ? "
                    "WHERE tenant = ? AND period = ?",
                    (r[7], r[5], r[6]),
                )
            if r[9] and r[10]:
                c.execute(
                    "UPDATE key_periods SET reserved = reserved - ? "
                    "WHERE key_id = ? AND period = ?",
                    (r[10], r[8], r[9]),
                )
            for grant_id, hold in json.loads(r[3]).items():
                c.execute("UPDATE grants SET held = held - ? WHERE grant_id = ?", (hold, grant_id))
            c.execute(
                "UPDATE reservations SET status = ?, finished_us = ? WHERE reservation_id = ?",
                ("reclaimed" if reclaim else "released", now_us, reservation_id),
            )
            return True

    def active_reservations(self) -> list[ActiveReservation]:
        with self._tx(write=False) as c:
            rows = c.execute(
                "SELECT reservation_id, owner, created_us, user_id, tenant, day, amount, "
                "request_id, model, provider, settled, parts FROM reservations "
                "WHERE status = 'active' ORDER BY created_us"
            ).fetchall()
        return [ActiveReservation(*r) for r in rows]

    def purge_finished(self, before_us: int) -> int:
        with self._tx() as c:
            cur = c.execute(
                "DELETE FROM reservations WHERE status != 'active' AND finished_us < ?",
                (before_us,),
            )
            return cur.rowcount

    def add_grant(self, grant: GrantRow) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO grants (grant_id, user_id, amount, used, held, expires_us, reason, "
                "actor, created_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    grant.grant_id,
                    grant.user_id,
                    grant.amount,
                    grant.used,
                    grant.held,
                    grant.expires_us,
                    grant.reason,
                    grant.actor,
                    grant.created_us,
                ),
            )
            _bump_generation(c)

    def grants(self, user_id: str) -> list[GrantRow]:
        with self._tx(write=False) as c:
            rows = c.execute(
                "SELECT grant_id, user_id, amount, used, held, expires_us, reason, actor, "
                "created_us FROM grants WHERE user_id = ? ORDER BY expires_us, grant_id",
                (user_id,),
            ).fetchall()
        return [GrantRow(*r) for r in rows]

    def day_totals(self, user_id: str, day: str) -> DayTotals:
        with self._tx(write=False) as c:
            return DayTotals(*self._day_row(c, user_id, day))

    def tenant_totals(self, tenant: str, period: str) -> DayTotals:
        with self._tx(write=False) as c:
            spent, reserved = self._tenant_row(c, tenant, period)
        return DayTotals(spent, 0, reserved)

    def key_totals(self, key_id: str, period: str) -> DayTotals:
        with self._tx(write=False) as c:
            spent, reserved = self._key_row(c, key_id, period)
        return DayTotals(spent, 0, reserved)

    # -- tenants -------------------------------------------------------------------------------
    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._tx(write=False) as c:
            row = c.execute(
                "SELECT record FROM tenants WHERE tenant_id = ?", (tenant_id,)
            ).fetchone()
        return None if row is None else TenantRecord.from_json(json.loads(row[0]))

    def put_tenant(self, record: TenantRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO tenants (tenant_id, record) VALUES (?, ?) "
                "ON CONFLICT (tenant_id) DO UPDATE SET record = excluded.record",
                (record.tenant_id, json.dumps(record.to_json())),
            )
            _bump_generation(c)

    def list_tenants(self) -> list[TenantRecord]:
        with self._tx(write=False) as c:
            rows = c.execute("SELECT record FROM tenants ORDER BY tenant_id").fetchall()
        return [TenantRecord.from_json(json.loads(r[0])) for r in rows]

    def spend_rows(
        self,
        since_day: str | None = None,
        until_day: str | None = None,
        user_id: str | None = None,
        tenant: str | None = None,
    ) -> list[SpendRow]:
        where, args = [], []
        for clause, value in (
            ("day >= ?", since_day),
            ("day <= ?", until_day),
            ("user_id = ?", user_id),
            ("tenant = ?", tenant),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        query = (
            "SELECT day, user_id, tenant, model, provider, cost, tokens_in, tokens_out, requests "
            "FROM spend"
        )
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._tx(write=False) as c:
            rows = c.execute(query + " ORDER BY day, user_id, tenant, model, provider", args)
            return [SpendRow(*r) for r in rows.fetchall()]

    # -- asynchronous jobs ---------------------------------------------------------------------
    _JOB_COLUMNS = (
        "provider, job_id, user_id, tenant, model, reservation_id, charged, tokens_in, "
        "tokens_out, created_us, day, period, tenant_period, cost, trued_up_us, request_id"
    )

    def record_job(self, job: JobRecord) -> bool:
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO jobs (provider, job_id, user_id, tenant, model, "
                "reservation_id, charged, tokens_in, tokens_out, created_us, day, period, "
                "tenant_period, request_id) SELECT ?, ?, user_id, tenant, ?, reservation_id, ?, ?, "
                "?, ?, day, CASE period WHEN '' THEN day ELSE period END, tenant_period, "
                "request_id FROM reservations WHERE reservation_id = ?",
                (
                    job.provider,
                    job.job_id,
                    job.model,
                    job.charged,
                    job.tokens_in,
                    job.tokens_out,
                    job.created_us,
                    job.reservation_id,
                ),
            )
            return cur.rowcount == 1

    def job(self, provider: str, job_id: str) -> JobRecord | None:
        with self._tx(write=False) as c:
            row = c.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE provider = ? AND job_id = ?",
                (provider, job_id),
            ).fetchone()
        return JobRecord(*row) if row else None

    def put_job_object(self, provider: str, key: str, record: Mapping[str, Any]) -> bool:
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO job_objects (provider, key, record) VALUES (?, ?, ?)",
                (provider, key, json.dumps(dict(record))),
            )
            return cur.rowcount == 1

    def job_object(self, provider: str, key: str) -> dict[str, Any] | None:
        with self._tx(write=False) as c:
            row = c.execute(
                "SELECT record FROM job_objects WHERE provider = ? AND key = ?", (provider, key)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def true_up_job(
        self, provider: str, job_id: str, cost: int, tokens_in: int, tokens_out: int, now_us: int
    ) -> JobRecord | None:
        with self._tx() as c:
            row = c.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE provider = ? AND job_id = ? "
                "AND trued_up_us IS NULL",
                (provider, job_id),
            ).fetchone()
            if row is None:
                return None
            job = JobRecord(*row)
            delta = cost - job.charged
            c.execute(
                "UPDATE jobs SET cost = ?, trued_up_us = ? WHERE provider = ? AND job_id = ?",
                (cost, now_us, provider, job_id),
            )
            c.execute(
                "UPDATE days SET spent = spent + ? WHERE user_id = ? AND day = ?",
                (delta, job.user_id, job.period),
            )
            if job.tenant_period:
                c.execute(
                    "UPDATE tenant_periods SET spent = spent + ? WHERE tenant = ? AND period = ?",
                    (delta, job.tenant, job.tenant_period),
                )
            c.execute(
                "UPDATE spend SET cost = cost + ?, tokens_in = tokens_in + ?, "
                "tokens_out = tokens_out + ? WHERE day = ? AND user_id = ? AND tenant = ? "
                "AND model = ? AND provider = ?",
                (
                    delta,
                    tokens_in - job.tokens_in,
                    tokens_out - job.tokens_out,
                    job.day,
                    job.user_id,
                    job.tenant,
                    job.model,
                    job.provider,
                ),
            )
            return job

    # -- rate windows --------------------------------------------------------------------------
    def rate_hit(self, key: str, limit: int, window_us: int, now_us: int) -> RateHit:
        with self._tx() as c:
            count, stored, oldest = self._rate_window(c, key, window_us, now_us)
            allowed = count < limit
            if allowed:
                c.execute("INSERT INTO rate_log (key, ts) VALUES (?, ?)", (key, now_us))
                count += 1
                oldest = now_us if oldest is None else min(oldest, now_us)
            self._set_rate_count(c, key, count, stored)
            return RateHit(allowed, count, oldest)

    def rate_take(
        self, key: str, limit: int, n: int, window_us: int, now_us: int, stamp_us: int
    ) -> RateTake:
        with self._tx() as c:
            count, stored, oldest = self._rate_window(c, key, window_us, now_us)
            granted = max(0, min(n, limit - count))
            if granted:
                c.executemany(
                    "INSERT INTO rate_log (key, ts) VALUES (?, ?)", [(key, stamp_us)] * granted
                )
                count += granted
                oldest = stamp_us if oldest is None else min(oldest, stamp_us)
            self._set_rate_count(c, key, count, stored)
            return RateTake(granted, count, oldest)

    def rate_return(self, key: str, stamp_us: int, n: int) -> int:
        with self._tx() as c:
            removed = c.execute(
                "DELETE FROM rate_log WHERE rowid IN "
                "(SELECT rowid FROM rate_log WHERE key = ? AND ts = ? LIMIT ?)",
                (key, stamp_us, n),
            ).rowcount
            if removed:
                (stored,) = c.execute(
                    "SELECT n FROM rate_count WHERE key = ?", (key,)
                ).fetchone() or (None,)
                self._set_rate_count(c, key, (stored or 0) - removed, stored)
            return removed

    @staticmethod
    def _rate_window(
        c: sqlite3.Connection, key: str, window_us: int, now_us: int
    ) -> tuple[int, int | None, int | None]:
        """Forget `key`'s entries that left the window; (entries in it, the stored count, the
        oldest entry). The rows are counted in rate_count, not with count(*): that would read
        every request of the window (80 ns each, 160 us at 2,000 in a window) on every check."""
        forgotten = c.execute(
            "DELETE FROM rate_log WHERE key = ? AND ts <= ?", (key, now_us - window_us)
        ).rowcount
        # the running count and the first entry of the (key, ts) index, in one statement
        stored, oldest = c.execute(
            "SELECT (SELECT n FROM rate_count WHERE key = ?1),"
            " (SELECT min(ts) FROM rate_log WHERE key = ?1)",
            (key,),
        ).fetchone()
        return (stored or 0) - forgotten, stored, oldest

    @staticmethod
    def _set_rate_count(c: sqlite3.Connection, key: str, count: int, stored: int | None) -> None:
        if count <= 0:
            c.execute("DELETE FROM rate_count WHERE key = ?", (key,))
        elif stored is None or count != stored:
            c.execute(
                "INSERT INTO rate_count (key, n) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET n = excluded.n",
                (key, count),
            )

    # -- token windows -------------------------------------------------------------------------
    def token_admit(
        self, entry_id: str, checks: Sequence[tuple[str, int, int]], window_us: int, now_us: int
    ) -> TokenAdmit:
        with self._tx() as c:
            used: dict[str, int] = {}
            for key, limit, amount in checks:
                c.execute(
                    "DELETE FROM token_log WHERE key = ? AND ts <= ?", (key, now_us - window_us)
                )
                (total,) = c.execute(
                    "SELECT coalesce(sum(amount), 0) FROM token_log WHERE key = ?", (key,)
                ).fetchone()
                used[key] = total
                if amount > 0 and total + amount > limit:
                    entries = c.execute(
                        "SELECT ts, amount FROM token_log WHERE key = ? ORDER BY ts, entry_id",
                        (key,),
                    ).fetchall()
                    return TokenAdmit(
                        False, used, key, token_fits_at(entries, limit, amount, window_us)
                    )
            for key, _limit, amount in checks:
                c.execute(
                    "INSERT OR REPLACE INTO token_log (key, entry_id, ts, amount) "
                    "VALUES (?, ?, ?, ?)",
                    (key, entry_id, now_us, amount),
                )
            return TokenAdmit(True, used)

    def token_correct(self, entry_id: str, amounts: Mapping[str, int]) -> None:
        with self._tx() as c:
            for key, amount in amounts.items():
                c.execute(
                    "UPDATE token_log SET amount = ? WHERE key = ? AND entry_id = ?",
                    (amount, key, entry_id),
                )

    # -- concurrency leases --------------------------------------------------------------------
    def lease_acquire(
        self, key: str, lease_id: str, limit: int, owner: str, now_us: int, ttl_us: int
    ) -> tuple[bool, int]:
        with self._tx() as c:
            c.execute("DELETE FROM leases WHERE key = ? AND expires_us <= ?", (key, now_us))
            (held,) = c.execute("SELECT count(*) FROM leases WHERE key = ?", (key,)).fetchone()
            if held >= limit:
                return False, held
            c.execute(
                "INSERT INTO leases (key, lease_id, owner, expires_us) VALUES (?, ?, ?, ?)",
                (key, lease_id, owner, now_us + ttl_us),
            )
            return True, held + 1

    def lease_release(self, key: str, lease_id: str) -> bool:
        with self._tx() as c:
            cur = c.execute("DELETE FROM leases WHERE key = ? AND lease_id = ?", (key, lease_id))
            return cur.rowcount > 0

    def lease_renew(self, key: str, lease_id: str, now_us: int, ttl_us: int) -> bool:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE leases SET expires_us = ? WHERE key = ? AND lease_id = ? "
                "AND expires_us > ?",
                (now_us + ttl_us, key, lease_id, now_us),
            )
            return cur.rowcount > 0

    def leases(self) -> list[Lease]:
        with self._tx(write=False) as c:
            rows = c.execute(
                "SELECT key, lease_id, owner, expires_us FROM leases ORDER BY key, lease_id"
            ).fetchall()
        return [Lease(*r) for r in rows]

    # -- budget alerts -------------------------------------------------------------------------
    def claim_alert(
        self, scope: str, scope_id: str, period: str, threshold: int, now_us: int, expires_us: int
    ) -> bool:
        with self._tx() as c:
            # claims are a handful per scope and period: sweeping the expired ones here keeps
            # the table at the size of the periods still open, with no housekeeping job
            c.execute("DELETE FROM budget_alerts WHERE expires_us <= ?", (now_us,))
            cur = c.execute(
                "INSERT OR IGNORE INTO budget_alerts "
                "(scope, scope_id, period, threshold, claimed_us, expires_us) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (scope, scope_id, period, threshold, now_us, expires_us),
            )
            return cur.rowcount == 1

    # -- settings generation -------------------------------------------------------------------
    def settings_generation(self) -> int:
        with self._tx(write=False) as c:
            row = c.execute("SELECT n FROM settings_generation WHERE id = 0").fetchone()
        return 0 if row is None else int(row[0])

    # -- slice recalls -------------------------------------------------------------------------
    def recall_slices(self, scope: str, name: str, now_us: int) -> int:
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO slice_recalls (scope, name, at_us) VALUES (?, ?, ?)",
                (scope, name, now_us),
            )
            seq = int(cur.lastrowid or 0)
            c.execute("DELETE FROM slice_recalls WHERE seq <= ?", (seq - RECALLS_KEPT,))
        return seq

    def slice_recalls(self, after: int) -> tuple[int, list[SliceRecall]]:
        with self._tx(write=False) as c:
            # AUTOINCREMENT: sqlite_sequence holds the newest number even once its row is gone
            row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'slice_recalls'").fetchone()
            newest = 0 if row is None else int(row[0])
            if newest <= after:
                return newest, []
            rows = c.execute(
                "SELECT seq, scope, name, at_us FROM slice_recalls WHERE seq > ? ORDER BY seq",
                (after,),
            ).fetchall()
        return newest, [SliceRecall(int(q), str(sc), str(n), int(t)) for q, sc, n, t in rows]

    # -- API keys ------------------------------------------------------------------------------
    def put_api_key(self, record: KeyRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO api_keys (key_id, sha256, user_id, record) VALUES (?, ?, ?, ?)",
                (record.key_id, record.sha256, record.user_id, json.dumps(record.to_json())),
            )
            _bump_generation(c)

    def api_key(self, sha256: str) -> KeyRecord | None:
        with self._tx(write=False) as c:
            row = c.execute("SELECT record FROM api_keys WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else KeyRecord.from_json(json.loads(row[0]))

    def api_keys(self, user_id: str | None = None) -> list[KeyRecord]:
        query = "SELECT record FROM api_keys"
        args: tuple[str, ...] = ()
        if user_id is not None:
            query, args = query + " WHERE user_id = ?", (user_id,)
        with self._tx(write=False) as c:
            rows = c.execute(query, args).fetchall()
        keys = [KeyRecord.from_json(json.loads(r[0])) for r in rows]
        return sorted(keys, key=lambda k: (k.created_us, k.key_id))

    def expire_api_key(self, key_id: str, expires_us: int) -> KeyRecord | None:
        with self._tx() as c:
            row = c.execute("SELECT record FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            before = KeyRecord.from_json(json.loads(row[0]))
            if before.expires_us is None or expires_us < before.expires_us:
                after = dataclasses.replace(before, expires_us=expires_us)
                c.execute(
                    "UPDATE api_keys SET record = ? WHERE key_id = ?",
                    (json.dumps(after.to_json()), key_id),
                )
                _bump_generation(c)
            return before

    def revoke_api_key(self, key_id: str, now_us: int) -> KeyRecord | None:
        with self._tx() as c:
            row = c.execute("SELECT record FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                return None
            before = KeyRecord.from_json(json.loads(row[0]))
            if before.revoked_us is None:
                after = dataclasses.replace(before, revoked_us=now_us)
                c.execute(
                    "UPDATE api_keys SET record = ? WHERE key_id = ?",
                    (json.dumps(after.to_json()), key_id),
                )
                _bump_generation(c)
            return before
