"""The in-memory store answers exactly as the SQLite store, call for call (a scripted history)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.state.memory import MemoryStateStore
from candela_mitm.state.ports import (
    GrantRow,
    KeyRecord,
    NewReservation,
    StateStore,
    TenantRecord,
    UserRecord,
)
from candela_mitm.state.sqlite import SqliteStateStore

T0_US = 1_780_000_000_000_000
WINDOW_US = 60_000_000


def _history(seed: int, steps: int) -> list[tuple[str, tuple[Any, ...]]]:
    """A seeded mix of every ledger, grant, rate, token and lease operation."""
    rnd = random.Random(seed)
    calls: list[tuple[str, tuple[Any, ...]]] = []
    now = T0_US
    users, tenants = ["u1", "u2"], ["", "t1", "t2"]
    reservations: list[str] = []
    entries: list[str] = []
    leases: list[tuple[str, str]] = []
    for i in range(steps):
        now += rnd.randrange(0, 20_000_000)
        op = rnd.choice(
            ["reserve", "reserve", "reserve", "settle", "settle", "release", "grant", "rate",
             "tokens", "correct", "lease", "unlease", "reclaim"]
        )
        user = rnd.choice(users)
        if op == "reserve":
            rid = f"r{i}"
            reservations.append(rid)
            tenant = rnd.choice(tenants)
            key = rnd.choice(["", "k1", "k2"])  # an API key budget's row (its lineage)
            calls.append((
                "reserve",
                (NewReservation(
                    rid, user, tenant, "2026-05-17", rnd.randrange(0, 400), rnd.choice([0, 500, 1000]),
                    f"q{i}", "h:1", now, "m", "p", rnd.choice(["", "weekly:2026-05-11"]),
                    rnd.choice([None, 300, 900]), "monthly:2026-05-01" if tenant else "",
                    key, rnd.choice([None, 200, 600]), "monthly:2026-05-01" if key else "",
                ),),
            ))
        elif op in ("settle", "release", "reclaim") and reservations:
            rid = rnd.choice(reservations)
            if op == "settle":
                calls.append(("settle", (rid, rnd.randrange(0, 600), 3, 4, "m", "p", now)))
            else:
                calls.append(("release", (rid, now, op == "reclaim")))
        elif op == "grant":
            calls.append((
                "add_grant",
                (GrantRow(f"g{i}", user, rnd.randrange(1, 300), 0, 0,
                          now + rnd.randrange(1, 200_000_000), "r", "a", now),),
            ))
        elif op == "rate":
            calls.append(("rate_hit", (user, rnd.randrange(0, 4), WINDOW_US, now)))
        elif op == "tokens":
            entry = f"e{i}"
            entries.append(entry)
            checks = [(f"{user}/total", rnd.randrange(0, 900), rnd.randrange(0, 400))]
            if rnd.random() < 0.5:
                checks.append(("tenant/total", rnd.randrange(0, 900), rnd.randrange(0, 400)))
            calls.append(("token_admit", (entry, checks, WINDOW_US, now)))
        elif op == "correct" and entries:
            calls.append((
                "token_correct",
                (rnd.choice(entries), {f"{user}/total": rnd.randrange(0, 300)}),
            ))
        elif op == "lease":
            lid = f"l{i}"
            leases.append((user, lid))
            calls.append(("lease_acquire", (user, lid, rnd.randrange(0, 3), "h:1", now, 90_000_000)))
        elif op == "unlease" and leases:
            calls.append(("lease_release", rnd.choice(leases)))
    return calls


def _snapshot(store: StateStore) -> tuple[Any, ...]:
    return (
        [store.day_totals(u, p) for u in ("u1", "u2") for p in ("2026-05-17", "weekly:2026-05-11")],
        [store.tenant_totals(t, "monthly:2026-05-01") for t in ("t1", "t2")],
        [store.key_totals(k, "monthly:2026-05-01") for k in ("k1", "k2")],
        store.grants("u1") + store.grants("u2"),
        store.spend_rows(),
        store.active_reservations(),
        store.leases(),
    )


@pytest.mark.parametrize("seed", range(6))
def test_memory_store_agrees_with_sqlite(tmp_path: Path, seed: int) -> None:
    sqlite = SqliteStateStore(tmp_path / "state.db")
    memory = MemoryStateStore()
    try:
        for name, args in _history(seed, 300):
            expected = getattr(sqlite, name)(*args)
            got = getattr(memory, name)(*args)
            assert got == expected, (name, args)
            assert _snapshot(memory) == _snapshot(sqlite), (name, args)
        assert memory.purge_finished(T0_US * 2) == sqlite.purge_finished(T0_US * 2)
        assert _snapshot(memory) == _snapshot(sqlite)
    finally:
        sqlite.close()


def test_memory_store_users_tenants_and_keys() -> None:
    store = MemoryStateStore()
    store.put_user(UserRecord("bob", tenants=("a",), daily_budget_usd=2.0))
    assert store.get_user("bob") == UserRecord("bob", tenants=("a",), daily_budget_usd=2.0)
    assert store.delete_user("bob", T0_US) and not store.delete_user("bob", T0_US)
    assert store.get_user("bob") is None and store.get_user("bob", include_deleted=True)
    assert store.list_users() == [] and len(store.list_users(include_deleted=True)) == 1
    store.put_tenant(TenantRecord("a", budget_usd=5.0))
    assert store.get_tenant("a") == TenantRecord("a", budget_usd=5.0)
    assert store.list_tenants() == [TenantRecord("a", budget_usd=5.0)]
    key = KeyRecord("k_1", "ab" * 32, "bob", "n", "admin", T0_US)
    store.put_api_key(key)
    assert store.api_key("ab" * 32) == key and store.api_keys("bob") == [key]
    assert store.expire_api_key("k_1", T0_US + 5) == key
    assert store.expire_api_key("k_1", T0_US + 9) is not None
    assert store.api_keys()[0].expires_us == T0_US + 5  # only ever brought forward
    assert store.revoke_api_key("k_1", T0_US + 1) is not None
    assert store.revoke_api_key("k_1", T0_US + 2).revoked_us == T0_US + 1  # type: ignore[union-attr]
    assert store.revoke_api_key("k_x", T0_US) is None
