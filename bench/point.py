"""One point, measured alone: Candela (SQLite or Redis state) or bare mitmproxy at one
concurrency, closed loop, optionally under py-spy. For finding where a request's time goes
between two commits, not a verdict (`run.py` is the bench).

Usage: .venv-bench/bin/python bench/point.py [--target candela|redis|mitmproxy]
           [--concurrency 1] [--seconds 15] [--py-spy-rate 0] [--out prof.txt.gz]

Prints requests/s, p50, the process's CPU per request and each thread's. With --py-spy-rate N
(N samples a second, only while a thread holds the GIL) it writes py-spy's raw stacks to --out,
for `profile_summary.py` (`--before` compares two) or `grep`.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH_PY, Bench, thread_cpu  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=("candela", "redis", "mitmproxy"), default="candela")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--py-spy-rate", type=int, default=0)
    p.add_argument("--out", default="point.txt.gz")
    a = p.parse_args(argv)
    b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
    try:
        with ExitStack() as alive:
            up = alive.enter_context(b.upstream())
            if a.target == "mitmproxy":
                url, proc = alive.enter_context(b.mitmdump(up))
            else:
                state = None
                if a.target == "redis":
                    state = {"backend": "redis", "redis_url": alive.enter_context(b.redis())}
                extra = {"state": state} if state else {}
                url, proc = alive.enter_context(b.candela(up, **extra))
            keys = a.target != "mitmproxy"
            b.load(url, "closed", a.concurrency, 2.0, warmup=0.5, keys=keys)  # warm
            before = thread_cpu(proc.pid)
            spy = None
            raw = Path(a.out).with_suffix("")
            if a.py_spy_rate:
                spy = subprocess.Popen(
                    [str(BENCH_PY.parent / "py-spy"), "record", "-p", str(proc.pid), "-d",
                     str(int(a.seconds)), "-r", str(a.py_spy_rate), "--gil", "--threads",
                     "--format", "raw", "-o", str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            r = b.load(url, "closed", a.concurrency, a.seconds, warmup=0, keys=keys, proc=proc)
            after = thread_cpu(proc.pid)
            if spy is not None:
                spy.wait(60)
                with open(raw, "rb") as f, gzip.open(a.out, "wb") as g:
                    g.write(f.read())
            n = max(r["completed"], 1)
            print(
                f"{a.target} c{a.concurrency}: {r['throughput_rps']} req/s, p50 "
                f"{r['latency_ms']['p50']} ms, {r.get('target_cpu_us_per_request')} µs CPU/request"
            )
            for tid, cpu in sorted(after.items()):
                used = round((cpu - before.get(tid, 0.0)) / n * 1e6)
                if used:
                    print(f"  thread {tid}: {used} µs/request")
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
