"""Reading the audit log: DuckDB SQL over a fresh snapshot, exports, the admin API's listing, and
spend per hour for the laptop UI."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import duckdb

from candela_mitm.audit.actions import ADMIN_ACTION, LLM_REQUEST
from candela_mitm.audit.chain import ROW_COLUMNS, ProgressFn, Row, connect_readonly
from candela_mitm.audit.duckdb_sink import create_audit_table, sql_string
from candela_mitm.audit.journal import wait_for_journals
from candela_mitm.audit.sqlite_sink import as_dict

# How long a reader waits for the running proxies' journaled entries to reach the ledger.
JOURNALS_WAIT_S = 2.0

COLUMNS = ROW_COLUMNS.split(", ")
_CHUNK = 50_000


def parse_time(value: str | datetime) -> str:
    """An ISO 8601 date or time (naive means UTC) in the ledger's fixed-width UTC text form."""
    if isinstance(value, datetime):
        moment = value
    else:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an ISO 8601 date or time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _select(since: str | None, until: str | None) -> tuple[str, list[Any]]:
    where, args = [], []
    if since is not None:
        where.append("ts >= ?")
        args.append(parse_time(since))
    if until is not None:
        where.append("ts < ?")
        args.append(parse_time(until))
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {ROW_COLUMNS} FROM audit_log{clause} ORDER BY seq", args


def iter_rows(
    db_path: str | Path, since: str | None = None, until: str | None = None
) -> Iterator[list[Row]]:
    """Ledger rows in seq order, in chunks, from one read snapshot (since inclusive, until exclusive)."""
    conn = connect_readonly(db_path)
    try:
        sql, args = _select(since, until)
        cur = conn.execute(sql, args)
        while chunk := cur.fetchmany(_CHUNK):
            yield chunk
    finally:
        conn.close()


def load_duckdb(
    db_path: str | Path,
    since: str | None = None,
    until: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[duckdb.DuckDBPyConnection, int]:
    """An in-memory DuckDB holding table `audit`, copied from the ledger now; (connection, rows).

    DuckDB cannot read SQLite without the sqlite_scanner extension (not available offline) and
    the mirror file is locked by the proxy, so each query copies the ledger through the appender.
    """
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    create_audit_table(con)
    count = 0
    with con.appender("audit") as appender:
        for chunk in iter_rows(db_path, since, until):
            appender.append_rows(chunk)
            count += len(chunk)
            if progress is not None:
                progress(count, None)
    return con, count


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]


def run_query(db_path: str | Path, sql: str) -> QueryResult:
    """Run DuckDB SQL against table `audit` (the whole log as of now)."""
    con, _ = load_duckdb(db_path)
    try:
        cur = con.execute(sql)
        if cur.description is None:
            return QueryResult([], [], [])
        return QueryResult(
            [d[0] for d in cur.description], [str(d[1]) for d in cur.description], cur.fetchall()
        )
    finally:
        con.close()


def _plain(value: Any, type_name: str = "") -> Any:
    if type_name == "JSON" and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def render(
    result: QueryResult, fmt: Literal["table", "csv", "json"] = "table", max_width: int = 80
) -> str:
    """Format a result: an aligned text table (cells cut at max_width), CSV, or a JSON array."""
    if fmt == "json":
        objs = [
            {c: _plain(v, t) for c, t, v in zip(result.columns, result.types, row, strict=True)}
            for row in result.rows
        ]
        return json.dumps(objs, ensure_ascii=False, indent=None) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(result.columns)
        for row in result.rows:
            w.writerow(["" if v is None else _cell(v) for v in row])
        return buf.getvalue()
    if not result.columns:
        return ""
    cells = [[_cell(v) for v in row] for row in result.rows]
    cells = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row] for row in cells]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(result.columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''})")
    return "\n".join(lines) + "\n"


