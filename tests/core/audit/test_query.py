"""Tests for reading the audit log: DuckDB queries, exports and the admin API listing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from candela_mitm.audit import AuditWriter, query_entries
from candela_mitm.audit import sqlite_sink as sqlite_sink_module
from candela_mitm.audit.chain import fields_json, verify_rows
from candela_mitm.audit.query import hourly_spend, parse_time
from candela_mitm.audit.sqlite_sink import append_batch, connect_writer
from candela_mitm.cli.audit import audit_main
from candela_mitm.config import Audit

N, BATCH = 3000, 100
T0 = datetime(2026, 5, 1, tzinfo=UTC)
ACTIONS = ("request", "model_policy_check", "admin.user.update")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """N entries in batches of BATCH; batch b is committed at T0 + b hours."""
    path = tmp_path_factory.mktemp("query") / "audit.db"
    hours = iter(range(N // BATCH))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            sqlite_sink_module,
            "now_ts",
            lambda: (T0 + timedelta(hours=next(hours))).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        conn, _ = connect_writer(path)
        for b in range(0, N, BATCH):
            append_batch(
                conn,
                [
                    (
                        ACTIONS[i % 3],
                        f"user{i % 4}@example.com",
                        None if i % 5 == 0 else "research-team",
                        fields_json(
                            {
                                "i": i,
                                "model": "gpt-4o" if i % 2 else "gpt-4o-mini",
                                "cost_usd": i / 100,
                            }
                        ),
                    )
                    for i in range(b, b + BATCH)
                ],
            )
        conn.close()
    yield path


def ledger(db: Path) -> list[tuple]:
    import sqlite3

    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT seq, ts, action, user_id, tenant_id, fields, prev_hash, hash FROM audit_log ORDER BY seq"
    ).fetchall()
    conn.close()
    return rows


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-05-01", "2026-05-01T00:00:00.000000Z"),
        ("2026-05-01T05:00:00Z", "2026-05-01T05:00:00.000000Z"),
        ("2026-05-01T07:00:00+02:00", "2026-05-01T05:00:00.000000Z"),
        ("2026-05-01 05:00:00.5", "2026-05-01T05:00:00.500000Z"),
    ],
)
def test_parse_time(text: str, expected: str) -> None:
    assert parse_time(text) == expected


def test_parse_time_rejects_junk() -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_query_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT action, count(*) AS n, sum((fields->>'i')::INT) AS total FROM audit GROUP BY action ORDER BY action"
    assert audit_main(["--db", str(db), "query", sql, "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = [
        {"action": a, "n": N // 3, "total": sum(i for i in range(N) if ACTIONS[i % 3] == a)}
        for a in sorted(ACTIONS)
    ]
    assert got == want


def test_query_json_returns_objects_and_times(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        audit_main(
            [
                "--db",
                str(db),
                "query",
                "SELECT seq, ts, fields FROM audit WHERE seq = 101",
                "--format",
                "json",
            ]
        )
        == 0
    )
    [row] = json.loads(capsys.readouterr().out)
    assert row == {
        "seq": 101,
        "ts": "2026-05-01T01:00:00",
        "fields": {"i": 100, "model": "gpt-4o-mini", "cost_usd": 1.0},
    }


def test_query_csv_and_table(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT seq, user_id, tenant_id FROM audit WHERE seq <= 5 ORDER BY seq"
    assert audit_main(["--db", str(db), "query", sql, "--format", "csv"]) == 0
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0] == ["seq", "user_id", "tenant_id"]
    assert rows[1] == ["1", "user0@example.com", ""]
    assert rows[2] == ["2", "user1@example.com", "research-team"]
    assert len(rows) == 6
    assert audit_main(["--db", str(db), "query", sql]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["seq", "user_id", "tenant_id"]
    assert out[2].split() == ["1", "user0@example.com", "NULL"]
    assert out[-1] == "(5 rows)"


def test_query_sees_every_entry(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        audit_main(
            [
                "--db",
                str(db),
                "query",
                "SELECT count(*), max(seq), min(ts), max(ts) FROM audit",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert (
        capsys.readouterr().out.splitlines()[1]
        == f"{N},{N},2026-05-01T00:00:00,2026-05-02T05:00:00"
    )


def test_bad_sql_is_reported(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_main(["--db", str(db), "query", "SELEC nonsense"]) == 1
    assert "query failed" in capsys.readouterr().err


# batch b holds seq b*100+1 .. b*100+100 at hour b
@pytest.mark.parametrize(
    ("since", "until", "first", "last"),
    [
        (None, None, 1, N),
        ("2026-05-01T05:00:00Z", "2026-05-01T10:00:00Z", 501, 1000),
        ("2026-05-01T07:00:00+02:00", "2026-05-01T10:00:00", 501, 1000),
        ("2026-05-02", None, 2401, N),
        (None, "2026-05-01T00:30:00Z", 1, 100),
        ("2026-06-01", None, None, None),
    ],
)
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export(
    db: Path,
    tmp_path: Path,
    fmt: str,
    since: str | None,
    until: str | None,
    first: int | None,
    last: int | None,
) -> None:
    out = tmp_path / f"out.{fmt}"
    args = ["--db", str(db), "export", "--format", fmt, "--out", str(out)]
    if since:
        args += ["--since", since]
    if until:
        args += ["--until", until]
    assert audit_main(args) == 0
    got: list[tuple]
    want = [
        r for r in ledger(db) if first is not None and last is not None and first <= r[0] <= last
    ]
    if fmt == "jsonl":
        objs = [json.loads(line) for line in out.read_text().splitlines()]
        got = [
            (
                o["seq"],
                o["ts"],
                o["action"],
                o["user_id"],
                o["tenant_id"],
                fields_json(o["fields"]),
                o["prev_hash"],
                o["hash"],
            )
            for o in objs
        ]
    elif fmt == "csv":
        rows = list(csv.reader(out.read_text().splitlines()))
        assert rows[0] == [
            "seq",
            "ts",
            "action",
            "user_id",
            "tenant_id",
            "fields",
            "prev_hash",
            "hash",
        ]
        got = [(int(r[0]), r[1], r[2], r[3] or None, r[4] or None, *r[5:]) for r in rows[1:]]
    else:
        with duckdb.connect() as con:
            got = [
                (r[0], r[1].strftime("%Y-%m-%dT%H:%M:%S.%fZ"), *r[2:])
                for r in con.execute(
                    f"SELECT seq, ts, action, user_id, tenant_id, fields::VARCHAR, prev_hash, hash FROM read_parquet('{out}') ORDER BY seq"
                ).fetchall()
            ]
    assert got == want
    if want:  # an export carries the chain: the slice verifies against its first prev_hash
        assert verify_rows(got, first_seq=want[0][0], anchor=want[0][6]).ok


def test_export_rejects_bad_time(db: Path, tmp_path: Path) -> None:
    assert (
        audit_main(
            [
                "--db",
                str(db),
                "export",
                "--format",
                "csv",
                "--since",
                "soon",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("kwargs", "expected_seqs"),
    [
        ({"limit": 3}, [3000, 2999, 2998]),
        ({"action": "model_policy_check", "limit": 2}, [2999, 2996]),
        ({"user": "user2@example.com", "limit": 2}, [2999, 2995]),
        ({"user": "nobody@example.com"}, []),
        ({"since": "2026-05-02T05:00:00Z", "limit": 1000}, list(range(3000, 2900, -1))),
        ({"action": "request", "user": "user0@example.com", "limit": 2}, [2989, 2977]),
        ({"limit": 2, "before_seq": 11}, [10, 9]),
        ({"tenant": "research-team", "limit": 2}, [3000, 2999]),
        ({"tenant": "research-team", "limit": 2, "before_seq": 2997}, [2995, 2994]),
    ],
)
def test_query_entries_newest_first(db: Path, kwargs: dict, expected_seqs: list[int]) -> None:
    entries = query_entries(db, **kwargs)
    assert [e["seq"] for e in entries] == expected_seqs
    for e in entries:
        assert set(e) == {
            "seq",
            "ts",
            "action",
            "user_id",
            "tenant_id",
            "fields",
            "prev_hash",
            "hash",
        }
        assert isinstance(e["fields"], dict)


LIVE_WRITER = textwrap.dedent(
    """
    import sys
    from candela_mitm.audit import AuditWriter
    from candela_mitm.config import Audit

    w = AuditWriter(Audit(sqlite_path=sys.argv[1]))
    w.start()
    i = 0
    while True:
        seq = w.record_durable("request", user_id="live", i=i).result()
        i += 1
        if i % 100 == 0:
            print(seq, flush=True)
    """
)


def test_query_while_another_process_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "live.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE_WRITER, str(db)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for _ in range(3):
            committed = int(proc.stdout.readline())
            assert (
                audit_main(
                    [
                        "--db",
                        str(db),
                        "query",
                        "SELECT count(*), max(seq) FROM audit",
                        "--format",
                        "csv",
                    ]
                )
                == 0
            )
            count, newest = map(int, capsys.readouterr().out.splitlines()[1].split(","))
            assert count == newest >= committed  # through the newest entry, no gaps
            assert audit_main(["--db", str(db), "verify"]) == 0
            capsys.readouterr()
    finally:
        proc.kill()
        proc.wait(10)


# -- spend over the day (the laptop UI's chart) -----------------------------------------------


def test_hourly_spend_sums_the_users_requests_of_the_day(tmp_path):
    db = tmp_path / "audit.db"
    today = datetime.now(UTC).date()
    assert hourly_spend(db, "me", today) == [0.0] * 24  # no log yet
    w = AuditWriter(Audit(sqlite_path=str(db)))
    w.start()
    try:
        hour_before = datetime.now(UTC).hour
        for user, cost in (("me", 0.5), ("me", 0.25), ("other", 9.0)):
            w.record("llm_request", user_id=user, cost_usd=cost)
        w.record("local_config_change", actor="me", cost_usd=100.0)  # not a request
        assert w.flush(10)
        hour_after = datetime.now(UTC).hour
        got = hourly_spend(db, "me", today)
    finally:
        w.close()
    assert sum(got) == pytest.approx(0.75)
    assert {h for h, v in enumerate(got) if v} <= {hour_before, hour_after}
    assert hourly_spend(db, "me", today.replace(year=today.year - 1)) == [0.0] * 24


def test_charged_entries_are_what_a_restart_settles_from(tmp_path: Path) -> None:
    """The llm_request entries of the asked spans that charged their request, since a moment."""
    from candela_mitm.audit import AuditWriter
    from candela_mitm.audit.query import charged_entries
    from candela_mitm.config import Audit

    db = tmp_path / "audit.db"
    before = datetime.now(UTC) - timedelta(seconds=1)
    w = AuditWriter(Audit(sqlite_path=str(db)))
    w.start()
    try:
        for span, source, cost in (
            ("a", "reported", 0.25),
            ("b", None, 0.0),  # refused by the provider: nothing charged
            ("c", "reserved", 1.5),
            ("d", "observed", 0.5),  # not asked for
        ):
            w.record("llm_request", span_id=span, usage_source=source, cost_usd=cost)
        w.record("model_policy", span_id="a", decision="allowed")  # another action
        assert w.flush(10)
    finally:
        w.close()
    got = charged_entries(db, {"a", "b", "c", "x"}, before)
    assert {s: f["cost_usd"] for s, f in got.items()} == {"a": 0.25, "c": 1.5}
    assert charged_entries(db, {"a"}, datetime.now(UTC) + timedelta(seconds=5)) == {}  # older
    assert charged_entries(db, set(), before) == {}
    assert charged_entries(tmp_path / "none.db", {"a"}, before) == {}  # no ledger yet
