"""Time to first token of one user against many idle users, through one Candela (issue 21).

Scenario 3's pattern (24 keep-alive connections, 5 streams/s, 16 tokens) sent twice to the same
Candela: once with one API key (one user: its holds carved from a budget slice, its rate step
from a rate block, no store call before the first byte) and once with 24 keys (24 users, each
idle ~5 s between requests, measured after a 12 s warm-up (`TTFT_WARMUP_S`): whatever its
admission asks of the store before the first byte in its steady state).
SQLite state and Redis state, direct and bare mitmproxy beside, interleaved rounds whose order
alternates. Prints the added p50 over bare mitmproxy's (median of rounds) and, per backend,
the median of the per-round differences "24 users - one user": what an idle user's admission
adds to the time to first token.

Usage: .venv-bench/bin/python bench/ttft_users.py [rounds]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import ExitStack
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, key_of  # noqa: E402
from scenarios import redis_state  # noqa: E402

# each user's steady state, not its first requests after the previous target's turn: at 5
# streams/s over 24 users a user sends every ~5 s, so 12 s of warm-up are two or three of its
# requests (what its budget slice and rate block wait for: two checks in the store within
# governance.budgets.slices.idle_s and governance.rate_limits.leases.idle_lifetime_ms)
WARMUP_S = float(os.environ.get("TTFT_WARMUP_S", "12"))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
    try:
        with ExitStack() as s:
            up = s.enter_context(b.upstream("--chunk-gap-ms", "2"))
            murl, mp = s.enter_context(b.mitmdump(up, stream=True))
            curl, cp = s.enter_context(b.candela(up, tag="sqlite"))
            rurl, rp = s.enter_context(
                b.candela(up, tag="redis", state=redis_state(s.enter_context(b.redis())))
            )
            one = [key_of(0)]
            targets: list[tuple[str, str, Any, Any]] = [
                ("direct", up + "/v1/chat/completions", None, False),
                ("mitmproxy", murl, mp, False),
                ("sqlite, one user", curl, cp, one),
                ("sqlite, 24 users", curl, cp, True),
                ("redis, one user", rurl, rp, one),
                ("redis, 24 users", rurl, rp, True),
            ]
            res: dict[str, list[float]] = {t[0]: [] for t in targets}
            for r in range(rounds):
                order = targets if r % 2 == 0 else targets[:2] + targets[2:][::-1]
                for name, url, proc, keys in order:
                    x = b.load(
                        url,
                        "open",
                        24,
                        6,
                        rate=5,
                        stream=True,
                        max_tokens=16,
                        keys=keys,
                        proc=proc,
                        warmup=WARMUP_S,
                    )
                    res[name].append(x["ttft_ms"]["p50"])
                print("round", r, {k: v[-1] for k, v in res.items()}, flush=True)
        for name, v in res.items():
            over = statistics.median(v[i] - res["mitmproxy"][i] for i in range(rounds))
            print(f"{name:18s} ttft p50 {[round(x, 3) for x in v]}  over bare {over:+.3f} ms")
        for backend in ("sqlite", "redis"):
            many, single = res[f"{backend}, 24 users"], res[f"{backend}, one user"]
            d = [many[i] - single[i] for i in range(rounds)]
            print(
                f"{backend}: 24 users - one user: median {statistics.median(d):+.3f} ms"
                f" ({sum(x > 0 for x in d)}/{rounds} rounds above)"
            )
    finally:
        b.close()


if __name__ == "__main__":
    main()
