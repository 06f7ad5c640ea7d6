"""Candela variants side by side at concurrency 1, open loop at 50 requests a second: the direct
path, bare mitmproxy and each variant (a config of its own) loaded in turn, round by round, in
one run; printed: each target's added p50 (median of the rounds' differences to the direct
path), its ratio to bare mitmproxy's round by round, and its process CPU a request. For a
change worth tens of microseconds, which two full `make bench` runs minutes apart do not
resolve (bench/README.md, twenty-first session).

Usage: .venv-bench/bin/python bench/ab.py [--rounds 6] [--seconds 6] [--paired | --closed]
           --variants '{"before": {"audit": {"journal_chain_delay_ms": 50}}, "after": {}}'
(a variant's object is extra config for `Bench.candela`, but for its "env": extra environment
variables for the process. Two commits side by side: a variant whose PYTHONPATH is a tree
holding the other commit's `candela_mitm` with `addons/` moved inside it, e.g.
  git archive REV candela_mitm addons | tar -x -C /tmp/before
  mv /tmp/before/addons /tmp/before/candela_mitm/addons
  --variants '{"before": {"env": {"PYTHONPATH": "/tmp/before"}}, "after": {}}'
The server runs from its work folder, where that tree comes before the editable install.
--paired loads every target at once, staggered, as scenario 1's paired line does.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, added, key_of, ratios  # noqa: E402

RATE = 50.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default='{"candela": {}}')
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--paired", action="store_true")
    p.add_argument(
        "--closed", action="store_true",
        help="back to back on one connection, one user (scenario 2p's c1 point): throughput",
    )
    p.add_argument("--many", action="store_true", help="with --closed: every user's key in turn")
    a = p.parse_args(argv)
    variants: dict[str, dict[str, Any]] = json.loads(a.variants)
    b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        with ExitStack() as alive:
            up = alive.enter_context(b.upstream())
            targets: list[tuple[str, str, Any, bool]] = [("direct", up + "/v1/chat/completions", None, False)]
            url, proc = alive.enter_context(b.mitmdump(up))
            targets.append(("mitmproxy", url, proc, False))
            for name, extra in variants.items():
                url, proc = alive.enter_context(b.candela(up, tag=name, **extra))
                targets.append((name, url, proc, True))
            runs = {t[0]: [] for t in targets}
            for _ in range(a.rounds):
                if a.paired:
                    for name, r in b.load_paired(targets, a.seconds, rate=RATE).items():
                        runs[name].append(r)
                    continue
                for name, url, proc, keys in targets:
                    if a.closed:
                        one_user = (True if a.many else [key_of(0)]) if keys else False
                        runs[name].append(
                            b.load(url, "closed", 1, a.seconds, warmup=0.5, keys=one_user, proc=proc)
                        )
                        continue
                    runs[name].append(b.load(url, "open", 1, a.seconds, rate=RATE, keys=keys, proc=proc))
    finally:
        b.close()
    def each_added(rs: list[dict[str, Any]]) -> list[float]:  # round by round, over direct
        return [r["latency_ms"]["p50"] - d["latency_ms"]["p50"] for r, d in zip(rs, runs["direct"], strict=True)]

    if a.closed:  # throughput, and each round's ratio to bare mitmproxy's
        for name, rs in runs.items():
            rps = [r["throughput_rps"] for r in rs]
            cpu = statistics.median(r.get("target_cpu_us_per_request", 0) for r in rs)
            rounds = ratios(rps, [r["throughput_rps"] for r in runs["mitmproxy"]])
            print(f"{name:12s} {statistics.median(rps):.1f} req/s, ratio to bare's "
                  f"{statistics.median(rounds):.3f} (rounds {rounds}), CPU {cpu:.0f} µs a request")
        return 0
    bare = each_added(runs["mitmproxy"])
    for name, rs in runs.items():
        if name == "direct":
            continue
        cpu = statistics.median(r.get("target_cpu_us_per_request", 0) for r in rs)
        rounds = ratios(each_added(rs), bare)
        print(f"{name:12s} added p50 {added(rs, runs['direct'], 'latency_ms', 'p50'):.3f} ms, "
              f"ratio to bare's {statistics.median(rounds):.3f} (rounds {rounds}), "
              f"CPU {cpu:.0f} µs a request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
