"""Time to first token of idle users, two versions of Candela side by side (issue 21).

Scenario 3's pattern (24 keep-alive connections, 5 streams/s, 16 tokens, each connection a user
idle ~5 s, so every request makes the exact admission call before it is forwarded), on SQLite
and on Redis state, the code before and after side by side, in interleaved rounds whose order
alternates; direct and bare mitmproxy beside. Prints the added p50 over direct (median of the
rounds) and, per backend, the median of the per-round differences.

Usage: BEFORE=<tree> .venv-bench/bin/python bench/ttft_idle.py [rounds]

BEFORE: a folder holding an older `candela_mitm`, with addons/, ebpf/, netns/ and certs/ copied
into it (setuptools maps them there), put first on the PYTHONPATH of the "before" processes:

    git archive <rev> | tar -x -C T && mkdir T/pp && cp -r T/candela_mitm T/pp/ &&
    for d in addons ebpf netns certs; do cp -r T/$d T/pp/candela_mitm/; done   # BEFORE=T/pp
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import AbstractContextManager, ExitStack
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402
from scenarios import redis_state  # noqa: E402


def entered(stack: ExitStack, cm: AbstractContextManager[Any], pythonpath: str) -> Any:
    """`cm` entered with PYTHONPATH set for the processes it starts, left with the stack."""
    os.environ["PYTHONPATH"] = pythonpath
    try:
        got = cm.__enter__()
    finally:
        del os.environ["PYTHONPATH"]
    stack.push(cm.__exit__)
    return got


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    before = os.environ["BEFORE"]
    b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
    try:
        with ExitStack() as s:
            up = s.enter_context(b.upstream("--chunk-gap-ms", "2"))
            murl, mp = s.enter_context(b.mitmdump(up, stream=True))
            r1 = s.enter_context(b.redis())
            r2 = s.enter_context(b.redis())
            targets = [
                ("direct", up + "/v1/chat/completions", None, False),
                ("mitmproxy", murl, mp, False),
                ("sqlite before", *entered(s, b.candela(up, tag="sb"), before), True),
                ("sqlite after", *s.enter_context(b.candela(up, tag="sa")), True),
                ("redis before", *entered(s, b.candela(up, tag="rb", state=redis_state(r1)), before), True),
                ("redis after", *s.enter_context(b.candela(up, tag="ra", state=redis_state(r2))), True),
            ]
            res: dict[str, list[float]] = {t[0]: [] for t in targets}
            for r in range(rounds):
                order = targets if r % 2 == 0 else targets[:2] + targets[2:][::-1]
                for name, url, proc, keys in order:
                    x = b.load(url, "open", 24, 6, rate=5, stream=True, max_tokens=16, keys=keys, proc=proc)
                    res[name].append(x["ttft_ms"]["p50"])
                print("round", r, {k: v[-1] for k, v in res.items()}, flush=True)
        for name, v in res.items():
            added = statistics.median(v[i] - res["direct"][i] for i in range(rounds))
            print(f"{name:16s} ttft p50 {[round(x, 3) for x in v]}  added median {added:.3f} ms")
        for old, new in (("sqlite before", "sqlite after"), ("redis before", "redis after")):
            d = [res[old][i] - res[new][i] for i in range(rounds)]
            print(f"{old} - {new}: median {statistics.median(d):.3f} ms, {sum(x > 0 for x in d)}/{rounds} rounds")
    finally:
        b.close()


if __name__ == "__main__":
    main()
