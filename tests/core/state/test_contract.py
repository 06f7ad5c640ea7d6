"""State store contract (SQLite, Redis, memory), the factory, and fail-closed behaviour."""

from __future__ import annotations

import dataclasses
import socket
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.config import State
from candela_mitm.errors import StoreUnavailable
from candela_mitm.state import open_state_store
from candela_mitm.state.memory import MemoryStateStore
from candela_mitm.state.migrations import SCHEMA_VERSION
from candela_mitm.state.ports import (
    US_PER_S,
    ActiveReservation,
    AlertStore,
    DayTotals,
    GenerationStore,
    GrantRow,
    JobStore,
    KeyRecord,
    KeyStore,
    LedgerStore,
    NewReservation,
    RateStore,
    SliceRecallStore,
    StateStore,
    StoreUnreachable,
    TenantRecord,
    TenantStore,
    UserRecord,
    UserStore,
    WouldWait,
    day_of,
    from_us,
    key_admits,
    next_utc_midnight,
    plan_holds,
    plan_settle,
    rfc3339,
    tenant_admits,
    to_us,
    token_fits_at,
    usd_to_nano,
)
from candela_mitm.state.redis import RedisStateStore
from candela_mitm.state.sqlite import SqliteStateStore

T0 = datetime(2026, 5, 17, 12, 0, tzinfo=UTC)
T0_US = to_us(T0)


def alice(**changes: object) -> UserRecord:
    fields: dict[str, object] = {
        "user_id": "alice@example.com",
        "role": "developer",
        "tenants": ("research-team", "ops"),
        "daily_budget_usd": 20.0,
        "requests_per_minute": 120,
        **changes,
    }
    return UserRecord(**fields)  # type: ignore[arg-type]


def new_reservation(
    rid: str, amount: int, budget: int = 10_000, now_us: int = T0_US
) -> NewReservation:
    return NewReservation(rid, "u", "t", "2026-05-17", amount, budget, "req", "host:1", now_us)


# -- pure planning -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "daily_free", "grants", "expected"),
    [
        (5, 10, [], (5, {})),
        (10, 10, [], (10, {})),
        (11, 10, [], None),
        (12, 10, [("a", 1), ("b", 5)], (10, {"a": 1, "b": 1})),
        (3, 0, [("a", 2), ("b", 5)], (0, {"a": 2, "b": 1})),
        # today's overspend eats into the grants: 6 spendable, not 8
        (7, -2, [("a", 8)], None),
        (6, -2, [("a", 8)], (0, {"a": 6})),
        (2, 5, [("a", -1), ("b", 3)], (2, {})),  # a grant overdrawn by holds gives nothing
        (0, -100, [], (0, {})),  # nothing costs nothing, whatever the state
    ],
)
def test_plan_holds(
    amount: int,
    daily_free: int,
    grants: list[tuple[str, int]],
    expected: tuple[int, dict[str, int]] | None,
) -> None:
    assert plan_holds(amount, daily_free, grants) == expected


@pytest.mark.parametrize(
    ("cost", "daily_free", "grants", "expected"),
    [
        (4, 10, [("a", 5)], (4, {})),
        (13, 10, [("a", 5)], (10, {"a": 3})),
        (20, 10, [("a", 5), ("b", 2)], (13, {"a": 5, "b": 2})),  # the rest overdraws the day
        (3, -1, [("a", 5)], (0, {"a": 3})),
        (0, 10, [("a", 5)], (0, {})),
    ],
)
def test_plan_settle(
    cost: int, daily_free: int, grants: list[tuple[str, int]], expected: tuple[int, dict[str, int]]
) -> None:
    assert plan_settle(cost, daily_free, grants) == expected


# -- users -------------------------------------------------------------------------------------


def test_users_crud(store: StateStore) -> None:
    assert store.get_user("alice@example.com") is None
    assert store.list_users() == []

    store.put_user(alice(updated_at=T0))
    got = store.get_user("alice@example.com")
    assert got == alice(updated_at=T0)
    assert got is not None and got.tenants == ("research-team", "ops")

    store.put_user(alice(daily_budget_usd=5.5, requests_per_minute=None, role="admin"))
    store.put_user(UserRecord("bob@example.com"))
    assert [u.user_id for u in store.list_users()] == ["alice@example.com", "bob@example.com"]
    changed = store.get_user("alice@example.com")
    assert changed is not None
    assert (changed.daily_budget_usd, changed.requests_per_minute, changed.role) == (
        5.5,
        None,
        "admin",
    )

    assert store.delete_user("alice@example.com", T0_US) is True
    assert store.delete_user("alice@example.com", T0_US) is False  # already gone
    assert store.delete_user("nobody@example.com", T0_US) is False
    assert store.get_user("alice@example.com") is None
    deleted = store.get_user("alice@example.com", include_deleted=True)
    assert deleted is not None and deleted.deleted and deleted.deleted_at == T0
    assert [u.user_id for u in store.list_users()] == ["bob@example.com"]
    assert [u.user_id for u in store.list_users(include_deleted=True)] == [
        "alice@example.com",
        "bob@example.com",
    ]

    store.put_user(alice())  # the admin API creating the user again revives it
    revived = store.get_user("alice@example.com")
    assert revived is not None and not revived.deleted and revived.deleted_at is None


def test_users_are_shared_between_clients(backend: Any) -> None:
    a, b = backend.open(), backend.open()
    a.put_user(alice())
    assert b.get_user("alice@example.com") == alice()


def test_every_change_to_users_tenants_grants_and_keys_counts_one_generation(
    store: StateStore,
) -> None:
    key = KeyRecord("k_a", "a" * 64, "u", "", "admin", T0_US, expires_us=T0_US + 100)
    changes: list[tuple[str, Any, int]] = [
        ("put_user", lambda: store.put_user(alice()), 1),
        ("put_user again", lambda: store.put_user(alice(daily_budget_usd=1.0)), 1),
        ("delete_user", lambda: store.delete_user("alice@example.com", T0_US), 1),
        ("delete_user of nobody", lambda: store.delete_user("alice@example.com", T0_US), 0),
        ("put_tenant", lambda: store.put_tenant(TenantRecord("t1", budget_usd=3.0)), 1),
        (
            "add_grant",
            lambda: store.add_grant(GrantRow("g1", "u", 1, 0, 0, T0_US + 1, "r", "a", T0_US)),
            1,
        ),
        ("put_api_key", lambda: store.put_api_key(key), 1),
        ("expire_api_key", lambda: store.expire_api_key("k_a", T0_US + 50), 1),
        ("expire_api_key later", lambda: store.expire_api_key("k_a", T0_US + 90), 0),
        ("revoke_api_key", lambda: store.revoke_api_key("k_a", T0_US + 2), 1),
        ("revoke_api_key again", lambda: store.revoke_api_key("k_a", T0_US + 3), 0),
        ("revoke_api_key of none", lambda: store.revoke_api_key("k_zz", T0_US + 3), 0),
    ]
    assert store.settings_generation() == 0
    for name, change, counts in changes:
        before = store.settings_generation()
        change()
        assert store.settings_generation() - before == counts, name
    # what a request writes is not a settings change
    before = store.settings_generation()
    store.rate_hit("u", 10, 60 * US_PER_S, T0_US)
    store.reserve(new_reservation("r1", 5))
    assert store.settings_generation() == before


