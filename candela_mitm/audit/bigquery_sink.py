"""The BigQuery audit mirror: streaming inserts (tabledata.insertAll) with the official client."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from candela_mitm.audit.chain import Row
from candela_mitm.config import BigQuery

SCHEMA = [
    ("seq", "INTEGER", "REQUIRED"),
    ("ts", "TIMESTAMP", "REQUIRED"),
    ("action", "STRING", "REQUIRED"),
    ("user_id", "STRING", "NULLABLE"),
    ("tenant_id", "STRING", "NULLABLE"),
    ("fields", "JSON", "REQUIRED"),
    ("prev_hash", "STRING", "REQUIRED"),
    ("hash", "STRING", "REQUIRED"),
]


def row_json(row: Row) -> dict[str, Any]:
    return {
        "seq": row[0],
        "ts": row[1],
        "action": row[2],
        "user_id": row[3],
        "tenant_id": row[4],
        "fields": row[5],  # a JSON column takes the JSON text
        "prev_hash": row[6],
        "hash": row[7],
    }


class BigQueryMirror:
    """Mirror into a BigQuery table, creating dataset and table if missing.

    BigQuery has no cheap "newest row" read, so the progress lives in a cursor file beside the
    ledger, written atomically after each accepted insert. A crash between the insert and the
    cursor write re-sends that batch; the insertId (seq and hash) lets BigQuery drop the repeat.
    The client's own retry is off: the feeder retries, with backoff, and counts every failure.
    """

    name = "bigquery"
    batch_max = 500  # rows per insertAll, as BigQuery recommends
    min_interval_s = 0.0

    def __init__(self, cfg: BigQuery, cursor_path: Path, timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self.cursor_path = cursor_path
        self.timeout_s = timeout_s
        self.table_id = f"{cfg.project}.{cfg.dataset}.{cfg.table}"
        self._client: Any = None

    def _make_client(self) -> Any:
        from google.api_core.client_options import ClientOptions
        from google.cloud import bigquery

        credentials = None
        if self.cfg.credentials == "anonymous":
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()
        options = ClientOptions(api_endpoint=self.cfg.endpoint) if self.cfg.endpoint else None
        return bigquery.Client(
            project=self.cfg.project, credentials=credentials, client_options=options
        )

    def open(self) -> tuple[int, str | None]:
        from google.cloud import bigquery

        client = self._make_client()
        dataset = bigquery.Dataset(f"{self.cfg.project}.{self.cfg.dataset}")
        client.create_dataset(dataset, exists_ok=True, retry=None, timeout=self.timeout_s)
        schema = [bigquery.SchemaField(n, t, mode=m) for n, t, m in SCHEMA]
        table = bigquery.Table(self.table_id, schema=schema)
        client.create_table(table, exists_ok=True, retry=None, timeout=self.timeout_s)
        self._client = client
        return self._read_cursor()

    def _read_cursor(self) -> tuple[int, str | None]:
        try:
            data = json.loads(self.cursor_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0, None
        if data.get("table") != self.table_id:
            return 0, None  # a new table starts from the first entry
        return int(data["seq"]), str(data["hash"])

    def _write_cursor(self, seq: int, digest: str) -> None:
        tmp = self.cursor_path.with_name(self.cursor_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"table": self.table_id, "seq": seq, "hash": digest}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.cursor_path)

    def write(self, rows: Sequence[Row]) -> None:
        assert self._client is not None, "open() first"
        errors = self._client.insert_rows_json(
            self.table_id,
            [row_json(r) for r in rows],
            row_ids=[f"{r[0]}-{r[7][:16]}" for r in rows],
            retry=None,
            timeout=self.timeout_s,
        )
        if errors:
            raise RuntimeError(f"BigQuery rejected {len(errors)} of {len(rows)} rows: {errors[0]}")
        self._write_cursor(rows[-1][0], rows[-1][7])

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()
