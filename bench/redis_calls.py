"""Redis commands and scripts a request: scenario 3's load (24 users, 5 streams/s, streamed) on one
Candela with Redis state; redis-server's INFO commandstats before and after, and SLOWLOG
(threshold 0) for each EVALSHA's time inside redis-server, by script sha.

Usage: .venv-bench/bin/python bench/redis_calls.py"""
import argparse
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench


def stats(url):
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(["redis-cli", "-p", port, "info", "commandstats"], capture_output=True, text=True).stdout
    d = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            k, v = line.split(":", 1)
            f = dict(x.split("=") for x in v.split(","))
            d[k] = {"calls": int(f["calls"]), "usec": int(f["usec"])}
    return d
b = Bench(argparse.Namespace(workdir=None, quick=False, keep=False, no_litellm=True))
try:
    with ExitStack() as s:
        up = s.enter_context(b.upstream("--chunk-gap-ms", "2"))
        rurl = s.enter_context(b.redis())
        aurl, ap = s.enter_context(b.candela(up, tag="a", state={"backend": "redis", "redis_url": rurl}))
        b.load(aurl, "open", 24, 3, rate=5, stream=True, max_tokens=16, keys=True, proc=ap)
        port = rurl.rsplit(":", 1)[1].split("/")[0]
        for a in (["config", "set", "slowlog-log-slower-than", "0"], ["config", "set", "slowlog-max-len", "5000"], ["slowlog", "reset"]):
            subprocess.run(["redis-cli", "-p", port, *a], capture_output=True)
        before = stats(rurl)
        x = b.load(aurl, "open", 24, 10, rate=5, stream=True, max_tokens=16, keys=True, proc=ap)
        time.sleep(1)
        after = stats(rurl)
        n = x.get("ok") or x.get("requests") or x
        print("load:", {k: v for k, v in x.items() if not isinstance(v, dict)})
        out = subprocess.run(["redis-cli", "-p", port, "--json", "slowlog", "get", "5000"], capture_output=True, text=True).stdout
        import collections
        import json
        agg = collections.defaultdict(list)
        for e in json.loads(out):
            args = e[3]
            if args and args[0].lower() == "evalsha":
                agg[args[1]].append(e[2])
        for sha, v in agg.items():
            print("script", sha[:12], len(v), "calls, median us", sorted(v)[len(v)//2], "mean", sum(v)/len(v))
        for k in sorted(after):
            d = after[k]["calls"] - before.get(k, {}).get("calls", 0)
            us = after[k]["usec"] - before.get(k, {}).get("usec", 0)
            if d:
                print(f"{k:30s} {d:6d} calls  {us/d:7.1f} us each")
finally:
    b.close()