def export(
    db_path: str | Path,
    fmt: Literal["parquet", "csv", "jsonl"],
    out: str | Path,
    since: str | None = None,
    until: str | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Write the entries with since <= ts < until to out; returns how many.

    CSV and JSON Lines carry every column as stored (prev_hash and hash included), so an export
    can be re-verified offline. The file appears under its name only once complete.
    """
    target = Path(out).expanduser()
    tmp = target.with_name(target.name + ".tmp")
    if progress is not None:
        progress(0, None)
    try:
        if fmt == "parquet":
            con, count = load_duckdb(db_path, since, until, progress)
            try:
                con.execute(
                    f"COPY audit TO {sql_string(str(tmp))} (FORMAT parquet, COMPRESSION zstd)"
                )
            finally:
                con.close()
        else:
            count = 0
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
                if writer is not None:
                    writer.writerow(COLUMNS)
                for chunk in iter_rows(db_path, since, until):
                    if writer is not None:
                        writer.writerows(chunk)
                    else:
                        f.writelines(
                            json.dumps(as_dict(r), ensure_ascii=False) + "\n" for r in chunk
                        )
                    count += len(chunk)
                    if progress is not None:
                        progress(count, None)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


@dataclass(frozen=True)
class AuditScope:
    """The entries a tenant admin may read: those of its tenants, and the admin actions it made
    or that target one of `targets` (its tenants and the users it manages)."""

    tenants: frozenset[str]
    actor: str
    targets: frozenset[str]

    def clause(self) -> tuple[str, list[Any]]:
        tenants, targets = sorted(self.tenants), sorted(self.targets)
        marks = ", ".join("?" * len(tenants)) or "NULL"
        target_marks = ", ".join("?" * len(targets)) or "NULL"
        sql = (
            f"(tenant_id IN ({marks}) OR (action = ? AND (user_id = ? OR "
            f"json_extract(fields, '$.target') IN ({target_marks}))))"
        )
        return sql, [*tenants, ADMIN_ACTION, self.actor, *targets]


def query_entries(
    db_path: str | Path,
    action: str | None = None,
    user: str | None = None,
    since: str | datetime | None = None,
    limit: int = 100,
    *,
    tenant: str | None = None,
    before_seq: int | None = None,
    scope: AuditScope | None = None,
    journals_wait_s: float = JOURNALS_WAIT_S,
) -> list[dict[str, Any]]:
    """Entries newest first, for GET /admin/v1/audit; before_seq pages further back.

    user matches user_id: the requesting user, or for admin actions the admin who acted.
    scope, when given, keeps only the entries it allows. The entries the running proxies
    journaled are waited for first (at most `journals_wait_s`: they reach the ledger within
    `audit.journal_chain_delay_ms`, audit/journal.py).
    Blocking file I/O: call it from a thread (asyncio.to_thread) inside the proxy.
    """
    if journals_wait_s > 0:
        wait_for_journals(db_path, journals_wait_s)
    where: list[str] = []
    args: list[Any] = []
    if scope is not None:
        sql, scope_args = scope.clause()
        where.append(sql)
        args.extend(scope_args)
    for column, value in (("action", action), ("user_id", user), ("tenant_id", tenant)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("ts >= ?")
        args.append(parse_time(since))
    if before_seq is not None:
        where.append("seq < ?")
        args.append(before_seq)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    args.append(max(1, min(int(limit), 10_000)))
    conn = connect_readonly(db_path)
    try:
        cur = conn.execute(
            f"SELECT {ROW_COLUMNS} FROM audit_log{clause} ORDER BY seq DESC LIMIT ?", args
        )
        return [as_dict(r) for r in cur]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    finally:
        conn.close()


def _charged_naming(
    db_path: str | Path, field: str, ids: set[str], since: datetime
) -> Iterator[dict[str, Any]]:
    """The fields of the llm_request entries committed since `since` that charged their request
    (`usage_source` set) and whose `field` is one of `ids`, in commit order. Reads the log's
    tail in SQLite's JSON code, 500 ids a query."""
    path = Path(db_path).expanduser()
    if not ids or not path.exists():
        return
    conn = connect_readonly(path)
    try:
        wanted = sorted(ids)
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            cur = conn.execute(
                "SELECT fields FROM audit_log WHERE action = ? AND ts >= ? AND "
                f"json_extract(fields, '$.{field}') IN ({marks}) ORDER BY seq",
                [LLM_REQUEST, parse_time(since), *part],
            )
            for (text,) in cur:
                fields = json.loads(text)
                if fields.get("usage_source") is not None:
                    yield fields
    except sqlite3.OperationalError as e:
        if "no such table" not in str(e):
            raise
    finally:
        conn.close()


def charged_entries(
    db_path: str | Path, spans: set[str], since: datetime
) -> dict[str, dict[str, Any]]:
    """The fields of the llm_request entries of `spans` committed since `since` that charged
    their request (`usage_source` set), by span id: what a restart settles the reservations of
    a dead process at (governance/reconcile.py)."""
    found: dict[str, dict[str, Any]] = {}
    for fields in _charged_naming(db_path, "span_id", spans, since):
        found.setdefault(str(fields["span_id"]), fields)
    return found


def sliced_entries(
    db_path: str | Path, slices: set[str], since: datetime
) -> dict[str, list[dict[str, Any]]]:
    """The fields of the charged llm_request entries naming each of `slices` (`slice_id`: the
    budget slice their hold was carved from) committed since `since`, in commit order: what a
    restart settles a dead process's slice from (governance/reconcile.py)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for fields in _charged_naming(db_path, "slice_id", slices, since):
        found.setdefault(str(fields["slice_id"]), []).append(fields)
    return found


# -- spend over the day (the laptop UI's chart) -----------------------------------------------


def hourly_spend(audit_db: Path, user: str, day: date) -> list[float]:
    """USD spent by `user` in each UTC hour of `day`, from the audit log's llm_request entries
    (the running proxies' journaled ones waited for first, as query_entries does)."""
    hours = [0.0] * 24
    if not audit_db.exists():
        return hours
    wait_for_journals(audit_db, JOURNALS_WAIT_S)
    start = f"{day.isoformat()}T00:00:00.000000Z"
    end = f"{(day + timedelta(days=1)).isoformat()}T00:00:00.000000Z"
    conn = connect_readonly(audit_db)
    try:
        rows = conn.execute(
            "SELECT CAST(substr(ts, 12, 2) AS INTEGER), "
            "SUM(CAST(json_extract(fields, '$.cost_usd') AS REAL)) FROM audit_log "
            "WHERE ts >= ? AND ts < ? AND action = ? AND user_id = ? GROUP BY 1",
            (start, end, LLM_REQUEST, user),
        ).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return hours
        raise
    finally:
        conn.close()
    for hour, usd in rows:
        if isinstance(hour, int) and 0 <= hour < 24 and usd is not None and math.isfinite(usd):
            hours[hour] = float(usd)
    return hours


# -- request entries (policy replay) ----------------------------------------------------------


def request_entries(
    source: str | Path, since: str | datetime | None = None
) -> Iterator[dict[str, Any]]:
    """The `llm_request` entries with ts >= since, in seq order, as `as_dict` shows them.

    `source` is the SQLite ledger, or a Parquet export (`candela audit export --format
    parquet`) or a folder of the DuckDB mirror's Parquet segments, read with DuckDB.
    """
    path = Path(source).expanduser()
    if path.is_dir() or path.suffix == ".parquet":
        glob = str(path / "*.parquet") if path.is_dir() else str(path)
        con = duckdb.connect()
        try:
            con.execute("SET TimeZone = 'UTC'")
            sql = (
                f"SELECT {ROW_COLUMNS} FROM read_parquet({sql_string(glob)}) WHERE action = ?"
            )
            args: list[Any] = [LLM_REQUEST]
            if since is not None:
                sql += " AND ts >= CAST(? AS TIMESTAMP)"
                args.append(parse_time(since).rstrip("Z"))
            cur = con.execute(sql + " ORDER BY seq", args)
            while chunk := cur.fetchmany(_CHUNK):
                for row in chunk:
                    d = as_dict(row)
                    d["ts"] = parse_time(d["ts"])
                    yield d
        finally:
            con.close()
        return
    wait_for_journals(path, JOURNALS_WAIT_S)  # the running proxies' journaled entries
    for chunk in iter_rows(path, None if since is None else parse_time(since)):
        for row in chunk:
            if row[2] == LLM_REQUEST:
                yield as_dict(row)