def test_the_settings_generation_is_shared_between_clients(backend: Any) -> None:
    a, b = backend.open(), backend.open()
    seen = b.settings_generation()
    a.put_tenant(TenantRecord("t1", budget_usd=3.0))
    assert b.settings_generation() == seen + 1


# -- ledger primitives -------------------------------------------------------------------------


def test_reserve_settle_release_totals(store: StateStore) -> None:
    ok = store.reserve(new_reservation("r1", 4_000))
    assert ok.ok and ok.daily_hold == 4_000 and ok.grant_holds == {}
    assert store.day_totals("u", "2026-05-17").reserved == 4_000
    assert [a.reservation_id for a in store.active_reservations()] == ["r1"]
    assert store.active_reservations()[0].owner == "host:1"
    assert store.active_reservations()[0].created_us == T0_US

    refused = store.reserve(new_reservation("r2", 6_001))
    assert not refused.ok
    assert (refused.spent, refused.reserved, refused.grants_free) == (0, 4_000, 0)

    settled = store.settle("r1", 5_000, 10, 20, "gpt-4o", "openai", T0_US + 1)
    assert settled.applied and settled.from_allowance == 5_000
    totals = store.day_totals("u", "2026-05-17")
    assert (totals.spent, totals.from_grants, totals.reserved) == (5_000, 0, 0)
    assert store.active_reservations() == []
    assert not store.settle("r1", 5_000, 10, 20, "gpt-4o", "openai", T0_US + 2).applied
    assert not store.release("r1", T0_US + 2)
    assert not store.settle("missing", 1, 0, 0, "m", "p", T0_US).applied
    assert not store.release("missing", T0_US)

    assert store.reserve(new_reservation("r3", 5_000)).ok
    assert store.release("r3", T0_US + 3)
    assert not store.release("r3", T0_US + 4)
    assert store.day_totals("u", "2026-05-17").reserved == 0

    rows = store.spend_rows()
    assert [(r.day, r.user_id, r.tenant, r.model, r.provider) for r in rows] == [
        ("2026-05-17", "u", "t", "gpt-4o", "openai")
    ]
    assert (rows[0].cost, rows[0].tokens_in, rows[0].tokens_out, rows[0].requests) == (
        5_000,
        10,
        20,
        1,
    )


def test_grants_round_trip(store: StateStore) -> None:
    later = GrantRow("g2", "u", 500, 0, 0, T0_US + 7_200_000_000, "late", "admin@x", T0_US)
    sooner = GrantRow("g1", "u", 300, 0, 0, T0_US + 3_600_000_000, "soon", "admin@x", T0_US)
    store.add_grant(later)
    store.add_grant(sooner)
    store.add_grant(GrantRow("g3", "other", 1, 0, 0, T0_US + 1, "x", "y", T0_US))
    assert store.grants("u") == [sooner, later]
    assert store.grants("nobody") == []


def test_active_reservations_say_what_a_settle_without_their_owner_needs(
    store: StateStore,
) -> None:
    new = NewReservation(
        "r1", "u", "t", "2026-05-17", 4_000, 10_000, "span-1", "host:1", T0_US,
        model="gpt-4o", provider="openai",
    )
    assert store.reserve(new).ok
    assert store.reserve(new_reservation("r2", 1_000, now_us=T0_US + 1)).ok
    assert store.active_reservations() == [
        ActiveReservation(
            "r1", "host:1", T0_US, "u", "t", "2026-05-17", 4_000, "span-1", "gpt-4o", "openai"
        ),
        ActiveReservation("r2", "host:1", T0_US + 1, "u", "t", "2026-05-17", 1_000, "req", "", ""),
    ]
    # settled at its own amount under its own model: the spend row a crash leaves
    assert store.settle("r1", 4_000, 0, 0, "gpt-4o", "openai", T0_US + 2).applied
    (row,) = store.spend_rows()
    assert (row.model, row.provider, row.cost, row.requests) == ("gpt-4o", "openai", 4_000, 1)
    assert store.day_totals("u", "2026-05-17").reserved == 1_000


def test_reclaimed_reservation_still_settles(store: StateStore) -> None:
    assert store.reserve(new_reservation("r1", 4_000)).ok
    assert store.release("r1", T0_US + 1, reclaim=True)
    assert store.day_totals("u", "2026-05-17").reserved == 0
    assert not store.release("r1", T0_US + 2)  # not twice
    settled = store.settle("r1", 3_000, 1, 1, "m", "p", T0_US + 3)
    assert settled.applied and settled.cost == 3_000
    assert store.day_totals("u", "2026-05-17") == type(store.day_totals("u", "x"))(3_000, 0, 0)
    assert not store.settle("r1", 3_000, 1, 1, "m", "p", T0_US + 4).applied


def test_purge_finished(store: StateStore) -> None:
    for rid in ("old", "new", "open"):
        assert store.reserve(new_reservation(rid, 1)).ok
    store.settle("old", 1, 0, 0, "m", "p", T0_US + 10)
    store.release("new", T0_US + 20)
    assert store.purge_finished(T0_US + 15) == 1
    # a purged reservation is forgotten: settling it again does nothing
    assert not store.settle("old", 1, 0, 0, "m", "p", T0_US + 30).applied
    assert [a.reservation_id for a in store.active_reservations()] == ["open"]
    assert store.purge_finished(T0_US + 100) == 1  # "new"; "open" is still active


def test_spend_rows_filters(store: StateStore) -> None:
    for i, (user, tenant, day) in enumerate(
        [("u", "t1", "2026-05-15"), ("u", "t2", "2026-05-16"), ("v", "t1", "2026-05-17")]
    ):
        when = to_us(datetime.fromisoformat(day + "T10:00:00+00:00"))
        new = NewReservation(f"r{i}", user, tenant, day, 1, 100, "q", "o", when)
        assert store.reserve(new).ok
        store.settle(f"r{i}", 10 * (i + 1), 1, 2, "m", "p", when)
    assert [r.cost for r in store.spend_rows()] == [10, 20, 30]
    assert [r.cost for r in store.spend_rows(since_day="2026-05-16")] == [20, 30]
    assert [r.cost for r in store.spend_rows(until_day="2026-05-16")] == [10, 20]
    assert [r.cost for r in store.spend_rows("2026-05-16", "2026-05-16")] == [20]
    assert [r.cost for r in store.spend_rows(user_id="u")] == [10, 20]
    assert [r.cost for r in store.spend_rows(tenant="t1")] == [10, 30]
    assert store.spend_rows(user_id="nobody") == []


def test_rate_hit_sliding_log(store: StateStore) -> None:
    window = 60_000_000
    assert [store.rate_hit("k", 2, window, T0_US + i).allowed for i in range(3)] == [
        True,
        True,
        False,
    ]
    denied = store.rate_hit("k", 2, window, T0_US + 10)
    assert (denied.allowed, denied.count, denied.oldest_us) == (False, 2, T0_US)
    assert store.rate_hit("other", 2, window, T0_US + 10).allowed  # keys are apart
    # the first entry leaves the window exactly `window` after it was counted
    assert not store.rate_hit("k", 2, window, T0_US + window - 1).allowed
    hit = store.rate_hit("k", 2, window, T0_US + window)
    assert (hit.allowed, hit.count, hit.oldest_us) == (True, 2, T0_US + 1)


