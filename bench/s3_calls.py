"""Scenario 3 as `make bench` runs it, with the state-store calls each Candela load made.

The same loads as scenario 3 (direct, bare mitmproxy, Candela on SQLite, Candela on Redis; 24
keep-alive connections, 5 streams/s, 16 / 128 / 512 tokens in turn, 1 s warm-up + 3 s each, so
users 0-19 send one request per load and a user's requests to one Candela come ~17-22 s apart),
with every public method of the Candela processes' state store noted (`probes/sitecustomize.py`). Prints,
per round and length, each target's added TTFT p50 over bare mitmproxy's, then per Candela
load its TTFT p50 and the store calls made during it by name and thread (`loop`: the event
loop, where a request's admission is awaited; `thread`: the pool and background threads).
`rate_hit` / `reserve` on the loop with no `rate_take` beside them: requests admitted by the
exact call before their first byte; `rate_take` / `reserve` alone: blocks and slices taken in
the background (issue 21).

Usage: .venv-bench/bin/python bench/s3_calls.py [rounds]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402
from scenarios import redis_state  # noqa: E402

# calls every process makes on a timer, whatever the load: left out of the per-load counts
PERIODIC = {"settings_generation", "slice_recalls", "day_totals", "checkpoint"}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    notes = tempfile.mkdtemp(prefix="candela-store-calls-")
    out = os.path.join(notes, "calls")
    b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
    loads: list[tuple[int, int, str, float, float, float]] = []
    pids: dict[int, str] = {}
    try:
        with b.upstream("--chunk-gap-ms", "2") as up, ExitStack() as alive:
            murl, mp = alive.enter_context(b.mitmdump(up, stream=True))
            os.environ["CANDELA_STORE_CALLS"] = out
            os.environ["PYTHONPATH"] = os.path.join(os.path.dirname(__file__), "probes")
            try:
                curl, cp = alive.enter_context(b.candela(up))
                redis_url = alive.enter_context(b.redis())
                rurl, rp = alive.enter_context(
                    b.candela(up, tag="redis", state=redis_state(redis_url))
                )
            finally:
                del os.environ["CANDELA_STORE_CALLS"], os.environ["PYTHONPATH"]
            pids[cp.pid] = "sqlite"
            pids[rp.pid] = "redis"
            targets: tuple[tuple[str, str, Any, bool], ...] = (
                ("direct", up + "/v1/chat/completions", None, False),
                ("mitmproxy", murl, mp, False),
                ("sqlite", curl, cp, True),
                ("redis", rurl, rp, True),
            )
            for r in range(rounds):
                for n in (16, 128, 512):
                    row = {}
                    for name, url, p, keys in targets:
                        t0 = time.time()
                        x = b.load(url, "open", 24, 3, rate=5, stream=True, max_tokens=n,
                                   keys=keys, proc=p)
                        row[name] = x["ttft_ms"]["p50"]
                        if name in ("sqlite", "redis"):
                            loads.append((r, n, name, t0, time.time(), row[name]))
                    over = {k: round(v - row["mitmproxy"], 2) for k, v in row.items()}
                    print(f"round {r} {n:4d} tokens, added TTFT over bare mitmproxy's:", over,
                          flush=True)
            time.sleep(1.5)  # the last notes written
    finally:
        b.close()
    calls: list[tuple[float, str, str, str]] = []
    for f in glob.glob(out + ".*.json"):
        who = pids.get(int(f.rsplit(".", 2)[-2]), "?")
        calls += [(t, name, "loop" if th == "MainThread" else "thread", who)
                  for t, name, th, _ in json.load(open(f))]
    for r, n, name, t0, t1, ttft in loads:
        c = collections.Counter(
            f"{call}@{where}" for t, call, where, who in calls
            if t0 <= t <= t1 and who == name and call not in PERIODIC
        )
        print(f"round {r} {n:4d} {name:6s} TTFT p50 {ttft:6.2f} ms", dict(sorted(c.items())))


if __name__ == "__main__":
    main()
