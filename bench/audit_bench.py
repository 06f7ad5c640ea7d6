"""Audit ledger write throughput: entries per second the AuditWriter commits to SQLite (on disk).

Each entry has the fields of a proxied request's `llm_request` entry. The clock runs from the
first `record()` to the end of `flush()` (every entry committed and fsynced, chained and
hashed). Run with the project's environment: .venv/bin/python bench/audit_bench.py --dir DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from candela_mitm.audit import AuditWriter
from candela_mitm.config import Audit


def entry(i: int) -> dict[str, object]:
    return {
        "user_id": f"user{i % 64}@bench.example",
        "tenant_id": "research-team",
        "via": "api_key",
        "key_id": "1d7ab44a",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "method": "POST",
        "route": "proxy",
        "path": None,
        "decision": "allowed",
        "reason": None,
        "status": 200,
        "stream": False,
        "input_tokens": 12,
        "output_tokens": 16,
        "cached_tokens": 0,
        "cost_usd": 1.14e-05,
        "estimate_usd": 2.1e-05,
        "duration_ms": 1.234,
        "span_id": f"{i:016x}",
        "trace_id": f"{i:032x}",
        "client_address": "127.0.0.1",
    }


def run(directory: Path, n: int, durable_every: int) -> dict[str, object]:
    db = directory / "audit-bench.db"
    cfg = Audit(sqlite_path=str(db), queue_max_entries=max(n + 10, 100_000))
    w = AuditWriter(cfg)
    w.start()
    try:
        start = time.perf_counter()
        futures = []
        for i in range(n):
            if durable_every and i % durable_every == 0:
                futures.append(w.record_durable("llm_request", **entry(i)))
            elif not w.record("llm_request", **entry(i)):
                raise RuntimeError("the audit queue refused an entry")
        queued = time.perf_counter()
        if not w.flush(timeout=120):
            raise RuntimeError("flush timed out")
        for f in futures:
            f.result(timeout=10)
        end = time.perf_counter()
        stats = w.stats()
    finally:
        w.close()
    return {
        "entries": n,
        "durable_every": durable_every,
        "seconds": round(end - start, 3),
        "entries_per_s": round(n / (end - start)),
        "record_us_per_entry": round((queued - start) / n * 1e6, 2),
        "batches": stats.batches_written,
        "entries_written": stats.entries_written,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", help="where the ledger file goes (default: a temporary folder)")
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--durable-every", type=int, default=0,
                   help="every Nth entry waits to be durable, as a proxied request does (0: none)")
    a = p.parse_args(argv)
    if a.dir:
        d = Path(a.dir)
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("audit-bench.db*"):  # the ledger, its log, its journals' folder
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
        out = run(d, a.entries, a.durable_every)
    else:
        with tempfile.TemporaryDirectory() as t:
            out = run(Path(t), a.entries, a.durable_every)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
