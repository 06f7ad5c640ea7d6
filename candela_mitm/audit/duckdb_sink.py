"""The DuckDB audit mirror: one database file, or a folder of immutable Parquet segments."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import duckdb

from candela_mitm.audit.chain import Row

# ts is TIMESTAMP holding UTC: TIMESTAMPTZ values need pytz to reach Python, which we don't ship.
AUDIT_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS {name} (
    seq BIGINT NOT NULL,
    ts TIMESTAMP NOT NULL,
    action VARCHAR NOT NULL,
    user_id VARCHAR,
    tenant_id VARCHAR,
    fields JSON NOT NULL,
    prev_hash VARCHAR NOT NULL,
    hash VARCHAR NOT NULL
)
"""

_SEGMENT = re.compile(r"^audit-(\d{12})-(\d{12})\.parquet$")


def create_audit_table(con: duckdb.DuckDBPyConnection, name: str = "audit") -> None:
    con.execute(AUDIT_TABLE_DDL.format(name=name))


def append_rows(
    con: duckdb.DuckDBPyConnection, rows: Iterable[Sequence[object]], name: str = "audit"
) -> None:
    """Bulk-insert ledger rows with DuckDB's appender (row-by-row INSERT is ~100x slower)."""
    with con.appender(name) as appender:
        appender.append_rows(rows)


def sql_string(value: str) -> str:
    """A SQL string literal, for the statements (COPY) that take no parameters."""
    return "'" + value.replace("'", "''") + "'"


def duckdb_mirror(path: str) -> DuckDBMirror | ParquetMirror:
    """audit.duckdb_path: a folder (existing, or written with a trailing /) means Parquet segments."""
    p = Path(path).expanduser()
    if path.endswith(("/", os.sep)) or p.is_dir():
        return ParquetMirror(p)
    return DuckDBMirror(p)


class DuckDBMirror:
    """Mirror into a DuckDB file; the feeding process keeps it open (DuckDB's one writer)."""

    name = "duckdb"
    batch_max = 50_000
    min_interval_s = 0.2  # group small commits: each DuckDB commit costs more than an append

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._con: duckdb.DuckDBPyConnection | None = None

    def open(self) -> tuple[int, str | None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.path))
        try:
            create_audit_table(con)
            got = con.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        except BaseException:
            con.close()
            raise
        self._con = con
        return (0, None) if got is None else (int(got[0]), str(got[1]))

    def write(self, rows: Sequence[Row]) -> None:
        con = self._con
        assert con is not None, "open() first"
        # One transaction, so the head that open() reads after a crash is exact: no gap, no repeat.
        con.begin()
        try:
            append_rows(con, rows)
            con.commit()
        except BaseException:
            con.rollback()
            raise

    def close(self) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            con.close()


class ParquetMirror:
    """Mirror into Parquet files named audit-<first seq>-<last seq>.parquet, each written once.

    Files are written to a temporary name and renamed, so readers (including other processes,
    which a DuckDB file would lock out) only ever see whole segments.
    """

    name = "duckdb"
    batch_max = 100_000

    def __init__(self, folder: str | Path, segment_interval_s: float = 10.0) -> None:
        self.folder = Path(folder).expanduser()
        self.min_interval_s = segment_interval_s
        self._con: duckdb.DuckDBPyConnection | None = None

    def segments(self) -> list[tuple[int, int, Path]]:
        found = []
        for entry in self.folder.iterdir():
            m = _SEGMENT.match(entry.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), entry))
        return sorted(found)

    def open(self) -> tuple[int, str | None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob("*.parquet.tmp"):
            leftover.unlink()
        self._con = duckdb.connect()
        segs = self.segments()
        if not segs:
            return 0, None
        _, last, path = segs[-1]
        got = self._con.execute(
            f"SELECT hash FROM read_parquet({sql_string(str(path))}) WHERE seq = ?", [last]
        ).fetchone()
        return last, None if got is None else str(got[0])

    def write(self, rows: Sequence[Row]) -> None:
        con = self._con
        assert con is not None, "open() first"
        name = f"audit-{rows[0][0]:012d}-{rows[-1][0]:012d}.parquet"
        tmp = self.folder / (name + ".tmp")
        con.execute("DROP TABLE IF EXISTS segment")
        create_audit_table(con, "segment")
        append_rows(con, rows, "segment")
        con.execute(f"COPY segment TO {sql_string(str(tmp))} (FORMAT parquet, COMPRESSION zstd)")
        con.execute("DROP TABLE segment")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            con.close()