# -- factory and failures ----------------------------------------------------------------------


def test_open_state_store_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "state.db"
    with open_state_store(State(sqlite_path=str(path), busy_timeout_ms=500)) as store:
        assert isinstance(store, SqliteStateStore)
        store.ping()
    assert path.exists()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_state_store_redis(redis_url: str) -> None:
    with open_state_store(State(backend="redis", redis_url=redis_url)) as store:
        assert isinstance(store, RedisStateStore)
        store.ping()


def test_sqlite_connection_per_thread_sees_the_same_data(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    store.put_user(alice())
    seen: list[UserRecord | None] = []
    t = threading.Thread(target=lambda: seen.append(store.get_user("alice@example.com")))
    t.start()
    t.join()
    assert seen == [alice()]
    store.close()
    with pytest.raises(StoreUnavailable):
        store.get_user("alice@example.com")


def test_sqlite_unusable_paths(tmp_path: Path) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="plain-file"):
        SqliteStateStore(a_file / "state.db")
    with pytest.raises(StoreUnavailable):
        SqliteStateStore(tmp_path)  # a directory, not a database file
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(StoreUnavailable, match="not a database"):
        SqliteStateStore(garbage)


def test_sqlite_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SqliteStateStore(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreUnavailable, match="schema 99"):
        SqliteStateStore(path)


def test_sqlite_locked_past_busy_timeout_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteStateStore(path, busy_timeout_ms=150)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        for op in (
            lambda: store.reserve(new_reservation("r1", 1)),
            lambda: store.rate_hit("k", 5, 60_000_000, T0_US),
            lambda: store.put_user(alice()),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="locked"):
                op()
            assert 0.1 <= time.monotonic() - started < 2.0
        # readers are not blocked by a writer under WAL
        assert store.get_user("alice@example.com") is None
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.reserve(new_reservation("r1", 1)).ok  # usable again once the lock is gone
    store.close()


