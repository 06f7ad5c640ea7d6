"""Summarise py-spy's raw (collapsed) stacks: samples per thread, and the functions that take them.

Usage: python bench/profile_summary.py prof.txt[.gz] [--top 30] [--thread NAME]
       python bench/profile_summary.py after.txt.gz --before before.txt.gz --us 1065 --before-us 990

The second form compares two profiles (of two commits): each function's inclusive share of
samples scaled to µs per request (pass the event loop's µs per request each run printed),
matched by function name alone so that a module that moved between the two still matches;
the functions that grew most, then those that shrank most.
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


def inclusive_us(stacks: list[tuple[list[str], int]], us_per_request: float) -> dict[str, float]:
    """Each function's inclusive samples as µs per request, by function name (not file)."""
    incl: Counter[str] = Counter()
    total = 0
    for frames, n in stacks:
        total += n
        names = set()
        for f in frames:
            if f.startswith(("thread", "process")):
                continue
            m = _FRAME.match(f)
            names.add(m.group("func") if m else f)
        for name in names:
            incl[name] += n
    return {k: v / total * us_per_request for k, v in incl.items()} if total else {}


def diff(before: dict[str, float], after: dict[str, float], top: int) -> str:
    names = sorted(set(before) | set(after), key=lambda k: after.get(k, 0) - before.get(k, 0))

    def row(k: str) -> str:
        b, a = before.get(k, 0.0), after.get(k, 0.0)
        return f"  {b:8.1f} -> {a:8.1f}  {a - b:+8.1f}  {k}"

    lines = ["µs per request, inclusive: before -> after, change", "grew most:"]
    lines += [row(k) for k in reversed(names[-top:])]
    lines += ["shrank most:"] + [row(k) for k in names[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--thread")
    p.add_argument("--before", help="a profile to compare with (the older commit's)")
    p.add_argument("--us", type=float, default=1.0, help="this run's µs per request")
    p.add_argument("--before-us", type=float, default=1.0, help="the other run's µs per request")
    a = p.parse_args(argv)
    if a.before:
        print(
            diff(
                inclusive_us(load(a.before), a.before_us),
                inclusive_us(load(a.path), a.us),
                a.top,
            )
        )
        return 0
    print(summarise(load(a.path), a.top, a.thread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
