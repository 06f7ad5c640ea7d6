"""Event-loop iterations between a request's last byte sent and its first streamed token.

One keep-alive connection to bare mitmproxy and to Candela (SQLite state, one user), a
streamed request every 0.2 s (`max_tokens` from the command line, 16 by default; 0: a JSON
answer, not streamed, timed to its last byte; `--gap`: the pause between requests), with every
event-loop iteration of the two proxies noted (`probes/sitecustomize.py`, CANDELA_LOOP_TURNS).
Prints, per target, the iterations whose start falls between the request's send and the first
`data:` line reaching the client (median and extremes over the requests after five of warm-up)
and the time to first token: each iteration is a wake-up in which the loop also runs whatever
else is ready (other streams' chunks), so the path's iterations are what concurrent streams
lengthen (issue 21, scenario 3's 512-token line).

Usage: .venv-bench/bin/python bench/loop_turns.py [max_tokens] [background max_tokens]
           [--gap 0.2] [--requests 40]
(CANDELA_LOOP_TURNS_DETAIL=1: also the last request's iterations, callback by callback, and
each callback's thread CPU per request, median over the requests, beside bare mitmproxy's; a
background max_tokens: scenario 3's load beside the probe, 24 users at 5 streams/s of that
length, so that the loop also relays other streams' chunks)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, key_of  # noqa: E402

REQUESTS = 40
WARMUP = 5


def requests(
    url: str, key: str | None, tokens: int, gap: float = 0.2, count: int = REQUESTS
) -> list[tuple[float, float]]:
    """(sent, first token) of `count` streamed requests on one connection, `gap` apart; with
    tokens 0, (sent, answer's end) of JSON requests."""
    u = urlparse(url)
    assert u.hostname and u.port
    body = json.dumps({
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens or 16, "stream": bool(tokens),
    }).encode()
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n"
    ).encode()
    out = []
    with socket.create_connection((u.hostname, u.port)) as s:
        for _ in range(count):
            sent = time.time()
            s.sendall(head + body)
            buf, first = b"", 0.0
            while not first:
                buf += s.recv(65536)
                if tokens and b"data:" in buf:
                    first = time.time()
                elif not tokens and answered(buf):
                    first = time.time()
            while tokens and not buf.endswith(b"\r\n0\r\n\r\n"):  # the chunked answer's end
                buf += s.recv(65536)
            out.append((sent, first))
            time.sleep(gap)
    return out


def answered(buf: bytes) -> bool:
    """A Content-Length answer read whole."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    raise ValueError("an answer without Content-Length")


def by_callback(inside: list[list[Any]]) -> dict[str, float]:
    """Each callback name's thread CPU per request (ms), median over the requests."""
    names = {n for its in inside for t in its for n, _ in t[3]}
    per: dict[str, list[float]] = {n: [] for n in names}
    for its in inside:
        sums: dict[str, float] = dict.fromkeys(names, 0.0)
        for t in its:
            for n, cpu in t[3]:
                sums[n] += cpu * 1000
        for n, v in sums.items():
            per[n].append(v)
    return {n: statistics.median(v) for n, v in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokens", type=int, nargs="?", default=16)
    p.add_argument("background", type=int, nargs="?", default=0)
    p.add_argument("--gap", type=float, default=0.2)
    p.add_argument("--requests", type=int, default=REQUESTS)
    a = p.parse_args()
    tokens, background = a.tokens, a.background
    out = os.path.join(tempfile.mkdtemp(prefix="candela-loop-turns-"), "turns")
    b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
    runs = {}
    try:
        with ExitStack() as alive:
            up = alive.enter_context(b.upstream("--chunk-gap-ms", "2"))
            os.environ["CANDELA_LOOP_TURNS"] = out  # (and _DETAIL, if set, passes on)
            os.environ["PYTHONPATH"] = os.path.join(os.path.dirname(__file__), "probes")
            try:
                murl, mp = alive.enter_context(b.mitmdump(up, stream=True))
                curl, cp = alive.enter_context(b.candela(up))
            finally:
                del os.environ["CANDELA_LOOP_TURNS"], os.environ["PYTHONPATH"]
            for name, url, p, key in (("mitmproxy", murl, mp, None),
                                      ("candela", curl, cp, key_of(0))):
                load = None
                if background:  # scenario 3's load beside the probe's requests
                    load = threading.Thread(target=b.load, args=(url, "open", 24, 12), kwargs={
                        "rate": 5, "stream": True, "max_tokens": background,
                        "keys": key is not None, "proc": p, "warmup": 1.0})
                    load.start()
                    time.sleep(1.5)
                runs[name] = (p.pid, requests(url, key, tokens, a.gap, a.requests))
                if load is not None:
                    load.join()
            time.sleep(1.5)  # the last notes written
            turns = {int(f.rsplit(".", 2)[-2]): json.load(open(f))
                     for f in glob.glob(out + ".*.json")}
    finally:
        b.close()
    detail = bool(os.environ.get("CANDELA_LOOP_TURNS_DETAIL"))
    callbacks = {}
    what = "first token" if tokens else "answer"
    for name, (pid, res) in runs.items():
        if detail:  # one request's iterations, callback by callback
            sent, first = res[-1]
            print(f"{name}: the last request's iterations")
            for t0, t1, work, names in turns.get(pid, []):
                if sent <= t0 <= first:
                    print(f"  +{(t0 - sent) * 1000:6.3f} ms {(t1 - t0) * 1000:6.3f} ms "
                          f"(work {work * 1000:.3f})", [n for n, _ in names])
        its = turns.get(pid, [])
        inside = [[t for t in its if sent <= t[0] <= first] for sent, first in res[WARMUP:]]
        counts = [len(x) for x in inside]
        work = [sum(t[2] for t in x) * 1000 for x in inside]
        ttft = [(first - sent) * 1000 for sent, first in res[WARMUP:]]
        print(f"{name:10s} loop iterations from send to {what}: median "
              f"{statistics.median(counts)} (min {min(counts)}, max {max(counts)}); the loop's "
              f"work in them p50 {statistics.median(work):.2f} ms; "
              f"to the {what} p50 {statistics.median(ttft):.2f} ms")
        if detail:
            callbacks[name] = by_callback(inside)
    if detail:  # where the loop's CPU on the path goes, callback by callback
        print(f"\nthread CPU per request from send to {what}, by callback (ms, median):")
        names = sorted({n for c in callbacks.values() for n in c},
                       key=lambda n: -max(c.get(n, 0.0) for c in callbacks.values()))
        print("  " + "  ".join(f"{t:>10s}" for t in callbacks) + "  callback")
        for n in names[:40]:
            print("  " + "  ".join(f"{c.get(n, 0.0):10.3f}" for c in callbacks.values())
                  + f"  {n[:150]}")
        print("  " + "  ".join(f"{sum(c.values()):10.3f}" for c in callbacks.values())
              + "  (sum of medians)")


if __name__ == "__main__":
    main()