def test_redis_unreachable_at_open() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = State(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0", busy_timeout_ms=500)
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        open_state_store(cfg)
    with pytest.raises(StoreUnavailable) as raised:
        RedisStateStore(f"redis://user:s3cret@127.0.0.1:{port}/0", timeout_ms=500)
    assert "s3cret" not in str(raised.value)


def test_redis_down_fails_closed(redis_server_factory: Any) -> None:
    server = redis_server_factory()
    store = RedisStateStore(server.url, timeout_ms=500)
    store.put_user(alice())
    assert store.reserve(new_reservation("r1", 1)).ok
    server.stop()
    for op in (
        lambda: store.get_user("alice@example.com"),
        lambda: store.reserve(new_reservation("r2", 1)),
        lambda: store.settle("r1", 1, 0, 0, "m", "p", T0_US),
        lambda: store.release("r1", T0_US),
        lambda: store.rate_hit("k", 5, 60_000_000, T0_US),
        lambda: store.spend_rows(),
        store.ping,
    ):
        started = time.monotonic()
        # unreachable, not an error it answered: a turn's calls after it fail at once (calls.py)
        with pytest.raises(StoreUnreachable):
            op()
        assert time.monotonic() - started < 2.0


def test_state_store_is_the_narrow_ports_and_each_operation_has_one() -> None:
    ports = [
        UserStore, TenantStore, LedgerStore, KeyStore, JobStore, RateStore, AlertStore,
        GenerationStore, SliceRecallStore,
    ]
    assert all(port in StateStore.__mro__ for port in ports)
    owners = {
        name: [port.__name__ for port in ports if name in port.__abstractmethods__]
        for name in StateStore.__abstractmethods__
    }
    lifecycle = {"ping", "close"}
    assert {name for name, found in owners.items() if not found} == lifecycle
    assert {name: found for name, found in owners.items() if len(found) > 1} == {}
    for backend in (SqliteStateStore, RedisStateStore, MemoryStateStore):
        assert not backend.__abstractmethods__, backend


def test_time_and_money_helpers() -> None:
    assert from_us(to_us(T0)) == T0
    assert to_us(datetime(1970, 1, 1, 0, 0, 1)) == 1_000_000  # naive means UTC
    assert rfc3339(datetime(2026, 5, 17, 23, 59, 59, 999_999)) == "2026-05-17T23:59:59Z"
    east = timezone(timedelta(hours=2))
    assert day_of(datetime(2026, 5, 18, 1, 0, tzinfo=east)) == "2026-05-17"
    assert next_utc_midnight(datetime(2026, 12, 31, 23, 0, tzinfo=UTC)) == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    assert sum(usd_to_nano(0.1) for _ in range(7)) == usd_to_nano(0.7)


def test_user_record_tenants_are_a_tuple() -> None:
    assert UserRecord("u", tenants=["a", "b"]).tenants == ("a", "b")  # type: ignore[arg-type]


# issue 7: writers queue on the store's gate (a lock, and an flock for other processes) instead
# of SQLite's busy handler, which sleeps in 1-100 ms steps
def test_sqlite_writers_of_another_process_queue_on_the_gate(tmp_path: Path) -> None:
    import fcntl
    import os

    path = tmp_path / "s.db"
    store = SqliteStateStore(path, busy_timeout_ms=150)
    other = os.open(f"{path}.lock", os.O_RDWR)  # another worker, in the middle of a write
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            store.rate_hit("k", 5, 60_000_000, T0_US)
        assert 0.1 <= time.monotonic() - started < 2.0
        assert store.get_user("alice@example.com") is None  # readers do not queue
        threading.Timer(0.05, fcntl.flock, (other, fcntl.LOCK_UN)).start()
        assert store.rate_hit("k", 5, 60_000_000, T0_US).allowed  # served once it is free
    finally:
        os.close(other)
        store.close()


def test_sqlite_threads_write_one_at_a_time(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db", busy_timeout_ms=2000)
    errors: list[BaseException] = []

    def hit(i: int) -> None:
        try:
            for _ in range(50):
                store.rate_hit(f"user{i}", 1000, 60_000_000, T0_US)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.rate_hit("user0", 1000, 60_000_000, T0_US).count == 51
    store.close()


# -- issue 7: one transaction for several calls, and calls that never wait (the event loop's) ---


def _counts(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as raw:
        (rates,) = raw.execute("SELECT count(*) FROM rate_log").fetchone()
        (reservations,) = raw.execute("SELECT count(*) FROM reservations").fetchone()
    return rates, reservations


def test_batch_is_one_transaction(store: StateStore) -> None:
    with store.batch():
        assert store.rate_hit("k", 5, 60_000_000, T0_US).allowed
        assert store.reserve(new_reservation("r1", 10)).ok
    assert store.day_totals("u", "2026-05-17").reserved == 10
    assert store.rate_hit("k", 2, 60_000_000, T0_US).count == 2


def test_sqlite_batch_rolls_back_whole(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    with pytest.raises(RuntimeError, match="boom"):
        with store.batch():
            store.rate_hit("k", 5, 60_000_000, T0_US)
            store.reserve(new_reservation("r1", 10))
            raise RuntimeError("boom")
    assert _counts(store.path) == (0, 0)
    with store.batch(), store.batch():  # nested: still one transaction
        store.rate_hit("k", 5, 60_000_000, T0_US)
    assert _counts(store.path) == (1, 0)
    store.close()


def test_redis_never_runs_without_waiting(backend: Any) -> None:
    store = backend.open()
    calls: list[int] = []
    if isinstance(store, RedisStateStore):
        with pytest.raises(WouldWait):
            store.call_without_waiting(calls.append, 1)
        assert calls == []  # refused before anything ran
    else:
        assert store.call_without_waiting(lambda: store.rate_hit("k", 5, 60_000_000, T0_US)).allowed


def test_sqlite_call_without_waiting_runs_here_when_free(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")

    def both() -> tuple[bool, bool]:
        with store.batch():
            return store.rate_hit("k", 5, 60_000_000, T0_US).allowed, store.reserve(
                new_reservation("r1", 10)
            ).ok

    assert store.call_without_waiting(both) == (True, True)
    assert _counts(store.path) == (1, 1)
    assert store.call_without_waiting(store.get_user, "nobody") is None
    store.close()


@pytest.mark.parametrize("holder", ["thread", "worker", "other_tool"])
def test_sqlite_call_without_waiting_refuses_a_held_lock(tmp_path: Path, holder: str) -> None:
    """Another thread (the pool), another worker (flock) or another program (SQLite's own lock)
    writing: WouldWait at once, nothing changed; run where waiting is allowed it succeeds."""
    import fcntl
    import os

    path = tmp_path / "s.db"
    store = SqliteStateStore(path, busy_timeout_ms=60_000)  # a wait would outlast the test
    release = threading.Event()
    inside = threading.Event()
    undo: Any = None
    if holder == "thread":

        def hold() -> None:
            with store.batch():
                inside.set()
                release.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        assert inside.wait(5)
        undo = lambda: (release.set(), t.join())  # noqa: E731
    elif holder == "worker":
        fd = os.open(f"{path}.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        undo = lambda: os.close(fd)  # noqa: E731
    else:
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        undo = lambda: (raw.execute("ROLLBACK"), raw.close())  # noqa: E731
    try:
        with pytest.raises(WouldWait):
            store.call_without_waiting(store.rate_hit, "k", 5, 60_000_000, T0_US)
        with pytest.raises(WouldWait):
            store.call_without_waiting(store.reserve, new_reservation("r1", 10))
        # a call that swallows the refusal is still refused: its answer was not the store's
        def swallow() -> str:
            try:
                store.rate_hit("k", 5, 60_000_000, T0_US)
            except WouldWait:
                return "pretend"
            return "stored"

        with pytest.raises(WouldWait):
            store.call_without_waiting(swallow)
        assert store.get_user("nobody") is None  # reads do not wait for a writer (WAL)
    finally:
        undo()
    assert _counts(path) == (0, 0)
    assert store.call_without_waiting(store.rate_hit, "k", 5, 60_000_000, T0_US).allowed
    assert _counts(path) == (1, 0)
    store.close()


def test_sqlite_errors_still_fail_closed_without_waiting(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.call_without_waiting(store.rate_hit, "k", 5, 60_000_000, T0_US)
    other = SqliteStateStore(tmp_path / "t.db")
    with pytest.raises(RuntimeError, match="nest"):
        other.call_without_waiting(other.call_without_waiting, other.ping)
    other.close()


def test_sqlite_checkpoints_off_the_calling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections that never wait never checkpoint the WAL themselves (a checkpoint may
    fsync): every CHECKPOINT_EVERY commits the checkpointer thread does it."""
    import candela_mitm.state.sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_EVERY", 5)
    store = SqliteStateStore(tmp_path / "s.db")
    ran: list[str] = []
    done = threading.Event()
    real = store.checkpoint

    def spy() -> None:
        ran.append(threading.current_thread().name)
        real()
        done.set()

    monkeypatch.setattr(store, "checkpoint", spy)
    for i in range(4):
        store.call_without_waiting(store.rate_hit, f"k{i}", 5, 60_000_000, T0_US)
    assert ran == []
    store.call_without_waiting(store.rate_hit, "k4", 5, 60_000_000, T0_US)
    assert done.wait(5)
    assert ran == ["candela-state-checkpoint"]
    with sqlite3.connect(store.path) as raw:  # every frame is back in the database file
        busy, frames, copied = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == copied
    store.close()


def test_sqlite_rate_count_matches_the_log(tmp_path: Path) -> None:
    """rate_count (the running count a check reads instead of counting the window) stays equal
    to the log through admits, refusals and entries leaving the window."""
    store = SqliteStateStore(tmp_path / "s.db")
    window = 10_000_000
    answers = []
    for i in range(40):  # 4 requests a second for 10 s against a limit of 25 per 10 s window
        hit = store.rate_hit("u", 25, window, T0_US + i * 250_000)
        answers.append(hit.allowed)
        with sqlite3.connect(store.path) as raw:
            (logged,) = raw.execute("SELECT count(*) FROM rate_log WHERE key = 'u'").fetchone()
            counted = raw.execute("SELECT n FROM rate_count WHERE key = 'u'").fetchone()
        assert hit.count == logged == counted[0]
    assert answers == [True] * 25 + [False] * 15
    # the window moves on: the first entries leave, the next requests are admitted again
    later = store.rate_hit("u", 25, window, T0_US + window + 1)
    assert later.allowed and later.count == 25 and later.oldest_us == T0_US + 250_000
    store.close()


def test_sqlite_schema_1_store_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as raw:  # what Candela with schema 1 left behind
        raw.execute("CREATE TABLE rate_log (key TEXT NOT NULL, ts INTEGER NOT NULL)")
        raw.executemany("INSERT INTO rate_log VALUES (?, ?)", [("a", T0_US + i) for i in range(3)])
        raw.execute("PRAGMA user_version = 1")
    store = SqliteStateStore(path)
    hit = store.rate_hit("a", 4, 60_000_000, T0_US + 10)
    assert hit.allowed and hit.count == 4
    assert not store.rate_hit("a", 4, 60_000_000, T0_US + 11).allowed
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    store.close()


def test_sqlite_schema_2_reservations_gain_model_and_provider(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as raw:  # what Candela with schema 2 left behind: one open hold
        raw.execute(
            "CREATE TABLE reservations (reservation_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
            "tenant TEXT NOT NULL, day TEXT NOT NULL, amount INTEGER NOT NULL, budget INTEGER "
            "NOT NULL, daily_hold INTEGER NOT NULL, grant_holds TEXT NOT NULL, request_id TEXT "
            "NOT NULL, owner TEXT NOT NULL, created_us INTEGER NOT NULL, status TEXT NOT NULL, "
            "cost INTEGER, finished_us INTEGER)"
        )
        raw.execute(
            "INSERT INTO reservations VALUES ('old', 'u', 't', '2026-05-17', 7, 10, 0, '{}', "
            "'req', 'host:1', ?, 'active', NULL, NULL)",
            (T0_US,),
        )
        raw.execute("PRAGMA user_version = 2")
    store = SqliteStateStore(path)
    (old,) = store.active_reservations()
    assert (old.reservation_id, old.amount, old.model, old.provider) == ("old", 7, "", "")
    assert store.settle("old", 7, 0, 0, old.model, old.provider, T0_US + 1).applied
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    store.close()


def test_sqlite_savepoint_undoes_one_call_of_a_batch(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    with store.batch():
        store.rate_hit("a", 5, 60_000_000, T0_US)
        with pytest.raises(ValueError):
            with store.savepoint():
                store.reserve(new_reservation("r1", 10))
                raise ValueError("undo me")
        with store.savepoint():
            store.reserve(new_reservation("r2", 10))
    assert _counts(store.path) == (1, 1)
    with pytest.raises(RuntimeError, match="inside batch"):
        with store.savepoint():
            pass
    store.close()


def test_run_calls_outcomes(tmp_path: Path) -> None:
    from candela_mitm.state.ports import run_calls

    store = SqliteStateStore(tmp_path / "s.db")

    def fails() -> None:
        store.rate_hit("x", 5, 60_000_000, T0_US)
        raise KeyError("no")

    out = run_calls(store, [(store.rate_hit, ("a", 5, 60_000_000, T0_US)), (fails, ()),
                            (store.get_user, ("nobody",))])
    assert [ok for ok, _ in out] == [True, False, True]
    assert out[0][1].count == 1 and isinstance(out[1][1], KeyError) and out[2][1] is None
    assert _counts(store.path) == (1, 0)
    store.close()


def test_run_calls_one_call_is_its_own_transaction(tmp_path: Path) -> None:
    """A lone call runs without a savepoint: its failure rolls the transaction back, the same
    outcome as the savepoint gives it among others; a nested run keeps the savepoints."""
    from candela_mitm.state.ports import run_calls

    store = SqliteStateStore(tmp_path / "s.db")
    statements: list[str] = []

    def fails() -> None:
        store.rate_hit("x", 5, 60_000_000, T0_US)
        raise KeyError("no")

    conn = store._conn()  # the connection batch() uses on this thread
    conn.set_trace_callback(statements.append)
    [(ok, hit)] = run_calls(store, [(store.rate_hit, ("a", 5, 60_000_000, T0_US))])
    assert ok and hit.count == 1
    assert statements[0].startswith("BEGIN") and statements[-1] == "COMMIT"
    assert not any("SAVEPOINT" in s for s in statements)
    statements.clear()
    run_calls(
        store, [(store.get_user, ("nobody",)), (store.rate_hit, ("b", 5, 60_000_000, T0_US))]
    )
    assert sum("SAVEPOINT" in s for s in statements) == 2  # two calls: one savepoint each
    statements.clear()
    # reads alone: each its own read transaction, no write lock, no savepoint
    run_calls(store, [(store.get_user, ("nobody",)), (store.api_key, ("ab" * 32,))])
    assert statements.count("BEGIN") == 2 and statements.count("COMMIT") == 2
    assert not any("IMMEDIATE" in s or "SAVEPOINT" in s for s in statements)
    conn.set_trace_callback(None)
    [(ok, err)] = run_calls(store, [(fails, ())])
    assert not ok and isinstance(err, KeyError)
    assert _counts(store.path) == (2, 0)  # a's and b's; x's rolled back with the call

    # sqlite errors inside the call come back as StoreUnavailable, as from a savepoint
    def broken() -> None:
        store._local.batch.execute("SELECT * FROM no_such_table")

    [(ok, err)] = run_calls(store, [(broken, ())])
    assert not ok and isinstance(err, StoreUnavailable)
    # nested in a batch: the lone call keeps its savepoint, the outer work stays
    with store.batch():
        store.rate_hit("b", 5, 60_000_000, T0_US)
        [(ok, err)] = run_calls(store, [(fails, ())])
        assert not ok
    assert _counts(store.path) == (3, 0)  # b's second hit stays, x's again undone
    store.close()


# -- tenant budgets: one table through the Python rule and through both stores' reserve ------

# tenant budget (None: none), spent on the row, held on the row, amount, admitted
TENANT_TABLE = [
    pytest.param(None, 0, 0, 10**12, True, id="no-budget-admits-anything"),
    pytest.param(100, 0, 0, 100, True, id="fits-exactly"),
    pytest.param(100, 0, 0, 101, False, id="one-over"),
    pytest.param(100, 60, 0, 40, True, id="spend-counts"),
    pytest.param(100, 60, 0, 41, False, id="spend-counts-over"),
    pytest.param(100, 30, 30, 40, True, id="holds-count"),
    pytest.param(100, 30, 30, 41, False, id="holds-count-over"),
    pytest.param(100, 150, 0, 0, True, id="zero-always-passes"),
    pytest.param(100, 150, 0, 1, False, id="overspent"),
    pytest.param(0, 0, 0, 1, False, id="zero-budget"),
]


@pytest.mark.parametrize(("budget", "spent", "held", "amount", "ok"), TENANT_TABLE)
def test_tenant_admits(budget: int | None, spent: int, held: int, amount: int, ok: bool) -> None:
    assert tenant_admits(amount, budget, spent, held) is ok


def tenant_reservation(
    rid: str, amount: int, tenant_budget: int | None, user_budget: int = 10**13
) -> NewReservation:
    return NewReservation(
        rid, "u", "t", "2026-05-17", amount, user_budget, "req", "host:1", T0_US,
        period="monthly:2026-05-01", tenant_budget=tenant_budget, tenant_period="monthly:2026-05-01",
    )


@pytest.mark.parametrize(("budget", "spent", "held", "amount", "ok"), TENANT_TABLE)
def test_stores_agree_with_tenant_admits(
    store: StateStore, budget: int | None, spent: int, held: int, amount: int, ok: bool
) -> None:
    if spent:  # spend on the row: a free reservation settled at that cost
        assert store.reserve(tenant_reservation("s", 0, None)).ok
        assert store.settle("s", spent, 0, 0, "m", "p", T0_US).applied
    if held:
        assert store.reserve(tenant_reservation("h", held, None)).ok
    result = store.reserve(tenant_reservation("r", amount, budget))
    assert result.ok is ok
    totals = store.tenant_totals("t", "monthly:2026-05-01")
    assert (result.tenant_spent, result.tenant_reserved) == (spent, held)
    if ok:
        assert result.tenant_hold == amount
        assert totals.reserved == held + amount
    else:
        assert result.scope == "tenant" and result.tenant_hold == 0
        assert totals.reserved == held  # a refusal holds nothing, on either row
        assert store.day_totals("u", "monthly:2026-05-01").reserved == held


def test_user_refusal_comes_first_and_names_the_user(store: StateStore) -> None:
    result = store.reserve(tenant_reservation("r", 50, 10, user_budget=20))
    assert not result.ok and result.scope == "user"
    assert store.tenant_totals("t", "monthly:2026-05-01").reserved == 0


def test_tenant_row_settles_and_releases(store: StateStore) -> None:
    assert store.reserve(tenant_reservation("a", 40, 100)).ok
    assert store.reserve(tenant_reservation("b", 30, 100)).ok
    assert store.tenant_totals("t", "monthly:2026-05-01") == DayTotals(0, 0, 70)
    assert store.settle("a", 55, 1, 1, "m", "p", T0_US + 1).applied  # over its estimate
    assert store.tenant_totals("t", "monthly:2026-05-01") == DayTotals(55, 0, 30)
    assert store.release("b", T0_US + 2)
    assert store.tenant_totals("t", "monthly:2026-05-01") == DayTotals(55, 0, 0)
    # the user's row is the period row too; spend history stays on the UTC day
    assert store.day_totals("u", "monthly:2026-05-01").spent == 55
    assert store.day_totals("u", "2026-05-17").spent == 0
    assert [r.cost for r in store.spend_rows("2026-05-17", "2026-05-17")] == [55]
    # repeats are no-ops on the tenant row too
    assert not store.settle("a", 55, 1, 1, "m", "p", T0_US + 3).applied
    assert not store.release("b", T0_US + 3)
    assert store.tenant_totals("t", "monthly:2026-05-01") == DayTotals(55, 0, 0)


def test_reclaimed_reservation_frees_its_tenant_hold_once(store: StateStore) -> None:
    assert store.reserve(tenant_reservation("a", 40, 100)).ok
    assert store.release("a", T0_US + 1, reclaim=True)
    assert store.tenant_totals("t", "monthly:2026-05-01") == DayTotals(0, 0, 0)
    assert store.settle("a", 40, 0, 0, "m", "p", T0_US + 2).applied
    assert store.tenant_totals("t", "monthly:2026-05-01") == DayTotals(40, 0, 0)


def test_no_tenant_named_touches_no_tenant_row(store: StateStore) -> None:
    new = NewReservation("r", "u", "", "2026-05-17", 5, 100, "req", "host:1", T0_US,
                         tenant_budget=1, tenant_period="daily:x")
    assert store.reserve(new).ok
    assert store.tenant_totals("", "daily:x") == DayTotals(0, 0, 0)


# -- API key budgets: the same rule (key_admits is tenant_admits), the same table, a row of its own

KP = "monthly:2026-05-01"


def key_reservation(
    rid: str, amount: int, key_budget: int | None, user_budget: int = 10**13,
    tenant_budget: int | None = None, key_id: str = "k_a",
) -> NewReservation:
    return NewReservation(
        rid, "u", "t", "2026-05-17", amount, user_budget, "req", "host:1", T0_US,
        period=KP, tenant_budget=tenant_budget, tenant_period=KP,
        key_id=key_id, key_budget=key_budget, key_period=KP,
    )


@pytest.mark.parametrize(("budget", "spent", "held", "amount", "ok"), TENANT_TABLE)
def test_stores_agree_with_key_admits(
    store: StateStore, budget: int | None, spent: int, held: int, amount: int, ok: bool
) -> None:
    assert key_admits(amount, budget, spent, held) is ok
    if spent:  # spend on the key's row: a free reservation settled at that cost
        assert store.reserve(key_reservation("s", 0, None)).ok
        assert store.settle("s", spent, 0, 0, "m", "p", T0_US).applied
    if held:
        assert store.reserve(key_reservation("h", held, None)).ok
    result = store.reserve(key_reservation("r", amount, budget))
    assert result.ok is ok
    assert (result.key_spent, result.key_reserved) == (spent, held)
    totals = store.key_totals("k_a", KP)
    if ok:
        assert result.key_hold == amount
        assert totals.reserved == held + amount
    else:
        assert result.scope == "key" and result.key_hold == 0
        # a refusal holds nothing, on any row
        assert totals.reserved == held
        assert store.day_totals("u", KP).reserved == held
        assert store.tenant_totals("t", KP).reserved == held


def test_user_and_tenant_refuse_before_the_key(store: StateStore) -> None:
    user = store.reserve(key_reservation("r", 50, 10, user_budget=20))
    assert not user.ok and user.scope == "user"
    tenant = store.reserve(key_reservation("r", 50, 10, tenant_budget=20))
    assert not tenant.ok and tenant.scope == "tenant"
    assert store.key_totals("k_a", KP) == DayTotals(0, 0, 0)


def test_key_row_settles_and_releases_with_the_user_and_tenant_rows(store: StateStore) -> None:
    assert store.reserve(key_reservation("a", 40, 100)).ok
    assert store.reserve(key_reservation("b", 30, 100)).ok
    assert store.key_totals("k_a", KP) == DayTotals(0, 0, 70)
    assert store.settle("a", 55, 1, 1, "m", "p", T0_US + 1).applied  # over its estimate
    assert store.key_totals("k_a", KP) == DayTotals(55, 0, 30)
    assert store.tenant_totals("t", KP) == DayTotals(55, 0, 30)
    assert store.day_totals("u", KP).spent == 55
    assert store.release("b", T0_US + 2)
    assert store.key_totals("k_a", KP) == DayTotals(55, 0, 0)
    # repeats are no-ops on the key row too
    assert not store.settle("a", 55, 1, 1, "m", "p", T0_US + 3).applied
    assert not store.release("b", T0_US + 3)
    assert store.key_totals("k_a", KP) == DayTotals(55, 0, 0)
    # what is left: 45 fits, 46 does not
    assert not store.reserve(key_reservation("c", 46, 100)).ok
    assert store.reserve(key_reservation("d", 45, 100)).ok


def test_reclaimed_reservation_frees_its_key_hold_once(store: StateStore) -> None:
    assert store.reserve(key_reservation("a", 40, 100)).ok
    assert store.release("a", T0_US + 1, reclaim=True)
    assert store.key_totals("k_a", KP) == DayTotals(0, 0, 0)
    assert store.settle("a", 40, 0, 0, "m", "p", T0_US + 2).applied
    assert store.key_totals("k_a", KP) == DayTotals(40, 0, 0)


def test_key_rows_are_apart(store: StateStore) -> None:
    assert store.reserve(key_reservation("a", 60, 100, key_id="k_a")).ok
    assert store.reserve(key_reservation("b", 60, 100, key_id="k_b")).ok  # its own row
    assert store.key_totals("k_b", KP) == DayTotals(0, 0, 60)
    # no key named: no key row touched, whatever budget is passed
    new = NewReservation("n", "u", "", "2026-05-17", 5, 100, "req", "host:1", T0_US,
                         key_budget=1, key_period=KP)
    assert store.reserve(new).ok
    assert store.key_totals("", KP) == DayTotals(0, 0, 0)


def test_a_key_row_is_read_without_a_tenant_and_a_tenant_row_without_a_key(
    store: StateStore,
) -> None:
    """Reserve reads the user's, tenant's and key's rows together (SQLite: one statement): a
    row not named reads as nothing, and the one named is still read and held on."""
    keyed = NewReservation("a", "u", "", "2026-05-17", 60, 10**13, "req", "host:1", T0_US,
                           period=KP, key_id="k_a", key_budget=100, key_period=KP)
    assert store.reserve(keyed).ok
    again = store.reserve(dataclasses.replace(keyed, reservation_id="b"))
    assert not again.ok and again.scope == "key" and again.key_reserved == 60
    assert (again.tenant_spent, again.tenant_reserved) == (0, 0)
    tenanted = NewReservation("c", "u2", "t", "2026-05-17", 60, 10**13, "req", "host:1", T0_US,
                              period=KP, tenant_budget=100, tenant_period=KP)
    assert store.reserve(tenanted).ok
    refused = store.reserve(dataclasses.replace(tenanted, reservation_id="d"))
    assert not refused.ok and refused.scope == "tenant" and refused.tenant_reserved == 60
    assert (refused.key_spent, refused.key_reserved) == (0, 0)
    assert store.key_totals("k_a", KP) == DayTotals(0, 0, 60)
    assert store.tenant_totals("t", KP) == DayTotals(0, 0, 60)
    assert store.tenant_totals("", KP) == DayTotals(0, 0, 0)


def test_api_keys_keep_their_budget_and_lineage(store: StateStore) -> None:
    from candela_mitm.state.ports import KeyRecord

    first = KeyRecord("k_a", "a" * 64, "u", "", "admin", T0_US, budget_usd=2.5)
    rotated = KeyRecord("k_b", "b" * 64, "u", "", "admin", T0_US + 1, budget_usd=2.5,
                        lineage="k_a")
    store.put_api_key(first)
    store.put_api_key(rotated)
    assert store.api_key("a" * 64) == first and store.api_key("b" * 64) == rotated
    assert [k.budget_id for k in store.api_keys("u")] == ["k_a", "k_a"]
    assert store.revoke_api_key("k_b", T0_US + 2) == rotated
    assert store.api_key("b" * 64).budget_usd == 2.5  # type: ignore[union-attr]


def test_tenants_crud(store: StateStore) -> None:
    assert store.get_tenant("t") is None and store.list_tenants() == []
    rec = TenantRecord("t", 12.5, "monthly", datetime(2026, 5, 17, tzinfo=UTC))
    store.put_tenant(rec)
    store.put_tenant(TenantRecord("a", None, None))
    assert store.get_tenant("t") == rec
    assert [t.tenant_id for t in store.list_tenants()] == ["a", "t"]
    store.put_tenant(TenantRecord("t", 20.0, None))
    assert store.get_tenant("t") == TenantRecord("t", 20.0, None)


def test_sqlite_schema_3_reservations_gain_their_periods(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteStateStore(path)
    store.close()
    with sqlite3.connect(path) as raw:  # a store as schema 3 left it: no period columns
        raw.execute("DROP TABLE _sqlite_migrations")  # nor named steps (they came after 7)
        raw.execute("DROP TABLE reservations")
        raw.execute(
            "CREATE TABLE reservations (reservation_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
            "tenant TEXT NOT NULL, day TEXT NOT NULL, amount INTEGER NOT NULL, budget INTEGER "
            "NOT NULL, daily_hold INTEGER NOT NULL, grant_holds TEXT NOT NULL, request_id TEXT "
            "NOT NULL, owner TEXT NOT NULL, created_us INTEGER NOT NULL, status TEXT NOT NULL, "
            "cost INTEGER, finished_us INTEGER, model TEXT NOT NULL DEFAULT '', "
            "provider TEXT NOT NULL DEFAULT '')"
        )
        raw.execute("INSERT INTO days VALUES ('u', '2026-05-17', 0, 0, 7)")
        raw.execute(
            "INSERT INTO reservations VALUES ('old', 'u', 't', '2026-05-17', 7, 10, 7, '{}', "
            "'req', 'host:1', ?, 'active', NULL, NULL, 'm', 'p')",
            (T0_US,),
        )
        raw.execute("PRAGMA user_version = 3")
    store = SqliteStateStore(path)
    assert store.settle("old", 7, 0, 0, "m", "p", T0_US + 1).applied
    assert store.day_totals("u", "2026-05-17") == DayTotals(7, 0, 0)  # its day row
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    store.close()


def test_sqlite_schema_7_reservations_gain_their_key_row(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SqliteStateStore(path).close()
    with sqlite3.connect(path) as raw:  # a store as schema 7 left it: no key columns
        for column in ("key_id", "key_period", "key_hold"):
            raw.execute(f"ALTER TABLE reservations DROP COLUMN {column}")
        raw.execute("DROP TABLE key_periods")
        raw.execute("DELETE FROM _sqlite_migrations WHERE name = '009_api_key_budgets'")
        raw.execute("PRAGMA user_version = 8")
    store = SqliteStateStore(path)
    assert store.reserve(key_reservation("r", 5, 10)).ok
    assert store.settle("r", 4, 0, 0, "m", "p", T0_US + 1).applied
    assert store.key_totals("k_a", KP) == DayTotals(4, 0, 0)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    store.close()


# -- token windows: one table through token_fits_at and through both stores ---------------------

W = 60_000_000  # a minute, in microseconds

# entries already in the window (seconds after T0, amount), limit, amount, admitted, fits at (s)
TOKEN_TABLE = [
    pytest.param([], 100, 100, True, None, id="fits-exactly"),
    pytest.param([], 100, 101, False, None, id="alone-over-the-limit-never-fits"),
    pytest.param([(0, 60)], 100, 40, True, None, id="sum-fits"),
    pytest.param([(0, 60)], 100, 41, False, 60, id="waits-for-the-oldest"),
    pytest.param([(0, 30), (10, 30), (20, 30)], 100, 50, False, 70, id="needs-two-to-leave"),
    pytest.param([(0, 30), (10, 30), (20, 30)], 100, 100, False, 80, id="needs-all-to-leave"),
    pytest.param([(0, 500)], 100, 0, True, None, id="zero-always-passes"),
]


@pytest.mark.parametrize(("entries", "limit", "amount", "ok", "fits_s"), TOKEN_TABLE)
def test_token_fits_at(entries, limit, amount, ok, fits_s) -> None:
    in_window = [(T0_US + s * 1_000_000, a) for s, a in entries]
    if not ok:
        expected = None if fits_s is None else T0_US + fits_s * 1_000_000
        assert token_fits_at(in_window, limit, amount, W) == expected


@pytest.mark.parametrize(("entries", "limit", "amount", "ok", "fits_s"), TOKEN_TABLE)
def test_stores_agree_with_token_fits_at(store: StateStore, entries, limit, amount, ok, fits_s):
    for i, (s, a) in enumerate(entries):
        assert store.token_admit(f"e{i}", [("k", 10**9, a)], W, T0_US + s * 1_000_000).allowed
    now = T0_US + 30_000_000
    got = store.token_admit("new", [("k", limit, amount)], W, now)
    assert got.allowed is ok
    assert got.used == {"k": sum(a for _, a in entries)}
    if not ok:
        assert got.refused_key == "k"
        assert got.fits_at_us == (None if fits_s is None else T0_US + fits_s * 1_000_000)


def test_token_admit_is_all_or_nothing_and_corrects(store: StateStore) -> None:
    checks = [("in", 100, 50), ("out", 100, 80), ("total", 150, 130)]
    assert store.token_admit("a", checks, W, T0_US).allowed
    refused = store.token_admit("b", [("in", 100, 10), ("out", 100, 30)], W, T0_US + 1)
    assert not refused.allowed and refused.refused_key == "out"
    assert refused.used == {"in": 50, "out": 80}
    # nothing of b was recorded, not even under "in"
    assert store.token_admit("c", [("in", 100, 50)], W, T0_US + 2).allowed
    assert not store.token_admit("d", [("in", 100, 1)], W, T0_US + 3).allowed
    # settlement: a used 5 output tokens, not 80
    store.token_correct("a", {"out": 5, "total": 55})
    assert store.token_admit("e", [("out", 100, 95), ("total", 150, 95)], W, T0_US + 4).allowed
    # the window forgets: a minute later everything is free again
    later = store.token_admit("f", [("in", 100, 100)], W, T0_US + W + 3)
    assert later.allowed and later.used == {"in": 0}
    store.token_correct("a", {"in": 1000})  # gone from the window: not brought back
    assert store.token_admit("g", [("in", 100, 0)], W, T0_US + W + 4).used == {"in": 100}


def test_leases(store: StateStore) -> None:
    assert store.lease_acquire("u", "l1", 2, "host:1", T0_US, W) == (True, 1)
    assert store.lease_acquire("u", "l2", 2, "host:2", T0_US, W) == (True, 2)
    assert store.lease_acquire("u", "l3", 2, "host:1", T0_US, W) == (False, 2)
    assert store.lease_acquire("v", "l4", 1, "host:1", T0_US, W) == (True, 1)
    assert {(x.key, x.lease_id, x.owner) for x in store.leases()} == {
        ("u", "l1", "host:1"), ("u", "l2", "host:2"), ("v", "l4", "host:1")
    }
    assert store.lease_release("u", "l1") and not store.lease_release("u", "l1")
    assert store.lease_acquire("u", "l3", 2, "host:1", T0_US, W) == (True, 2)
    # an expired lease (its process never gave it back) frees its place
    assert store.lease_acquire("u", "l5", 2, "host:1", T0_US + W, W) == (True, 1)


def test_lease_renew_holds_a_lease_longer_until_it_has_expired(store: StateStore) -> None:
    assert store.lease_acquire("s", "l1", 1, "host:1", T0_US, W) == (True, 1)
    assert store.lease_renew("s", "l1", T0_US + W - 1, W)  # held until T0 + 2W - 1 now
    assert store.lease_acquire("s", "l2", 1, "host:1", T0_US + W, W) == (False, 1)
    assert [x.expires_us for x in store.leases() if x.key == "s"] == [T0_US + 2 * W - 1]
    assert not store.lease_renew("s", "l1", T0_US + 2 * W - 1, W)  # expired: not brought back
    assert not store.lease_renew("s", "gone", T0_US, W)
    assert store.lease_acquire("s", "l3", 1, "host:1", T0_US + 2 * W, W) == (True, 1)
    assert store.lease_release("s", "l3") and not store.lease_renew("s", "l3", T0_US, W)


def test_api_keys_round_trip_and_revoke_once(store: StateStore) -> None:
    from candela_mitm.state.ports import KeyRecord

    a = KeyRecord("k_a", "a" * 64, "u", "ci", "admin", T0_US, expires_us=T0_US + 10)
    b = KeyRecord("k_b", "b" * 64, "v", "", "v", T0_US + 1)
    store.put_api_key(a)
    store.put_api_key(b)
    assert store.api_key("a" * 64) == a and store.api_key("c" * 64) is None
    assert store.api_keys() == [a, b] and store.api_keys("v") == [b]
    assert a.valid_at(T0_US + 9) and not a.valid_at(T0_US + 10)  # expired at its expiry
    assert store.revoke_api_key("k_b", T0_US + 5) == b  # answered as it was
    revoked = store.api_key("b" * 64)
    assert revoked is not None and revoked.revoked_us == T0_US + 5
    assert not revoked.valid_at(T0_US + 2)
    # a second revocation keeps the first time
    assert store.revoke_api_key("k_b", T0_US + 9) == revoked
    assert store.api_key("b" * 64).revoked_us == T0_US + 5
    assert store.revoke_api_key("k_nonesuch", T0_US) is None


def test_api_keys_keep_their_models(store: StateStore) -> None:
    from candela_mitm.state.ports import KeyRecord

    narrow = KeyRecord("k_n", "d" * 64, "u", "", "admin", T0_US, models=("gpt-4o-mini", "claude-*"))
    store.put_api_key(narrow)
    assert store.api_key("d" * 64) == narrow
    assert store.api_keys("u")[0].models == ("gpt-4o-mini", "claude-*")
    assert store.revoke_api_key("k_n", T0_US + 1) == narrow
    assert store.api_key("d" * 64).models == ("gpt-4o-mini", "claude-*")  # type: ignore[union-attr]


def test_api_key_expiry_only_comes_forward(store: StateStore) -> None:
    from candela_mitm.state.ports import KeyRecord

    forever = KeyRecord("k_a", "a" * 64, "u", "", "u", T0_US)
    dated = KeyRecord("k_b", "b" * 64, "u", "", "u", T0_US, expires_us=T0_US + 100)
    store.put_api_key(forever)
    store.put_api_key(dated)
    assert store.expire_api_key("k_a", T0_US + 50) == forever
    assert store.api_key("a" * 64).expires_us == T0_US + 50
    assert store.expire_api_key("k_b", T0_US + 500) == dated  # later: unchanged
    assert store.api_key("b" * 64).expires_us == T0_US + 100
    store.expire_api_key("k_b", T0_US + 10)
    assert store.api_key("b" * 64).expires_us == T0_US + 10
    assert [k.expires_us for k in store.api_keys("u")] == [T0_US + 50, T0_US + 10]
    assert store.revoke_api_key("k_b", T0_US + 1).expires_us == T0_US + 10
    assert store.expire_api_key("k_nonesuch", T0_US) is None


# -- budget alert claims -----------------------------------------------------------------------


def test_alert_claims_are_once_per_scope_id_period_and_threshold(store: StateStore) -> None:
    far = T0_US + 3600 * US_PER_S
    assert store.claim_alert("user", "u", "2026-05-17", 80, T0_US, far)
    assert not store.claim_alert("user", "u", "2026-05-17", 80, T0_US + 1, far)
    # every part of the key is its own claim
    assert store.claim_alert("user", "u", "2026-05-17", 90, T0_US, far)
    assert store.claim_alert("user", "u", "2026-05-18", 80, T0_US, far)
    assert store.claim_alert("tenant", "u", "2026-05-17", 80, T0_US, far)
    assert store.claim_alert("user", "v", "2026-05-17", 80, T0_US, far)
    # ids and period keys holding the separators of other keys stay apart
    assert store.claim_alert("user", "a:b", "weekly:2026-05-11@Europe/Paris", 50, T0_US, far)
    assert store.claim_alert("user", "a", "b:weekly:2026-05-11@Europe/Paris", 50, T0_US, far)


def test_alert_claim_is_forgotten_after_its_expiry(store: StateStore) -> None:
    # Redis expires the key by its own clock (PX from now), SQLite by the `now` of a later claim:
    # a 1 ms lifetime has passed for both after the sleep
    assert store.claim_alert("user", "u", "p", 50, T0_US, T0_US + 1000)
    time.sleep(0.05)
    assert store.claim_alert("user", "u", "p", 50, T0_US + 2000, T0_US + 3600 * US_PER_S)
    assert not store.claim_alert("user", "u", "p", 50, T0_US + 3000, T0_US + 3600 * US_PER_S)


def test_alert_claim_has_one_winner_across_clients(backend: Any) -> None:
    """Threads with a client (connection) each, as processes sharing the store are."""
    clients = [backend.open() for _ in range(12)]
    start = threading.Barrier(len(clients))
    wins: list[bool] = []

    def claim(s: StateStore) -> None:
        start.wait()
        wins.append(s.claim_alert("tenant", "t", "monthly:2026-05-01", 80, T0_US, T0_US + US_PER_S * 60))

    threads = [threading.Thread(target=claim, args=(s,)) for s in clients]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sorted(wins) == [False] * 11 + [True]
