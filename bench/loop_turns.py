"""Event-loop iterations between a request's last byte sent and its first streamed token.

One keep-alive connection to bare mitmproxy and to Candela (SQLite state, one user), a
streamed request every 0.2 s (`max_tokens` from the command line, 16 by default), with every
event-loop iteration of the two proxies noted (`probes/sitecustomize.py`, CANDELA_LOOP_TURNS).
Prints, per target, the iterations whose start falls between the request's send and the first
`data:` line reaching the client (median and extremes over the requests after five of warm-up)
and the time to first token: each iteration is a wake-up in which the loop also runs whatever
else is ready (other streams' chunks), so the path's iterations are what concurrent streams
lengthen (issue 21, scenario 3's 512-token line).

Usage: .venv-bench/bin/python bench/loop_turns.py [max_tokens] [background max_tokens]
(CANDELA_LOOP_TURNS_DETAIL=1: also the last request's iterations, callback by callback; a
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
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench, key_of  # noqa: E402

REQUESTS = 40
WARMUP = 5


def requests(url: str, key: str | None, tokens: int) -> list[tuple[float, float]]:
    """(sent, first token) of REQUESTS streamed requests on one connection, 0.2 s apart."""
    u = urlparse(url)
    assert u.hostname and u.port
    body = json.dumps({
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens, "stream": True,
    }).encode()
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n"
    ).encode()
    out = []
    with socket.create_connection((u.hostname, u.port)) as s:
        for _ in range(REQUESTS):
            sent = time.time()
            s.sendall(head + body)
            buf, first = b"", 0.0
            while not buf.endswith(b"\r\n0\r\n\r\n"):  # the chunked answer's end
                buf += s.recv(65536)
                if not first and b"data:" in buf:
                    first = time.time()
            out.append((sent, first))
            time.sleep(0.2)
    return out


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    background = int(sys.argv[2]) if len(sys.argv) > 2 else 0
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
                runs[name] = (p.pid, requests(url, key, tokens))
                if load is not None:
                    load.join()
            time.sleep(1.5)  # the last notes written
            turns = {int(f.rsplit(".", 2)[-2]): json.load(open(f))
                     for f in glob.glob(out + ".*.json")}
    finally:
        b.close()
    detail = bool(os.environ.get("CANDELA_LOOP_TURNS_DETAIL"))
    for name, (pid, res) in runs.items():
        if detail:  # one request's iterations, callback by callback
            sent, first = res[-1]
            print(f"{name}: the last request's iterations")
            for t0, t1, work, names in turns.get(pid, []):
                if sent <= t0 <= first:
                    print(f"  +{(t0 - sent) * 1000:6.3f} ms {(t1 - t0) * 1000:6.3f} ms "
                          f"(work {work * 1000:.3f})", names)
        its = turns.get(pid, [])
        inside = [[t for t in its if sent <= t[0] <= first] for sent, first in res[WARMUP:]]
        counts = [len(x) for x in inside]
        work = [sum(t[2] for t in x) * 1000 for x in inside]
        ttft = [(first - sent) * 1000 for sent, first in res[WARMUP:]]
        print(f"{name:10s} loop iterations from send to first token: median "
              f"{statistics.median(counts)} (min {min(counts)}, max {max(counts)}); the loop's "
              f"work in them p50 {statistics.median(work):.2f} ms; "
              f"TTFT p50 {statistics.median(ttft):.2f} ms")


if __name__ == "__main__":
    main()
