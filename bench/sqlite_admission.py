"""An idle user's admission in the SQLite state store, on its own: what it costs and writes.

Scenario 3's 24 users each send a request every ~5 s, so each request makes the exact admission
call before it is forwarded: the rate step (`rate_hit`) and the budget reservation (`reserve`)
in one write transaction, run on the event loop (`call_without_waiting(run_calls, ...)`, as
state/calls.py does), and a settle after the answer. This runs the same store calls for 24
users, with `--gap-ms` of sleep before each (the caches go cold, as between requests in the
server), after `--rows` finished reservations were put in the database (a week is kept:
FINISHED_RESERVATION_TTL_S), and prints, as JSON: the median thread CPU of the admission and
the settle, back to back and after the gap; the reads from the database files each made (the
page cache's misses: a pread each); and which B-trees each commit wrote to the WAL (a 4 KB
frame each). Only the store's part of the admission is here: the Python of governance/ around it
(RateLimiter.check, Ledger.reserve) is not.

Run with the project's environment: .venv/bin/python bench/sqlite_admission.py --rows 1000000
(`--random-ids`: reservation ids as uuid4, as before state/ids.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from candela_mitm.state.ids import ordered_id
from candela_mitm.state.ports import NewReservation, run_calls
from candela_mitm.state.sqlite import SqliteStateStore

USERS = 24
DAY = "2027-01-15"
FRAME = 4096 + 24  # a WAL frame: its header and a page


def fill(store: SqliteStateStore, rows: int, start_us: int) -> None:
    """`rows` finished reservations, 5 a second before `start_us`, with uuid4 ids as made before
    ordered ids (a database that ran before them holds those)."""
    c = store._conn()
    c.execute("BEGIN IMMEDIATE")
    c.executemany(
        "INSERT INTO reservations (reservation_id, user_id, tenant, day, amount, budget, "
        "daily_hold, grant_holds, request_id, owner, created_us, status, model, provider, "
        "period, tenant_period, tenant_hold, cost, finished_us) VALUES (?, ?, 'research-team', "
        "?, 2000000, 0, 2000000, '{}', 'req', 'gone:1', ?, 'settled', 'm', 'openai', ?, ?, "
        "2000000, 1500000, ?)",
        (
            ("r_" + uuid.uuid4().hex, f"user{i % USERS:03d}", DAY, start_us - (rows - i) * 200_000,
             DAY, DAY, start_us - (rows - i) * 200_000 + 5_000)
            for i in range(rows)
        ),
    )
    c.execute("COMMIT")
    store.checkpoint()


def reads_so_far() -> int:
    """read-type system calls of this thread so far (its own reads of the count included)"""
    with open("/proc/thread-self/io", "rb") as f:
        for line in f.read().splitlines():
            if line.startswith(b"syscr:"):
                return int(line.split()[1])
    return 0


def own_reads() -> int:
    """what reads_so_far() adds to the count by itself"""
    first = reads_so_far()
    return reads_so_far() - first


def measure(directory: Path, rows: int, calls: int, gap_s: float, random_ids: bool) -> dict[str, Any]:
    store = SqliteStateStore(directory / "state.db")
    now = [1_800_000_000_000_000]
    if rows:
        fill(store, rows, now[0])
    shm, wal = f"{store.path}-shm", f"{store.path}-wal"

    def admit(i: int) -> str:
        user = f"user{i % USERS:03d}"
        assert store.rate_hit(user, 10**9, 60_000_000, now[0]).allowed
        rid = "r_" + uuid.uuid4().hex if random_ids else ordered_id("r_")
        new = NewReservation(rid, user, "research-team", DAY, 2_000_000, 10**18, "req", "o:1",
                             now[0], "m", "openai", DAY, None, DAY)
        assert store.reserve(new).ok
        return rid

    def settle(rid: str) -> object:
        return store.settle(rid, 1_500_000, 20, 16, "m", "openai", now[0] + 5_000)

    def call(fn: Callable[..., Any], *args: Any) -> Any:
        ok, value = store.call_without_waiting(run_calls, store, [(fn, args)])[0]
        assert ok, value
        return value

    def frames_end() -> int:  # the WAL index header's mxFrame
        with open(shm, "rb") as f:
            return int(struct.unpack("=I", f.read(20)[16:20])[0])

    out: dict[str, Any] = {"rows": rows, "random_ids": random_ids, "gap_ms": gap_s * 1000}
    itself = own_reads()
    for label, gap, n in (("warm_up", 0.0, 600), ("back_to_back", 0.0, calls), ("after_gap", gap_s, calls)):
        admits, settles, reads = [], [], []
        for i in range(n):
            now[0] += 200_000
            if gap:
                time.sleep(gap)
            r0 = reads_so_far()
            t0 = time.thread_time_ns()
            rid = call(admit, i)
            t1 = time.thread_time_ns()
            r1 = reads_so_far()
            call(settle, rid)
            t2 = time.thread_time_ns()
            admits.append(t1 - t0)
            settles.append(t2 - t1)
            reads.append(r1 - r0 - itself)
        if label != "warm_up":
            out[label] = {
                "admission_cpu_us": round(statistics.median(admits) / 1e3, 1),
                "settle_cpu_us": round(statistics.median(settles) / 1e3, 1),
                "db_reads_per_admission": round(statistics.mean(reads), 2),
            }
    # which B-trees an admission and a settle write, per call over one round of the users
    # (dbstat names each page's owner; a page new since is named by its number)
    store.checkpoint()
    owner = dict(store._conn().execute("SELECT pageno, name FROM dbstat").fetchall())

    def written(fn: Callable[..., Any], *args: Any) -> tuple[Any, list[str]]:
        first = frames_end()
        result = call(fn, *args)
        names = []
        with open(wal, "rb") as f:
            for k in range(first, frames_end()):
                f.seek(32 + k * FRAME)
                (page,) = struct.unpack(">I", f.read(4))
                names.append(str(owner.get(page, "new page")))
        return result, names

    tally: dict[str, Counter[str]] = {"admission": Counter(), "settle": Counter()}
    for i in range(USERS):
        now[0] += 200_000
        rid, names = written(admit, i)
        tally["admission"].update(names)
        tally["settle"].update(written(settle, rid)[1])
    for what, counts in tally.items():
        out[f"{what}_frames"] = round(sum(counts.values()) / USERS, 2)
        out[f"{what}_writes"] = {k: round(v / USERS, 2) for k, v in counts.most_common()}
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=0, help="finished reservations put in first")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=20.0)
    ap.add_argument("--random-ids", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        print(json.dumps(measure(Path(d), a.rows, a.calls, a.gap_ms / 1000, a.random_ids)))


if __name__ == "__main__":
    main()
