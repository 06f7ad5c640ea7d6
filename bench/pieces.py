"""The per-request fixed cost of Candela's governance, piece by piece, in one plain process.

Issue 21: at concurrency 1 nothing is shared, so each request pays its own store transactions,
its own audit commit and its thread hand-offs. py-spy at one request at a time gives few
samples per piece and moves with whatever else runs on a shared machine; this times each piece
alone, in a loop, as the request path runs it: thread CPU (what the event loop pays) and, for
the audit commit and the hand-off, wall time (what the answer waits). Medians over `--calls`,
repeated `--repeat` times: the spread of the repeats is the noise.

Run with the project's environment: .venv/bin/python bench/pieces.py [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audit_bench import entry  # bench/ is the script's directory, first on sys.path

from candela_mitm.audit.chain import fields_json
from candela_mitm.audit.redaction import redact
from candela_mitm.audit.writer import AuditWriter
from candela_mitm.config import Audit, State, parse_config
from candela_mitm.governance.estimate import estimate_cost, scan
from candela_mitm.governance.ledger import Ledger, Reservation
from candela_mitm.governance.rate_leases import LeaseRules, RateLeases
from candela_mitm.governance.ratelimit import RateLimiter
from candela_mitm.governance.slices import SliceRules, Slices
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage
from candela_mitm.state import open_state_store
from candela_mitm.state.ports import StateStore, run_calls, to_us, utc_now

BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. " * 4},
            {"role": "user", "content": "Summarise the following text. " + "lorem ipsum " * 40},
        ],
        "max_tokens": 256,
        "temperature": 0.2,
    }
).encode()


def timed(work: Callable[[], object], n: int) -> tuple[float, float]:
    """Medians of thread CPU and of wall time around each of n calls of `work`, in µs."""
    for _ in range(20):
        work()  # warm: connections, statement caches
    cpu, wall = [], []
    for _ in range(n):
        c0, w0 = time.thread_time(), time.perf_counter()
        work()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu) * 1e6, statistics.median(wall) * 1e6


def store_pieces(store: StateStore, n: int, tag: str) -> dict[str, Callable[[], object]]:
    """A request's state-store calls, each one transaction as Runtime.store_call runs it alone
    (call_without_waiting on SQLite, one round trip per script on Redis)."""
    ledger = Ledger(store)
    limiter = RateLimiter(store)
    held: list[Reservation] = []

    def one(fn: Callable[[], object]) -> object:
        if store.joins_calls:
            return store.call_without_waiting(run_calls, store, [(fn, ())])
        return fn()

    def admit() -> object:
        def call() -> object:
            limiter.check(f"bench-{tag}", 10**9)
            r = ledger.reserve(f"bench-{tag}", "t", 0.001, 10**6, "span", model="m", provider="p")
            assert isinstance(r, Reservation)
            held.append(r)
            return r

        return one(call)

    def settle() -> object:
        r = held.pop() if held else None
        if r is None:
            admit()
            r = held.pop()
        return one(lambda: ledger.settle(r, 0.0005, 10, 10, "m", "p"))

    return {f"{tag}: rate check + reservation (1 txn)": admit, f"{tag}: settlement (1 txn)": settle}


# a slice's spend is recorded every flush_ms; at one connection back to back (~2 ms a request)
# a 50 ms flush carries about 25 requests' settles, under load more
FLUSH_EVERY = 25


def sliced_pieces(store: StateStore, tag: str) -> dict[str, Callable[[], object]]:
    """The same request with budget slices on (governance/slices.py): the rate check alone is
    its store call; the hold is carved and settled in memory; the flush, one settle_part per
    FLUSH_EVERY requests, is timed per request (its transaction's cost / FLUSH_EVERY)."""
    ledger = Ledger(store)
    limiter = RateLimiter(store)
    slices = Slices(ledger, SliceRules(requests=10**6, headroom=2, idle_s=3600))
    user = f"bench-slice-{tag}"
    own = ledger.reserve(user, "t", 0.001, 10**6, "span", model="m", provider="p")
    assert isinstance(own, Reservation)
    ask = slices.ask(own) or slices.ask(own)  # a budget used twice within idle_s
    assert ask is not None and slices.took(ask, ask.reserve())
    key = slices.key_of(user, 10**6, own.period, "t", None, own.tenant_period, None, own.created_at)

    def one(fn: Callable[[], object]) -> object:
        if store.joins_calls:
            return store.call_without_waiting(run_calls, store, [(fn, ())])
        return fn()

    def rate() -> object:
        return one(lambda: limiter.check(user, 10**9))

    def carve_settle() -> object:
        res = slices.carve(key, 0.001, "span")
        assert res is not None
        slices.settle(res, 0.0005, 10, 10, "m", "p")
        return res

    def flush() -> object:
        for _ in range(FLUSH_EVERY):
            carve_settle()
        return slices.flush()

    leases = RateLeases(store, LeaseRules(requests=32, headroom=2, lifetime_s=1.0))

    def leased() -> object:
        """A request from a rate block: in memory; every 32nd takes the next block (1 txn)."""
        now_us = to_us(utc_now())
        d = leases.use(user, 10**9, now_us)
        if d is None:
            leases.flush(everything=True)  # the spent block's (empty) return: no store call
            d = limiter.check(user, 10**9)
            ask = leases.ask(user, 10**9, d)
            assert ask is not None
            if store.joins_calls:
                (ok, taken), = store.call_without_waiting(run_calls, store, [(ask.take, ())])
                assert ok
            else:
                taken = ask.take()
            leases.took(ask, taken)
        return d

    return {
        f"{tag} leased: rate block use (1 txn per 32 requests, included)": leased,
        f"{tag} sliced: rate check alone (1 txn)": rate,
        f"{tag} sliced: carve + settle in memory": carve_settle,
        f"{tag} sliced: flush of {FLUSH_EVERY} requests (1 txn, incl. their carves)": flush,
    }


def audit_commit(directory: Path) -> tuple[Callable[[], object], AuditWriter]:
    """One llm_request entry queued and waited for until committed (fsync), as the answer does."""
    writer = AuditWriter(Audit(sqlite_path=str(directory / "audit.db")))
    writer.start()
    fields = entry(1)

    def commit() -> object:
        return writer.record_durable("llm_request", **fields).result(10)

    return commit, writer


def handoff() -> tuple[Callable[[], object], Callable[[], None]]:
    """A thread reporting to the event loop (call_soon_threadsafe) and the loop waking: the
    writer thread's commit reaching the waiting request."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    woke = threading.Event()
    t = threading.Thread(target=lambda: (loop.call_soon(ready.set), loop.run_forever()))
    t.start()
    ready.wait()

    def hop() -> object:
        woke.clear()
        loop.call_soon_threadsafe(woke.set)
        return woke.wait(5)

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        t.join()
        loop.close()

    return hop, stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    pricing = PricingTable.from_config(parse_config({}))
    price = pricing.get("gpt-4o-mini", "openai")
    assert price is not None
    fields = entry(1)
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        directory = Path(d)
        stores = [("sqlite", open_state_store(State(sqlite_path=str(directory / "state.db"))))]
        if a.redis_url:
            stores.append(("redis", open_state_store(State(backend="redis", redis_url=a.redis_url))))
        commit, writer = audit_commit(directory)
        hop, stop = handoff()
        pieces: dict[str, Callable[[], object]] = {}
        for tag, store in stores:
            pieces.update(store_pieces(store, a.calls, tag))
            pieces.update(sliced_pieces(store, tag))
        pieces["parse body + estimate"] = lambda: estimate_cost(
            body := json.loads(BODY), 256, 4096, price, scan(body)
        )
        pieces["price the usage (accounting)"] = lambda: price.cost(Usage(120, 256))
        pieces["audit entry: redact + encode"] = lambda: fields_json(redact(fields))
        pieces["audit commit: queue, fsync, report"] = commit
        pieces["thread hand-off to the event loop"] = hop
        try:
            for _ in range(a.repeat):
                for name, work in pieces.items():
                    c, w = timed(work, a.calls)
                    runs.setdefault(name + " [CPU]", []).append(c)
                    runs.setdefault(name + " [wall]", []).append(w)
        finally:
            stop()
            writer.close()
            for _, store in stores:
                store.close()
    out: dict[str, Any] = {}
    for name, xs in runs.items():
        out[name] = {
            "median_us": round(statistics.median(xs), 1),
            "min_us": round(min(xs), 1),
            "max_us": round(max(xs), 1),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
