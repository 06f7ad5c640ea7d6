"""Where a Candela request's time goes, hook by hook: every addon hook the server calls (and any
named function) timed inside the server while one connection sends at a fixed open-loop rate.

Candela (SQLite state, the bench config) runs with `probes/sitecustomize.py` on its PYTHONPATH
(CANDELA_HOOK_TIMES, CANDELA_FUNC_TIMES); after a 3 s warm-up the load runs `--seconds` at
`--rate` on one keep-alive connection, and each (hook, addon) and function is printed with its
wall and thread CPU per request (totals over the requests, and medians per call): at 50/s every
piece runs on caches gone cold, which a back-to-back profile does not show (bench/README.md,
issue 21).

Usage: .venv-bench/bin/python bench/hook_times.py [--rate 50] [--seconds 10] [--tokens N]
           [--funcs candela_mitm.addons.audit:account_flow,candela_mitm.audit.writer:AuditWriter._commit_here]
           [--audit '{"sync_interval_ms": 10000}']
(--tokens N: streamed answers of N tokens instead of JSON ones; a function is named where it
is looked up: one imported by name into another module is patched in that module.)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402

PROBES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--funcs", default="")
    p.add_argument("--audit", default="{}", help='the config\'s audit section, JSON: \'{"sync_interval_ms": 10000}\'')
    a = p.parse_args()
    stream = a.tokens > 0
    out = os.path.join(tempfile.mkdtemp(prefix="candela-hook-times-"), "hooks")
    b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
    try:
        with ExitStack() as alive:
            up = alive.enter_context(b.upstream("--chunk-gap-ms", "2"))
            os.environ.update(
                CANDELA_HOOK_TIMES=out, CANDELA_FUNC_TIMES=a.funcs, PYTHONPATH=PROBES
            )
            try:
                url, proc = alive.enter_context(b.candela(up, audit=json.loads(a.audit)))
            finally:
                for k in ("CANDELA_HOOK_TIMES", "CANDELA_FUNC_TIMES", "PYTHONPATH"):
                    del os.environ[k]
            kw = {"rate": a.rate, "proc": proc, "stream": stream, "max_tokens": a.tokens or 16}
            b.load(url, "open", 1, 3, warmup=1.0, **kw)
            t0 = time.time()
            r = b.load(url, "open", 1, a.seconds, warmup=0.0, **kw)
            t1 = time.time()
            time.sleep(1.5)  # the probe's last notes written
            written = glob.glob(out + ".*.jsonl")
            if not written:  # the probe failed in the server's start-up (its log says why)
                raise SystemExit(
                    "no notes written: a --funcs name that does not import stops the probe "
                    "(the addons are candela_mitm.addons.<module> once installed)"
                )
            with open(written[0]) as fh:
                notes = [json.loads(line) for line in fh]
    finally:
        b.close()
    n = max(r["completed"], 1)
    agg: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for t, hook, name, wall, cpu in notes:
        if t0 <= t <= t1:
            agg[(hook, name)].append((wall, cpu))
    print(f"{r['completed']} requests at {a.rate}/s, one connection; p50 {r['latency_ms']['p50']} ms")
    print(f"  {'hook':20s} {'addon or function':34s} {'wall/req':>9s} {'cpu/req':>9s} "
          f"{'cpu p50':>8s} {'wall p50':>9s} {'calls/req':>9s}  (µs)")
    total = [0.0, 0.0]
    for (hook, name), xs in sorted(agg.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        wall, cpu = sum(w for w, _ in xs), sum(c for _, c in xs)
        if hook != "call":  # functions are inside hooks: not added again
            total[0] += wall
            total[1] += cpu
        print(f"  {hook:20s} {name[:34]:34s} {wall / n * 1e6:9.1f} {cpu / n * 1e6:9.1f} "
              f"{statistics.median(c for _, c in xs) * 1e6:8.1f} "
              f"{statistics.median(w for w, _ in xs) * 1e6:9.1f} {len(xs) / n:9.2f}")
    print(f"  all hooks: wall {total[0] / n * 1e6:.1f} µs, thread CPU {total[1] / n * 1e6:.1f} µs a request")


if __name__ == "__main__":
    main()
