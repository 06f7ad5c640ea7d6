"""How much slower the same work runs after the pause between requests at concurrency 1.

Scenario 1 sends 50 requests/s: between two requests the proxy sleeps about 20 ms, and on a
shared machine that is long enough for its code and data to leave the CPU caches. This probe
times two pieces of Candela's request path in this process, back to back and with a 20 ms sleep
before each, in thread CPU time (what the latency pays): a rate-limit check in the SQLite state
store (one write transaction, as on the request path) and an `llm_request` audit entry's
preparation (redaction and canonical JSON, as on the response path). The ratio says how much of
a request's cost at concurrency 1 is the machine's, not the code's.

Run with the project's environment: .venv/bin/python bench/coldprobe.py --dir DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from audit_bench import entry  # bench/ is the script's directory, first on sys.path

from candela_mitm.audit.chain import fields_json
from candela_mitm.audit.redaction import redact
from candela_mitm.state.sqlite import SqliteStateStore


def cpu_us(work: Callable[[], object], n: int, gap_s: float) -> float:
    """Median thread CPU time of `work`, in µs, over n calls each after sleeping gap_s."""
    times = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.thread_time()
        work()
        times.append(time.thread_time() - t0)
    return round(statistics.median(times) * 1e6, 1)


def probe(directory: Path, n: int, gap_s: float) -> dict[str, object]:
    store = SqliteStateStore(directory / "coldprobe-state.db")
    clock = iter(range(10**12))
    fields = entry(1)

    def rate_check() -> object:
        return store.rate_hit("user", 10**9, 60_000_000, next(clock))

    def audit_entry() -> object:
        return fields_json(redact(fields))

    out: dict[str, object] = {"gap_ms": gap_s * 1000, "calls": n}
    try:
        for name, work in (("rate_check_txn", rate_check), ("audit_entry", audit_entry)):
            cpu_us(work, 50, 0)  # warm up: connection, statement cache
            warm = cpu_us(work, n, 0)
            cold = cpu_us(work, n, gap_s)
            out[name] = {"back_to_back_us": warm, "after_gap_us": cold,
                         "factor": round(cold / warm, 2) if warm else None}
    finally:
        store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=20.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        print(json.dumps(probe(Path(d), a.calls, a.gap_ms / 1000)))


if __name__ == "__main__":
    main()
