"""Tests for the audit mirrors (DuckDB file, Parquet segments, BigQuery) fed from the SQLite ledger."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from candela_mitm.audit import AuditWriter
from candela_mitm.audit.bigquery_sink import BigQueryMirror
from candela_mitm.audit.chain import verify_rows
from candela_mitm.audit.duckdb_sink import DuckDBMirror, ParquetMirror, duckdb_mirror
from candela_mitm.audit.mirrors import Mirror, build_mirrors
from candela_mitm.config import Audit, BigQuery, parse_config
from candela_mitm.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.fakes.bigquery import FakeBigQuery  # noqa: E402

FAST: dict[str, Any] = {
    "mirror_poll_s": 0.05,
    "mirror_retry_initial_s": 0.02,
    "mirror_retry_max_s": 0.1,
}


@pytest.fixture
def fake_bq() -> Iterator[FakeBigQuery]:
    with FakeBigQuery() as fake:
        yield fake


def bq_cfg(fake: FakeBigQuery) -> BigQuery:
    return BigQuery(
        project="proj",
        dataset="candela",
        table="audit",
        endpoint=fake.endpoint,
        credentials="anonymous",
    )


def ledger(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return [
            tuple(r)
            for r in conn.execute(
                "SELECT seq, ts, action, user_id, tenant_id, fields, prev_hash, hash FROM audit_log ORDER BY seq"
            )
        ]
    finally:
        conn.close()


def _ts(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_duckdb(path: Path) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT seq, ts, action, user_id, tenant_id, fields::VARCHAR, prev_hash, hash FROM audit ORDER BY seq"
        ).fetchall()
    finally:
        con.close()
    return [(r[0], _ts(r[1]), *r[2:]) for r in rows]


def read_parquet(folder: Path) -> list[tuple]:
    with duckdb.connect() as con:
        rows = con.execute(
            f"SELECT seq, ts, action, user_id, tenant_id, fields::VARCHAR, prev_hash, hash FROM read_parquet('{folder}/*.parquet') ORDER BY seq"
        ).fetchall()
    return [(r[0], _ts(r[1]), *r[2:]) for r in rows]


def read_bigquery(fake: FakeBigQuery) -> list[tuple]:
    rows = sorted(fake.rows("proj", "candela", "audit"), key=lambda r: r["seq"])
    return [
        (
            r["seq"],
            r["ts"],
            r["action"],
            r["user_id"],
            r["tenant_id"],
            r["fields"],
            r["prev_hash"],
            r["hash"],
        )
        for r in rows
    ]


Backend = tuple[Callable[[], Mirror], Callable[[], list[tuple]]]


@pytest.fixture(params=["duckdb", "parquet", "bigquery"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "duckdb":
        path = tmp_path / "mirror.duckdb"
        yield (lambda: DuckDBMirror(path)), (lambda: read_duckdb(path))
    elif request.param == "parquet":
        folder = tmp_path / "segments"
        yield (
            (lambda: ParquetMirror(folder, segment_interval_s=0.0)),
            (lambda: read_parquet(folder)),
        )
    else:
        with FakeBigQuery() as fake:
            cursor = tmp_path / "audit.db.bigquery.cursor"
            yield (lambda: BigQueryMirror(bq_cfg(fake), cursor)), (lambda: read_bigquery(fake))


def write_entries(w: AuditWriter, start: int, n: int) -> None:
    for i in range(start, start + n):
        w.record(
            "request" if i % 3 else "model_policy_check",
            user_id=f"user{i % 7}@example.com",
            tenant_id=None if i % 5 == 0 else "research-team",
            i=i,
            model="gpt-4o",
            note="caf\u00e9 \u2603" if i % 11 == 0 else "plain",
            usage={"input_tokens": i, "cost_usd": i / 1000},
        )
    assert w.flush(30)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_mirror_contents_equal_the_ledger(tmp_path: Path, backend: Backend) -> None:
    make, read = backend
    db = tmp_path / "audit.db"
    w = AuditWriter(Audit(sqlite_path=str(db)), mirrors=[make()], **FAST)
    w.start()
    write_entries(w, 0, 2500)
    assert w.close()
    mirrored = read()
    assert mirrored == ledger(db)
    assert len(mirrored) == 2500
    assert verify_rows(mirrored).ok  # a mirror carries the chain: it can be verified on its own


def test_mirror_resumes_after_restart_without_gaps_or_repeats(
    tmp_path: Path, backend: Backend
) -> None:
    make, read = backend
    db = tmp_path / "audit.db"
    for start in (0, 700, 1400):
        w = AuditWriter(Audit(sqlite_path=str(db)), mirrors=[make()], **FAST)
        w.start()
        write_entries(w, start, 700)
        assert w.close()
    assert read() == ledger(db)


def test_mirror_catches_up_with_entries_written_while_it_was_absent(
    tmp_path: Path, backend: Backend
) -> None:
    make, read = backend
    db = tmp_path / "audit.db"
    w = AuditWriter(Audit(sqlite_path=str(db)), mirrors=[], **FAST)  # mirror not configured yet
    w.start()
    write_entries(w, 0, 1200)
    w.close()
    w = AuditWriter(Audit(sqlite_path=str(db)), mirrors=[make()], **FAST)
    w.start()
    name = "bigquery" if isinstance(w._mirrors[0], BigQueryMirror) else "duckdb"
    assert wait_for(lambda: w.stats().mirrors[name].mirrored_seq == 1200)
    assert w.stats().mirrors[name].lag == 0
    assert w.close()
    assert read() == ledger(db)


def test_bigquery_receives_rows_through_the_real_client(
    tmp_path: Path, fake_bq: FakeBigQuery
) -> None:
    db = tmp_path / "audit.db"
    cfg = Audit(sqlite_path=str(db), sinks=["sqlite", "bigquery"], bigquery=bq_cfg(fake_bq))
    w = AuditWriter(cfg, **FAST)
    w.start()
    write_entries(w, 0, 1200)
    assert w.close()
    assert ("proj", "candela") in fake_bq.datasets
    table = fake_bq.tables[("proj", "candela", "audit")]
    assert [f["name"] for f in table.resource["schema"]["fields"]] == [
        "seq",
        "ts",
        "action",
        "user_id",
        "tenant_id",
        "fields",
        "prev_hash",
        "hash",
    ]
    assert read_bigquery(fake_bq) == ledger(db)
    inserts = [p for m, p in fake_bq.requests if p.endswith("/insertAll")]
    assert len(inserts) >= 3  # 1200 rows in insertAll requests of at most 500


def test_failing_mirror_is_retried_and_counted_while_the_ledger_keeps_full_speed(
    tmp_path: Path, fake_bq: FakeBigQuery
) -> None:
    n = 20_000

    def rate(w: AuditWriter, start: int) -> float:
        started = time.perf_counter()
        write_entries(w, start, n)
        return n / (time.perf_counter() - started)

    base = AuditWriter(
        Audit(sqlite_path=str(tmp_path / "base.db"), queue_max_entries=n), mirrors=[], **FAST
    )
    base.start()
    baseline = rate(base, 0)
    base.close()

    db = tmp_path / "audit.db"
    fake_bq.fail_status = 500
    cfg = Audit(
        sqlite_path=str(db),
        sinks=["sqlite", "duckdb", "bigquery"],
        duckdb_path=str(
            tmp_path / "not-a-dir" / "audit.duckdb"
        ),  # parent is a file: never writable
        bigquery=bq_cfg(fake_bq),
        queue_max_entries=n,
    )
    (tmp_path / "not-a-dir").write_text("a file, not a folder")
    w = AuditWriter(cfg, **FAST)
    w.start()
    failing = rate(w, 0)
    assert wait_for(lambda: all(m.errors >= 3 and m.lag == n for m in w.stats().mirrors.values()))
    stats = w.stats()
    print(
        f"\nledger: {baseline:,.0f} entries/s without mirrors, {failing:,.0f} entries/s with two failing mirrors"
    )
    assert stats.entries_written == n and stats.healthy
    assert failing > baseline * 0.3  # generous: the mirrors' failures run on their own threads
    for name in ("duckdb", "bigquery"):
        m = stats.mirrors[name]
        assert (m.healthy, m.rows_written, m.mirrored_seq) == (False, 0, 0)
        assert m.lag == n
        assert m.last_error
    assert "injected failure" in (stats.mirrors["bigquery"].last_error or "")
    assert fake_bq.failed_requests >= 3
    # BigQuery recovers: the backlog, kept in the ledger, arrives exactly once
    fake_bq.fail_status = None
    assert wait_for(lambda: w.stats().mirrors["bigquery"].mirrored_seq == n)
    assert w.stats().mirrors["bigquery"].healthy
    w.close(timeout=2)
    assert read_bigquery(fake_bq) == ledger(db)


@pytest.mark.parametrize(("fail_next", "insert_errors_next"), [(4, 0), (0, 2)])
def test_transient_and_row_errors_are_retried(
    tmp_path: Path, fake_bq: FakeBigQuery, fail_next: int, insert_errors_next: int
) -> None:
    db = tmp_path / "audit.db"
    fake_bq.fail_next = fail_next  # HTTP 500s, from the dataset creation on
    fake_bq.insert_errors_next = insert_errors_next  # 200 with insertErrors: nothing stored
    w = AuditWriter(
        Audit(sqlite_path=str(db)),
        mirrors=[BigQueryMirror(bq_cfg(fake_bq), tmp_path / "cursor")],
        **FAST,
    )
    w.start()
    write_entries(w, 0, 300)
    assert wait_for(lambda: w.stats().mirrors["bigquery"].mirrored_seq == 300)
    assert w.stats().mirrors["bigquery"].errors >= 1
    w.close()
    assert read_bigquery(fake_bq) == ledger(db)


def test_one_process_feeds_a_shared_mirror(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    cfg = Audit(
        sqlite_path=str(db), sinks=["sqlite", "duckdb"], duckdb_path=str(tmp_path / "m.duckdb")
    )
    first, second = AuditWriter(cfg, **FAST), AuditWriter(cfg, **FAST)
    first.start()
    second.start()
    write_entries(first, 0, 500)
    write_entries(second, 500, 500)
    assert wait_for(lambda: first.stats().mirrors["duckdb"].role == "leader")
    assert second.stats().mirrors["duckdb"].role == "standby"
    assert wait_for(lambda: first.stats().mirrors["duckdb"].mirrored_seq == 1000)
    first.close()
    # the standby takes over once the leader is gone
    write_entries(second, 1000, 100)
    assert wait_for(lambda: second.stats().mirrors["duckdb"].mirrored_seq == 1100)
    assert second.stats().mirrors["duckdb"].role == "leader"
    second.close()
    assert read_duckdb(tmp_path / "m.duckdb") == ledger(db)


def test_mirror_of_another_log_is_refused(tmp_path: Path) -> None:
    mirror_path = tmp_path / "m.duckdb"
    a = AuditWriter(
        Audit(sqlite_path=str(tmp_path / "a.db")), mirrors=[DuckDBMirror(mirror_path)], **FAST
    )
    a.start()
    write_entries(a, 0, 50)
    assert a.close()
    b = AuditWriter(
        Audit(sqlite_path=str(tmp_path / "b.db")), mirrors=[DuckDBMirror(mirror_path)], **FAST
    )
    b.start()
    write_entries(b, 0, 100)
    assert wait_for(lambda: b.stats().mirrors["duckdb"].errors >= 1)
    assert "another log" in (b.stats().mirrors["duckdb"].last_error or "")
    assert b.stats().entries_written == 100
    b.close(timeout=1)
    assert read_duckdb(mirror_path) == ledger(tmp_path / "a.db")


@pytest.mark.parametrize(
    ("path", "kind"),
    [("audit.duckdb", DuckDBMirror), ("segments/", ParquetMirror), ("existing", ParquetMirror)],
)
def test_duckdb_path_chooses_file_or_segments(tmp_path: Path, path: str, kind: type) -> None:
    (tmp_path / "existing").mkdir()
    assert isinstance(duckdb_mirror(str(tmp_path) + "/" + path), kind)


def test_bigquery_sink_needs_its_section(tmp_path: Path) -> None:
    # the config refuses it at start, naming the key; build_mirrors keeps its own check too
    with pytest.raises(ConfigError, match="audit: .*bigquery"):
        parse_config({"audit": {"sinks": ["sqlite", "bigquery"]}}, "c.yaml")
    with pytest.raises(ConfigError, match="audit.bigquery"):
        build_mirrors(Audit.model_construct(sinks=["sqlite", "bigquery"], bigquery=None), tmp_path / "a.db")
    assert build_mirrors(Audit(sinks=["sqlite"]), tmp_path / "a.db") == []


def test_parquet_segments_are_whole_files(tmp_path: Path) -> None:
    folder = tmp_path / "segments"
    w = AuditWriter(
        Audit(sqlite_path=str(tmp_path / "audit.db")),
        mirrors=[ParquetMirror(folder, segment_interval_s=0.0)],
        **FAST,
    )
    w.start()
    for k in range(1, 4):
        write_entries(w, (k - 1) * 100, 100)
        assert wait_for(lambda: w.stats().mirrors["duckdb"].mirrored_seq == k * 100)  # noqa: B023
    w.close()
    segs = ParquetMirror(folder).segments()
    assert segs[0][0] == 1 and segs[-1][1] == 300
    assert all(
        a[1] + 1 == b[0] for a, b in zip(segs, segs[1:], strict=False)
    )  # contiguous, no overlap
    assert not list(folder.glob("*.tmp"))
