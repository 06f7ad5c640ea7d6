"""A local fake of the BigQuery REST API (datasets, tables, tabledata.insertAll) for audit tests."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_BASE = "/bigquery/v2"
_DATASETS = re.compile(rf"^{_BASE}/projects/([^/]+)/datasets$")
_DATASET = re.compile(rf"^{_BASE}/projects/([^/]+)/datasets/([^/]+)$")
_TABLES = re.compile(rf"^{_BASE}/projects/([^/]+)/datasets/([^/]+)/tables$")
_TABLE = re.compile(rf"^{_BASE}/projects/([^/]+)/datasets/([^/]+)/tables/([^/]+)$")
_INSERT = re.compile(rf"^{_BASE}/projects/([^/]+)/datasets/([^/]+)/tables/([^/]+)/insertAll$")


@dataclass
class FakeTable:
    resource: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    insert_ids: set[str] = field(default_factory=set)


class FakeBigQuery:
    """Serve the BigQuery v2 endpoints the audit mirror uses on 127.0.0.1, recording what arrives.

    Fault injection: ``fail_status`` (e.g. 500) answers every request with that status until reset
    to None; ``fail_next`` answers that many more requests with ``fail_status or 500``;
    ``insert_errors_next`` answers that many insertAll requests 200 with an insertErrors entry and
    stores none of their rows (BigQuery's behaviour without skipInvalidRows).
    """

    def __init__(self) -> None:
        self.datasets: dict[tuple[str, str], dict[str, Any]] = {}
        self.tables: dict[tuple[str, str, str], FakeTable] = {}
        self.requests: list[tuple[str, str]] = []
        self.failed_requests = 0
        self.fail_status: int | None = None
        self.fail_next = 0
        self.insert_errors_next = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def rows(self, project: str, dataset: str, table: str) -> list[dict[str, Any]]:
        with self._lock:
            t = self.tables.get((project, dataset, table))
            return [] if t is None else list(t.rows)

    def __enter__(self) -> FakeBigQuery:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path))
            if self.fail_status is not None or self.fail_next > 0:
                self.fail_next = max(0, self.fail_next - 1)
                self.failed_requests += 1
                status = self.fail_status or 500
                return status, {
                    "error": {"code": status, "message": "injected failure", "errors": []}
                }
            if method == "POST" and (m := _DATASETS.match(path)):
                project = m.group(1)
                ref = body["datasetReference"]
                key = (project, ref["datasetId"])
                if key in self.datasets:
                    return 409, {"error": {"code": 409, "message": "Already Exists: dataset"}}
                self.datasets[key] = {**body, "id": f"{project}:{ref['datasetId']}"}
                return 200, self.datasets[key]
            if method == "GET" and (m := _DATASET.match(path)):
                found = self.datasets.get((m.group(1), m.group(2)))
                return (
                    (200, found)
                    if found
                    else (404, {"error": {"code": 404, "message": "Not found"}})
                )
            if method == "POST" and (m := _TABLES.match(path)):
                ref = body["tableReference"]
                if (m.group(1), m.group(2)) not in self.datasets:
                    return 404, {"error": {"code": 404, "message": "Not found: dataset"}}
                key3 = (m.group(1), m.group(2), ref["tableId"])
                if key3 in self.tables:
                    return 409, {"error": {"code": 409, "message": "Already Exists: table"}}
                self.tables[key3] = FakeTable(resource=body)
                return 200, body
            if method == "GET" and (m := _TABLE.match(path)):
                t = self.tables.get((m.group(1), m.group(2), m.group(3)))
                return (
                    (200, t.resource)
                    if t
                    else (404, {"error": {"code": 404, "message": "Not found"}})
                )
            if method == "POST" and (m := _INSERT.match(path)):
                t = self.tables.get((m.group(1), m.group(2), m.group(3)))
                if t is None:
                    return 404, {"error": {"code": 404, "message": "Not found: table"}}
                if self.insert_errors_next > 0:
                    self.insert_errors_next -= 1
                    self.failed_requests += 1
                    bad = {"index": 0, "errors": [{"reason": "invalid", "message": "injected"}]}
                    return 200, {
                        "kind": "bigquery#tableDataInsertAllResponse",
                        "insertErrors": [bad],
                    }
                for item in body.get("rows", []):
                    insert_id = item.get("insertId")
                    if insert_id is not None and insert_id in t.insert_ids:
                        continue  # BigQuery's best-effort de-duplication
                    if insert_id is not None:
                        t.insert_ids.add(insert_id)
                    t.rows.append(item["json"])
                return 200, {"kind": "bigquery#tableDataInsertAllResponse"}
            return 404, {"error": {"code": 404, "message": f"no route {method} {path}"}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, answer = fake._answer(method, self.path.split("?", 1)[0], body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
