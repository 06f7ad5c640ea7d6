"""Instructions per request: Candela (SQLite or Redis state) or bare mitmproxy under valgrind's
callgrind, at one connection and a fixed open-loop rate. Counts, not timings: on the shared
2-core machine a point's CPU per request moves by 10-25 % between runs, its instruction count
by about 0.1 % (three runs of one commit: 4,852,001 / 4,855,250 / 4,859,519).

Usage: .venv-bench/bin/python bench/instructions.py [--target candela|redis|mitmproxy]
           [--rate 8] [--warm 8] [--seconds 40] [--idle 0] [--out DIR]

The server starts under callgrind with instrumentation off (start-up at near full speed), is
warmed at the rate, then counted over `--seconds` at the rate (open loop: every variant gets
the same pace, so what runs per second of wall time, the slices' records and flushes, the
settings poll, weighs the same on each). Prints requests, instructions and instructions per
request; with `--idle S` it first counts S seconds without traffic and subtracts that rate
(the poller and timers) from the figure. The code measured is the one the worktree's venv
imports: set PYTHONPATH to a tree holding another `candela_mitm` (addons/ inside it) to
measure another commit. About 20x slower than the real thing: a request takes ~40 ms.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PROVIDER_KEY, ROOT, Bench, free_port, wait_http  # noqa: E402


def summary(out: Path) -> int:
    """The instructions counted in callgrind's dump (the last part written)."""
    parts = sorted(out.glob("callgrind.out.*.*"), key=lambda p: p.stat().st_mtime)
    for line in parts[-1].read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary in {parts[-1]}")


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=("candela", "redis", "mitmproxy"), default="candela")
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--warm", type=float, default=8.0)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--idle", type=float, default=0.0)
    p.add_argument("--out", default="instructions.out")
    a = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    grind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no",
             f"--callgrind-out-file={out}/callgrind.out.%p"]  # fmt: skip
    python = str(ROOT / ".venv" / "bin" / "python")
    b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
    try:
        with ExitStack() as alive:
            up = alive.enter_context(b.upstream())
            port = free_port()
            bare = a.target == "mitmproxy"
            if bare:
                argv_ = [*grind, python, str(ROOT / ".venv" / "bin" / "mitmdump"), "--mode",
                         f"reverse:{up}", "--listen-host", "127.0.0.1", "--listen-port",
                         str(port), "-q"]  # fmt: skip
                cwd = None
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
            else:
                # The writer thread commits an entry alone once it has waited the batch delay
                # (50 ms): under callgrind a request takes ~40 ms, so the model policy's entry
                # would go alone now and then instead of riding with the request's own, as it
                # always does at full speed. Long enough, it never does.
                extra: dict[str, object] = {"audit": {"batch_max_delay_ms": 60_000}}
                if a.target == "redis":
                    url_ = alive.enter_context(b.redis())
                    extra["state"] = {"backend": "redis", "redis_url": url_}
                cfg = b.candela_config(up, "instructions", **extra)
                argv_ = [*grind, python, "-O", str(ROOT / ".venv" / "bin" / "candela-server"),
                         "--config", str(cfg), "--port", str(port), "--log-level", "WARNING",
                         "--workers", "1"]  # fmt: skip
                cwd = cfg.parent
                url = f"http://127.0.0.1:{port}/proxy/openai/v1/chat/completions"
            proc = b.start(f"callgrind-{port}", argv_, env={"OPENAI_API_KEY": PROVIDER_KEY}, cwd=cwd)
            alive.callback(b.stop, proc)
            ok = (lambda s: s < 500) if bare else (lambda s: s == 200)
            wait_http(proc, f"http://127.0.0.1:{port}/healthz", 600, ok=ok)
            control(proc.pid, "-i", "on")
            idle_rate = 0.0
            if a.idle > 0:
                control(proc.pid, "-z")
                time.sleep(a.idle)
                control(proc.pid, "-d")
                idle_rate = summary(out) / a.idle
            b.load(url, "open", 1, a.warm, rate=a.rate, warmup=0, keys=not bare)
            control(proc.pid, "-z")
            r = b.load(url, "open", 1, a.seconds, rate=a.rate, warmup=0, keys=not bare)
            control(proc.pid, "-d")
            total = summary(out)
            n = int(r["completed"])
            per = (total - idle_rate * a.seconds) / max(n, 1)
            print(f"{a.target}: {n} requests at {a.rate}/s ({r['errors']} errors), "
                  f"{total:,} instructions, {per:,.0f} per request"
                  + (f" (idle {idle_rate:,.0f}/s subtracted)" if a.idle else ""))  # fmt: skip
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
