"""Summarise py-spy's raw (collapsed) stacks: samples per thread, and the functions that take them.

Usage: python bench/profile_summary.py prof.txt[.gz] [--top 30] [--thread NAME]
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def load(path: str) -> list[tuple[list[str], int]]:
    out = []
    opener = gzip.open if path.endswith(".gz") else open
    for line in opener(path, "rt", encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        out.append((stack.split(";"), int(n)))
    return out


def short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    for marker in ("site-packages/", "candela_mitm/", "addons/", "lib/python3.11/"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({f})"


def summarise(stacks: list[tuple[list[str], int]], top: int, thread: str | None) -> str:
    threads: Counter[str] = Counter()
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for frames, n in stacks:
        th = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        if thread and thread not in " ".join(frames[:2]):
            continue
        threads[" ".join(frames[:2])[:80]] += n
        total += n
        body = [short(f) for f in frames if not f.startswith(("thread", "process"))]
        if body:
            self_t[body[-1]] += n
        for f in set(body):
            incl[f] += n
        del th
    lines = [f"samples: {total}", "", "by thread:"]
    lines += [f"  {n:6d} {100 * n / total:5.1f}%  {t}" for t, n in threads.most_common(10)]
    lines += ["", f"self time (top {top}):"]
    lines += [f"  {n:6d} {100 * n / total:5.1f}%  {f}" for f, n in self_t.most_common(top)]
    lines += ["", f"inclusive time (top {top}):"]
    lines += [f"  {n:6d} {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--thread")
    a = p.parse_args(argv)
    print(summarise(load(a.path), a.top, a.thread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
