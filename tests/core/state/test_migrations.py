"""Named schema steps: a database the user_version code made is upgraded, steps run once, in
order, all or nothing, and a database with a step this Candela does not know is refused."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlite_utils import Database

from candela_mitm.errors import StoreUnavailable
from candela_mitm.state import migrations
from candela_mitm.state.migrations import MIGRATIONS, SCHEMA_VERSION, STEPS, Step
from candela_mitm.state.ports import DayTotals, KeyRecord, TenantRecord, UserRecord
from candela_mitm.state.sqlite import SqliteStateStore

# dumped from a database Candela made with PRAGMA user_version 7, before the steps had names
SCHEMA_7 = Path(__file__).parent / "fixtures" / "state_schema_7.sql"
T0_US = 1_779_019_200_000_000
NANO = 1_000_000_000


def applied(path: Path) -> list[str]:
    with sqlite3.connect(path) as raw:
        return [m.name for m in MIGRATIONS.applied(Database(raw))]


def shape(path: Path) -> dict[str, object]:
    """Every table's columns and every index, as SQLite describes them."""
    with sqlite3.connect(path) as raw:
        tables = [
            name
            for (name,) in raw.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_%' "
                "ESCAPE '\\' ORDER BY name"
            )
        ]
        return {
            name: (
                raw.execute(f"PRAGMA table_info({name})").fetchall(),
                sorted(raw.execute(f"PRAGMA index_list({name})").fetchall()),
            )
            for name in tables
        }


def test_a_fresh_store_runs_every_step_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SqliteStateStore(path).close()
    assert applied(path) == [name for name, _ in STEPS]
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        stamps = raw.execute("SELECT name, applied_at FROM _sqlite_migrations").fetchall()
    SqliteStateStore(path).close()  # opening again runs nothing
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT name, applied_at FROM _sqlite_migrations").fetchall() == stamps


def test_a_store_the_user_version_code_made_is_upgraded_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:
        raw.executescript(SCHEMA_7.read_text())
        assert raw.execute("PRAGMA user_version").fetchone() == (7,)  # as the old code left it
    store = SqliteStateStore(path)
    assert applied(path) == [name for name, _ in STEPS]
    fresh = tmp_path / "fresh.db"
    SqliteStateStore(fresh).close()
    assert shape(path) == shape(fresh)  # the steps make what the old code made

    alice = "alice@example.com"
    user = store.get_user(alice)
    assert user is not None and user.tenants == ("research",) and user.daily_budget_usd == 20.0
    assert store.get_tenant("research") == TenantRecord("research", 100.0, "monthly")
    key = store.api_key("ab" * 32)
    assert isinstance(key, KeyRecord) and key.models == ("gpt-*",)
    # the open reservation (2 USD held) settles on the rows the old code kept
    assert store.day_totals(alice, "2026-05-17") == DayTotals(NANO * 4 // 10, 0, 2 * NANO)
    assert store.settle("open", NANO, 1, 2, "m", "p", T0_US + 5).applied
    assert store.day_totals(alice, "2026-05-17") == DayTotals(NANO * 14 // 10, 0, 0)
    assert store.tenant_totals("research", "monthly:2026-05-01").spent == NANO * 14 // 10
    # rate, token and lease windows carry on from what was logged
    assert store.rate_hit(alice, 4, 60_000_000, T0_US + 10).count == 4
    assert not store.rate_hit(alice, 4, 60_000_000, T0_US + 11).allowed
    assert store.token_admit("e2", [("tok:" + alice, 1000, 800)], 60_000_000, T0_US + 1).used == {
        "tok:" + alice: 300
    }
    assert store.lease_acquire("conc:" + alice, "l2", 1, "host:2", T0_US, 60_000_000) == (False, 1)
    assert not store.claim_alert("tenant", "research", "monthly:2026-05-01", 80, T0_US, T0_US + 1)
    store.put_user(UserRecord("bob"))  # and it is writable
    store.close()


def extra(name: str, step: Step) -> list[tuple[str, Step]]:
    return [*STEPS, (name, step)]


def use_steps(monkeypatch: pytest.MonkeyPatch, steps: list[tuple[str, Step]]) -> None:
    monkeypatch.setattr(migrations, "STEPS", steps)
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations._migrations(steps))
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", len(steps))


def examples(db: Database) -> None:
    db.execute("CREATE TABLE examples (example_id TEXT PRIMARY KEY)")


def test_an_appended_step_runs_on_an_existing_store_and_an_older_candela_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    SqliteStateStore(path).close()
    with monkeypatch.context() as m:
        use_steps(m, extra("900_examples", examples))
        SqliteStateStore(path).close()
        assert applied(path)[-1] == "900_examples"
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
            raw.execute("INSERT INTO examples VALUES ('e1')")
    with pytest.raises(StoreUnavailable, match=f"schema {SCHEMA_VERSION + 1}, newer"):
        SqliteStateStore(path)
    with sqlite3.connect(path) as raw:  # even when the user_version says nothing
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    with pytest.raises(StoreUnavailable, match=r"does not know \(900_examples\)"):
        SqliteStateStore(path)


def test_a_failing_step_leaves_the_store_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    SqliteStateStore(path).close()

    def half(db: Database) -> None:
        db.execute("CREATE TABLE half (x)")
        raise RuntimeError("step 9 fails halfway")

    use_steps(monkeypatch, [*STEPS, ("900_examples", examples), ("901_half", half)])
    with pytest.raises(RuntimeError, match="halfway"):
        SqliteStateStore(path)
    assert applied(path) == [name for name, _ in STEPS]  # neither of the two added
    with sqlite3.connect(path) as raw:
        made = "SELECT name FROM sqlite_master WHERE name IN ('examples', 'half')"
        assert raw.execute(made).fetchall() == []
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_stores_opened_at_once_run_each_step_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            SqliteStateStore(path).close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert errors == []
    assert applied(path) == [name for name, _ in STEPS]
