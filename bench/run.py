"""Benchmark scenarios: direct, bare mitmproxy, Candela (full pipeline) and LiteLLM, side by side.

Every figure that matters is a ratio of two targets measured in this run, on this machine, under
the same load against the same fake upstream (bench/upstream.py). Nothing here is a test: no
figure fails the run; the targets of issue 7 are printed next to what was measured.

Usage (make bench does this): .venv-bench/bin/python bench/run.py [--only s1,s2] [--quick]
Writes bench/results/<stamp>.json and .md, bench/results/latest.md, and the README's
"## Benchmarks" section.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
VENV_PY = ROOT / ".venv" / "bin" / "python"
BENCH_PY = Path(os.environ.get("BENCH_PY", sys.executable))
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
TICK = os.sysconf("SC_CLK_TCK")

S2_ROUNDS = 5  # scenario 2: interleaved rounds; verdicts take the median of per-round ratios
ROUNDS = 3  # scenarios 1, 3 and 6: rounds over targets kept running; medians of the rounds
USERS = 64  # one bench user (and key) per connection, as many callers would be
PROVIDER_KEY = "sk-bench-provider-key"
MODEL = "gpt-4o-mini"
LITELLM_KEY = "sk-bench-litellm-master"
EXACT_MODEL = "bench-exact"  # priced so that a reservation equals the real cost
EXACT_TOKENS = 7
EXACT_BUDGET = 0.1
EXACT_FITS = 14  # 14 x 7 tokens x $1000/M = $0.098 <= $0.10 < 15 x ...


def key_of(i: int) -> str:
    return f"cdl_bench_user_{i:03d}"


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes ----------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """pid and its descendants (workers are children of the supervisor)."""
    out = [pid]
    try:
        for t in Path(f"/proc/{pid}/task").iterdir():
            for c in (t / "children").read_text().split():
                out += tree(int(c))
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / TICK


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy (not idle, not waiting for I/O)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / TICK


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generators, once waited for
    return r.ru_utime + r.ru_stime


def rss_kb(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None, logdir: Path | None = None) -> None:
        self.name = name
        self.log_path = (logdir or Path(tempfile.gettempdir())) / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.p = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            cwd=str(cwd) if cwd else None, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._log.close()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_http(proc: Proc, url: str, timeout: float = 60.0, ok: Callable[[int], bool] = lambda s: s < 500) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(r.status):
                    return
        except urllib.error.HTTPError as e:
            if ok(e.code):
                return
            last = str(e)
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready at {url}: {last}\n{proc.tail()}")


def listeners(port: int) -> int:
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="candela-bench-", dir=args.workdir))
        self.procs: list[Proc] = []
        self.scale = 0.5 if args.quick else 1.0
        self.results = RESULTS / "partial"  # where files of this run go (main: RESULTS for a full run)

    def d(self, seconds: float) -> float:
        return round(seconds * self.scale, 2)

    # -- targets -----------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], **kw: Any) -> Proc:
        p = Proc(name, argv, logdir=self.work, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: Proc) -> None:
        p.stop()
        if p in self.procs:
            self.procs.remove(p)

    def close(self) -> None:
        for p in list(self.procs):
            self.stop(p)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    @contextmanager
    def upstream(self, *extra: str) -> Iterator[str]:
        port = free_port()
        p = self.start(f"upstream-{port}", [str(BENCH_PY), str(BENCH / "upstream.py"), "--port", str(port), *extra])
        if "--stall" in extra:  # it never answers: listening is all there is to wait for
            deadline = time.monotonic() + 10
            while listeners(port) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            wait_http(p, f"http://127.0.0.1:{port}/healthz", 10)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            self.stop(p)

    @contextmanager
    def mitmdump(self, upstream: str, stream: bool = False,
                 optimize: bool = False) -> Iterator[tuple[str, Proc]]:
        """Bare mitmproxy; optimize: under `python -O`, as Candela serves (a reference only)."""
        port = free_port()
        argv = [str(ROOT / ".venv" / "bin" / "mitmdump"), "--mode", f"reverse:{upstream}",
                "--listen-host", "127.0.0.1", "--listen-port", str(port), "-q"]
        if stream:  # unbuffered bodies, as Candela streams SSE; otherwise mitmproxy buffers them
            argv += ["--set", "stream_large_bodies=1"]
        env = {"PYTHONOPTIMIZE": "1"} if optimize else None
        p = self.start(f"mitmdump-{port}", argv, env=env)
        wait_http(p, f"http://127.0.0.1:{port}/healthz", 30)
        try:
            yield f"http://127.0.0.1:{port}/v1/chat/completions", p
        finally:
            self.stop(p)

    def candela_config(self, upstream: str, tag: str, **extra: Any) -> Path:
        d = self.work / tag
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.db*"):
            f.unlink()
        users = {
            f"user{i:03d}@bench.example": {
                "tenants": ["research-team"],
                "daily_budget_usd": 1_000_000.0,
                "requests_per_minute": 100_000_000,
            }
            for i in range(USERS)
        }
        users["budget@bench.example"] = {
            "tenants": ["research-team"],
            "daily_budget_usd": EXACT_BUDGET,
            "requests_per_minute": 100_000_000,
        }
        cfg: dict[str, Any] = {
            "providers": {"openai": {"base_url": upstream}},
            "auth": {
                "api_keys": [
                    {"sha256": sha(key_of(i)), "user": f"user{i:03d}@bench.example"}
                    for i in range(USERS)
                ]
                + [{"sha256": sha("cdl_bench_budget"), "user": "budget@bench.example"}],
            },
            "users": users,
            "governance": {"models": {"mode": "allowlist", "allowed": [MODEL, EXACT_MODEL]}},
            "pricing": {EXACT_MODEL: {"input": 0.0, "output": 1000.0, "provider": "openai"}},
            "state": {"sqlite_path": str(d / "state.db")},
            "audit": {"sqlite_path": str(d / "audit.db")},
        }
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        path = d / "candela.json"  # YAML is a superset of JSON
        path.write_text(json.dumps(cfg, indent=1))
        return path

    @contextmanager
    def candela(self, upstream: str, tag: str = "candela", workers: int = 1,
                **extra: Any) -> Iterator[tuple[str, Proc]]:
        cfg = self.candela_config(upstream, tag, **extra)
        port = free_port()
        argv = [str(ROOT / ".venv" / "bin" / "candela-server"), "--config", str(cfg),
                "--port", str(port), "--log-level", "WARNING", "--workers", str(workers)]
        p = self.start(f"{tag}-{port}", argv, env={"OPENAI_API_KEY": PROVIDER_KEY}, cwd=cfg.parent)
        wait_http(p, f"http://127.0.0.1:{port}/healthz", 60, ok=lambda s: s == 200)
        deadline = time.monotonic() + 30
        while listeners(port) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}/proxy/openai/v1/chat/completions", p
        finally:
            self.stop(p)

    @contextmanager
    def litellm(self, upstream: str) -> Iterator[tuple[str, Proc]]:
        if not LITELLM.exists():
            raise RuntimeError(f"{LITELLM} is missing: make bench installs it")
        d = self.work / "litellm"
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "litellm.yaml"
        cfg.write_text(json.dumps({
            "model_list": [{
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{upstream}/v1",
                                   "api_key": PROVIDER_KEY},
            }],
            "litellm_settings": {"telemetry": False, "drop_params": True},
            # LiteLLM refuses to start without one; with no database it is checked per request
            "general_settings": {"master_key": LITELLM_KEY},
        }))
        port = free_port()
        p = self.start(f"litellm-{port}", [str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1",
                                           "--port", str(port), "--num_workers", "1"],
                       env={"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                            "DISABLE_SCHEMA_UPDATE": "True", "NO_DOCS": "True",
                            "PYTHONWARNINGS": "ignore"}, cwd=d)
        wait_http(p, f"http://127.0.0.1:{port}/health/liveliness", 180, ok=lambda s: s == 200)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.load(url, "closed", 4, 1.0, warmup=0.5, keys=[LITELLM_KEY])  # lazy imports
        try:
            yield url, p
        finally:
            self.stop(p)

    # -- load --------------------------------------------------------------------------------
    def load(self, url: str, mode: str, concurrency: int, duration: float, *, rate: float = 0,
             warmup: float = 1.0, stream: bool = False, max_tokens: int = 16,
             keys: bool | list[str] = True,
             model: str = MODEL, extra: list[str] | None = None, proc: Proc | None = None,
             sample_rss: bool = False, python: Path | None = None) -> dict[str, Any]:
        argv = [str(python or BENCH_PY), str(BENCH / "loadgen.py"), "--url", url, "--mode", mode,
                "--concurrency", str(concurrency), "--duration", str(duration),
                "--warmup", str(warmup), "--max-tokens", str(max_tokens), "--model", model]
        if rate:
            argv += ["--rate", str(rate)]
        if stream:
            argv.append("--stream")
        if keys:
            chosen = keys if isinstance(keys, list) else [key_of(i) for i in range(USERS)]
            argv += ["--keys", ",".join(chosen)]
        argv += extra or []
        cpu0 = cpu_seconds(proc.pid) if proc else 0.0
        busy0, children0 = machine_busy_s(), _children_cpu_s()
        peak = [0]
        stop = threading.Event()

        def sampler() -> None:
            while not stop.wait(0.25):
                peak[0] = max(peak[0], rss_kb(proc.pid)) if proc else 0

        t = threading.Thread(target=sampler, daemon=True)
        if sample_rss and proc:
            t.start()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 120)
        stop.set()
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
        r: dict[str, Any] = json.loads(out.stdout)
        # what the whole machine was doing meanwhile (warm-up included): is it full?
        span = duration + warmup
        r["span_s"] = span
        r["machine_busy_cores"] = round((machine_busy_s() - busy0) / span, 2)
        r["loadgen_cores"] = round((_children_cpu_s() - children0) / span, 2)
        if proc:
            # CPU of the target over the whole run (warm-up included) per request answered
            n = r["completed"] + r["errors"]
            total = n * (duration + warmup) / duration if duration else n
            r["target_cpu_s"] = round(cpu_seconds(proc.pid) - cpu0, 3)
            r["target_cpu_us_per_request"] = round(r["target_cpu_s"] / max(total, 1) * 1e6)
            if sample_rss:
                r["peak_rss_kb"] = peak[0]
        return r


# -- scenarios ----------------------------------------------------------------------------------


def s_latency(b: Bench, res: dict[str, Any]) -> None:
    """1. Added latency at concurrency 1: a fixed rate well below every target's capacity."""
    rate, dur = 50.0, b.d(3)
    out: dict[str, Any] = {"rate_rps": rate, "duration_s": dur, "rounds": ROUNDS}
    with b.upstream() as up, ExitStack() as alive:
        targets: list[tuple[str, str, Proc | None, bool | list[str]]] = [
            ("direct", up + "/v1/chat/completions", None, False)]
        makers: list[tuple[str, Callable[[], Any], bool | list[str]]] = [
            ("mitmproxy", lambda: b.mitmdump(up), False),
            ("mitmproxy -O", lambda: b.mitmdump(up, optimize=True), False),
            ("candela", lambda: b.candela(up), True)]
        if not b.args.no_litellm:
            makers.append(("litellm", lambda: b.litellm(up), [LITELLM_KEY]))
        for name, make, keys in makers:  # all up at once, idle while another is measured
            url, p = alive.enter_context(make())
            targets.append((name, url, p, keys))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in targets}
        # a reference: one connection, each request sent as the last answer ends (warm caches)
        b2b: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in targets}
        for _round in range(ROUNDS):
            for name, url, p, keys in targets:
                runs[name].append(b.load(url, "open", 1, dur, rate=rate, keys=keys, proc=p))
                b2b[name].append(b.load(url, "closed", 1, dur, keys=keys, proc=p))
    for into, by_target in ((out, runs), (out.setdefault("back_to_back", {}), b2b)):
        for name, rs in by_target.items():
            into[name] = merged(rs, "latency_ms")
        for k, rs in by_target.items():
            if k != "direct":
                base = by_target["direct"]
                into[k]["added_p50_ms"] = added(rs, base, "latency_ms", "p50")
                into[k]["added_p99_ms"] = added(rs, base, "latency_ms", "p99")
                into[k]["rounds_added_p50_ms"] = [
                    round(r["latency_ms"]["p50"] - d["latency_ms"]["p50"], 3)
                    for r, d in zip(rs, base, strict=True)]
    out["cold_probe"] = cold_probe(b, 1000 / rate)
    res["s1_latency"] = out


def merged(rs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Rounds of one target as one result: each quantile and the CPU per request, their medians."""
    out: dict[str, Any] = {
        key: {q: round(statistics.median(r[key][q] for r in rs), 4) for q in rs[0][key]},
        "completed": sum(r["completed"] for r in rs), "errors": sum(r["errors"] for r in rs)}
    cpu = [r["target_cpu_us_per_request"] for r in rs if "target_cpu_us_per_request" in r]
    if cpu:
        out["target_cpu_us_per_request"] = round(statistics.median(cpu))
    return out


def added(rs: list[dict[str, Any]], base: list[dict[str, Any]], key: str, q: str) -> float:
    """What a target adds to the direct path: the median of the rounds' differences."""
    return round(statistics.median(r[key][q] - d[key][q] for r, d in zip(rs, base, strict=True)), 3)


def cold_probe(b: Bench, gap_ms: float) -> dict[str, Any]:
    """The same pieces of the request path back to back and after the pause between requests."""
    return project_script("coldprobe.py", "--dir", str(b.work),
                          "--calls", str(max(50, int(200 * b.scale))), "--gap-ms", str(gap_ms))


def project_script(name: str, *args: str) -> Any:
    """Run bench/<name> with the project's environment (Candela importable); its JSON answer."""
    r = subprocess.run([str(VENV_PY), str(BENCH / name), *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)


def s_throughput(b: Bench, res: dict[str, Any]) -> None:
    """2. Maximum throughput, closed loop, at concurrency 16 and 64 (five interleaved rounds)."""
    dur = b.d(4)
    out: dict[str, Any] = {"duration_s": dur, "rounds": S2_ROUNDS}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    with b.upstream() as up:
        out["upstream_direct_c64"] = b.load(up + "/v1/chat/completions", "closed", 64, dur, keys=False)
        targets: list[tuple[str, Callable[[], Any], bool | list[str]]] = [
            ("mitmproxy", lambda: b.mitmdump(up), False),
            ("candela", lambda: b.candela(up), True),  # right after its baseline: a pair per round
            # a reference: mitmdump under python -O, as Candela serves (candela_mitm/cli.py)
            ("mitmproxy -O", lambda: b.mitmdump(up, optimize=True), False),
        ]
        if not b.args.no_litellm:
            targets.append(("litellm", lambda: b.litellm(up), [LITELLM_KEY]))
        for _round in range(S2_ROUNDS):
            for name, make, keys in targets:
                with make() as (url, p):
                    for c in (16, 64):
                        r = b.load(url, "closed", c, dur, keys=keys, proc=p)
                        runs.setdefault(name, {}).setdefault(c, []).append(r)
                        log(f"  {name} c{c}: {r['throughput_rps']} req/s, p50 {r['latency_ms']['p50']} ms, "
                            f"{r.get('target_cpu_us_per_request')} us CPU/req, errors {r['errors']}")
    for name, by_c in runs.items():
        out[name] = {}
        for c, rs in by_c.items():
            best = max(rs, key=lambda r: r["throughput_rps"])
            best["rounds_rps"] = [r["throughput_rps"] for r in rs]
            out[name][f"c{c}"] = best
    res["s2_throughput"] = out


def round_ratios(s2: dict[str, Any], a: str, b: str, c: int) -> list[float]:
    """Target a's rate over target b's, round by round (each round measures both minutes apart)."""
    return ratios(_get(s2, a, f"c{c}", "rounds_rps"), _get(s2, b, f"c{c}", "rounds_rps"))


def ratios(xs: list[float] | None, ys: list[float] | None) -> list[float]:
    """xs[i] / ys[i], round by round (a pair measured in the same round); none where y <= 0."""
    return [round(x / y, 3) for x, y in zip(xs or [], ys or [], strict=False) if y > 0]


def s_streaming(b: Bench, res: dict[str, Any]) -> None:
    """3. Streaming: time to first token by stream length; inter-chunk gaps under 100 streams."""
    gap_ms = 2.0
    lengths = (16, 128, 512)
    conc = 24  # 5 streams/s of up to ~1 s each: enough connections that none waits for one
    out: dict[str, Any] = {"chunk_gap_ms": gap_ms, "rounds": ROUNDS, "ttft": {}, "gaps": {}}
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {} for n in lengths}
    with b.upstream("--chunk-gap-ms", str(gap_ms)) as up, ExitStack() as alive:
        murl, mp = alive.enter_context(b.mitmdump(up, stream=True))
        curl, cp = alive.enter_context(b.candela(up))
        targets = (("direct", up + "/v1/chat/completions", None, False),
                   ("mitmproxy", murl, mp, False), ("candela", curl, cp, True))
        for _round in range(ROUNDS):
            for n in lengths:
                for name, url, p, keys in targets:
                    r = b.load(url, "open", conc, b.d(3), rate=5, stream=True, max_tokens=n,
                               keys=keys, proc=p)
                    runs[n].setdefault(name, []).append(r)
    for n in lengths:
        row = out["ttft"][n] = {name: merged(rs, "ttft_ms") for name, rs in runs[n].items()}
        for k in ("mitmproxy", "candela"):
            row[k]["added_ttft_p50_ms"] = added(runs[n][k], runs[n]["direct"], "ttft_ms", "p50")
            row[k]["added_ttft_p99_ms"] = added(runs[n][k], runs[n]["direct"], "ttft_ms", "p99")
    # flat in length: the growth from the shortest to the longest stream, measured in one round
    first, last = runs[lengths[0]], runs[lengths[-1]]
    out["ttft_growth_ms"] = round(statistics.median(
        (lc["ttft_ms"]["p50"] - ld["ttft_ms"]["p50"]) - (fc["ttft_ms"]["p50"] - fd["ttft_ms"]["p50"])
        for lc, ld, fc, fd in zip(last["candela"], last["direct"], first["candela"], first["direct"],
                                  strict=True)), 3)
    # 100 concurrent streams, 20 ms between chunks, 100 chunks each: 2 s per stream
    with b.upstream("--chunk-gap-ms", "20") as up:
        dur = b.d(8)
        out["gaps"]["chunk_gap_ms"] = 20
        out["gaps"]["direct"] = b.load(up + "/v1/chat/completions", "closed", 100, dur, stream=True,
                                       max_tokens=100, keys=False, extra=["--ramp", "1"])
        with b.mitmdump(up, stream=True) as (url, p):
            out["gaps"]["mitmproxy"] = b.load(url, "closed", 100, dur, stream=True, max_tokens=100,
                                              keys=False, proc=p, extra=["--ramp", "1"])
        with b.candela(up) as (url, p):
            out["gaps"]["candela"] = b.load(url, "closed", 100, dur, stream=True, max_tokens=100,
                                            proc=p, extra=["--ramp", "1"])
    res["s3_streaming"] = out


def s_memory(b: Bench, res: dict[str, Any]) -> None:
    """4. RSS idle and with 1,000 concurrent streams (50 ms between chunks: each stays open)."""
    streams = 1000
    out: dict[str, Any] = {"streams": streams}
    with b.upstream("--chunk-gap-ms", "50") as up:
        for name, make, keys in (("mitmproxy", lambda: b.mitmdump(up, stream=True), False),
                                 ("candela", lambda: b.candela(up), True)):
            with make() as (url, p):
                b.load(url, "closed", 4, 1.0, warmup=0.2, keys=keys, max_tokens=4)  # warm
                time.sleep(0.5)
                idle = rss_kb(p.pid)
                r = b.load(url, "closed", streams, b.d(10), warmup=0, stream=True, max_tokens=400,
                           keys=keys, proc=p, sample_rss=True, extra=["--ramp", "3"])
                peak = r["peak_rss_kb"]
                out[name] = {
                    "idle_rss_kb": idle,
                    "peak_rss_kb": peak,
                    "kb_per_stream": round((peak - idle) / streams, 1),
                    "completed": r["completed"],
                    "errors": r["errors"],
                    "error_kinds": r["error_kinds"],
                    "gap_ms": r["gap_ms"],
                }
                log(f"  {name}: idle {idle} kB, peak {peak} kB, {out[name]['kb_per_stream']} kB/stream")
    res["s4_memory"] = out


def s_audit(b: Bench, res: dict[str, Any]) -> None:
    """5. Audit ledger write throughput; proxy p99 while a mirror sink (BigQuery) is stalled."""
    out: dict[str, Any] = {}
    for durable in (0, 1):
        out["ledger_durable" if durable else "ledger"] = project_script(
            "audit_bench.py", "--dir", str(b.work / "audit"),
            "--entries", str(int(100_000 * b.scale)), "--durable-every", str(durable))
    rate, dur = 100.0, b.d(8)  # about a third of one worker's capacity: p99 shows stalls, not queueing
    out["rate_rps"] = rate
    with b.upstream() as up:
        # settle: the mirror's thread imports the BigQuery client after /healthz answers
        settle = 5.0
        with b.candela(up, tag="nomirror") as (url, p):
            time.sleep(settle)
            out["no_mirror"] = b.load(url, "open", 16, dur, rate=rate, proc=p)
        with b.upstream("--stall") as stalled:
            bq = {"project": "bench", "endpoint": stalled, "credentials": "anonymous"}
            with b.candela(up, tag="stalled", audit={"sinks": ["sqlite", "bigquery"], "bigquery": bq}) as (url, p):
                time.sleep(settle)
                out["mirror_stalled"] = b.load(url, "open", 16, dur, rate=rate, proc=p)
                out["mirror_stalled"]["mirror_connections_open"] = _connections_to(stalled)
    res["s5_audit"] = out


def _connections_to(url: str) -> int:
    """Established connections to url's port: proof the mirror is stuck waiting on it."""
    port = int(url.rsplit(":", 1)[1])
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:
            n += 1
    return n


def s_workers(b: Bench, res: dict[str, Any]) -> None:
    """6. One and two worker processes on one port, sharing the SQLite state; budgets exact."""
    dur = b.d(4)
    out: dict[str, Any] = {"cores": os.cpu_count(), "rounds": ROUNDS}
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with b.upstream() as up, ExitStack() as alive:
        urls = {n: alive.enter_context(b.candela(up, tag=f"workers{n}", workers=n)) for n in (1, 2)}
        for rnd in range(ROUNDS):  # both kept running, measured in turns, the order alternating
            for n in (1, 2) if rnd % 2 == 0 else (2, 1):
                url, p = urls[n]
                runs[n].append(b.load(url, "closed", 64, dur, proc=p))
                log(f"  workers={n}: {runs[n][-1]['throughput_rps']} req/s")
        out["budget"] = exact_budget(b, urls[2][0], b.work / "workers2" / "state.db")
    for n, rs in runs.items():  # the round with the median rate stands for the target
        rates = [r["throughput_rps"] for r in rs]
        out[f"workers_{n}"] = dict(sorted(rs, key=lambda r: r["throughput_rps"])[len(rs) // 2],
                                   rounds_rps=rates)
    out["rounds_ratio"] = ratios(out["workers_2"]["rounds_rps"], out["workers_1"]["rounds_rps"])
    res["s6_workers"] = out


def exact_budget(b: Bench, url: str, state_db: Path) -> dict[str, Any]:
    """200 requests at once over both workers from a user whose budget fits exactly 14."""
    r = b.load(url, "closed", 32, 30, warmup=0, keys=False, model=EXACT_MODEL,
               max_tokens=EXACT_TOKENS, extra=["--requests", "200", "--keys", "cdl_bench_budget"])
    with sqlite3.connect(state_db) as db:
        spent, reserved = db.execute(
            "SELECT spent, reserved FROM days WHERE user_id = 'budget@bench.example'").fetchone()
        (requests,) = db.execute(
            "SELECT sum(requests) FROM spend WHERE user_id = 'budget@bench.example'").fetchone()
    allowed = r["statuses"].get("200", 0)
    cost_nano = EXACT_TOKENS * 1000  # 7 tokens x $1000 per million, in nano-dollars: 7,000 x 1000
    return {
        "requests": 200,
        "statuses": r["statuses"],
        "expected_allowed": EXACT_FITS,
        "allowed": allowed,
        "spent_nano_usd": spent,
        "expected_spent_nano_usd": EXACT_FITS * cost_nano * 1000,
        "reserved_after_nano_usd": reserved,
        "settled_requests": requests,
        "exact": allowed == EXACT_FITS and spent == EXACT_FITS * cost_nano * 1000
        and reserved == 0 and requests == EXACT_FITS,
    }


def s_transparent(b: Bench, res: dict[str, Any]) -> None:
    """7. Transparent mode with TLS interception: new connections per second."""
    import transparent  # needs root, iptables and a network namespace

    res["s7_transparent"] = transparent.run(b)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread id of one process."""
    out: dict[int, float] = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(t.name)] = (int(f[11]) + int(f[12])) / TICK
    return out


def thread_names(stacks: list[tuple[list[str], int]]) -> dict[int, str]:
    """py-spy --threads names each stack's thread: 'thread (TID): NAME'."""
    names: dict[int, str] = {}
    for frames, _ in stacks:
        head = frames[0] if frames else ""
        if head.startswith("thread (") and "): " in head:
            tid, _, name = head[len("thread ("):].partition("): ")
            if tid.isdigit():
                names[int(tid)] = name.rstrip("0123456789_") if name.startswith("candela-gov") else name
    return names


def categorise(stacks: list[tuple[list[str], int]]) -> dict[str, int]:
    """Main-thread samples by who was running: Candela's state store (SQLite, on the event loop
    when its lock is free), Candela's audit encoding, the rest of Candela's pipeline, mitmproxy,
    or the event loop."""
    cats = {"candela_state_store": 0, "candela_audit": 0, "candela_pipeline": 0, "mitmproxy": 0,
            "asyncio_and_io": 0}
    for frames, n in stacks:
        body = [f for f in frames if not f.startswith(("thread", "process"))]
        if any("candela_mitm/state/" in f for f in body):
            cats["candela_state_store"] += n
        elif any("candela_mitm/audit/" in f for f in body):
            cats["candela_audit"] += n
        elif any("candela_mitm/" in f and "cli.py" not in f for f in body):
            cats["candela_pipeline"] += n
        elif any("mitmproxy/" in f for f in body[-12:]):
            cats["mitmproxy"] += n
        else:
            cats["asyncio_and_io"] += n
    return cats


def s_profile(b: Bench, res: dict[str, Any]) -> None:
    """Profile: py-spy on Candela (and bare mitmproxy) at c16: where a request's CPU goes."""
    from profile_summary import load, summarise

    dur = b.d(8)
    out: dict[str, Any] = {"duration_s": dur, "concurrency": 16}
    spy = BENCH_PY.parent / "py-spy"
    with b.upstream() as up:
        for name, make, keys in (("mitmproxy", lambda: b.mitmdump(up), False),
                                 ("candela", lambda: b.candela(up, tag="profile"), True)):
            with make() as (url, p):
                b.load(url, "closed", 16, 1.0, warmup=0.5, keys=keys)  # warm
                pid = p.pid
                raw = b.work / f"profile-{name}.txt"
                before = thread_cpu(pid)
                prof = subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(dur)), "-r", "200",
                                         "--gil", "--threads", "--format", "raw", "-o", str(raw)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                r = b.load(url, "closed", 16, dur, warmup=0, keys=keys, proc=p)
                after = thread_cpu(pid)
                prof.wait(30)
                n = max(r["completed"], 1)
                stacks = load(str(raw)) if raw.exists() else []
                names = thread_names(stacks)
                names[pid] = "MainThread"
                threads: dict[str, int] = {}
                for tid, cpu in after.items():
                    used = cpu - before.get(tid, 0.0)
                    if used > 0:
                        key = names.get(tid, "other threads")
                        threads[key] = threads.get(key, 0) + round(used / n * 1e6)
                entry: dict[str, Any] = {"throughput_rps": r["throughput_rps"],
                                         "cpu_us_per_request_by_thread": threads,
                                         "cpu_us_per_request": r.get("target_cpu_us_per_request")}
                if stacks:
                    main = [(f, c) for f, c in stacks if f and "MainThread" in f[0]]
                    cats = categorise(main)
                    total = sum(cats.values()) or 1
                    main_us = threads.get("MainThread", 0)
                    entry["main_thread_gil_samples"] = cats
                    entry["main_thread_share"] = {k: round(v / total, 3) for k, v in cats.items()}
                    entry["main_thread_us_per_request_estimate"] = {k: round(main_us * v / total) for k, v in cats.items()}
                    summary = summarise(main, 40, None)
                    (b.results / f"profile-{name}.summary.txt").write_text(summary + "\n")
                    with gzip.open(b.results / f"profile-{name}.txt.gz", "wb") as gz:
                        gz.write(raw.read_bytes())  # py-spy's raw stacks: flamegraph.pl input
                out[name] = entry
                log(f"  {name}: {entry.get('cpu_us_per_request')} us CPU/req; threads {threads}; "
                    f"main thread {entry.get('main_thread_share')}")
    res["profile"] = out


SCENARIOS: dict[str, Callable[[Bench, dict[str, Any]], None]] = {
    "s1": s_latency,
    "s2": s_throughput,
    "s3": s_streaming,
    "s4": s_memory,
    "s5": s_audit,
    "s6": s_workers,
    "s7": s_transparent,
    "profile": s_profile,
}


# -- report -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError):
        pass

    def version(py: Path, mod: str) -> str:
        try:
            return subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version('{mod}'))"],
                                  capture_output=True, text=True, timeout=60).stdout.strip() or "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mb": mem,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mitmproxy": version(VENV_PY, "mitmproxy"),
        "litellm": version(ROOT / ".venv-litellm" / "bin" / "python", "litellm"),
        "uvloop_in_harness": version(BENCH_PY, "uvloop"),
        "load_average_at_start": os.getloadavg(),
    }


def _get(d: dict[str, Any], *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _cores(run: dict[str, Any] | None) -> float | None:
    """Cores the target used over a load run (its CPU seconds over the run's length)."""
    if not run or "target_cpu_s" not in run or not run.get("span_s"):
        return None
    return round(run["target_cpu_s"] / run["span_s"], 2)


def _ratio(a: Any, b: Any) -> float | None:
    try:
        return round(float(a) / float(b), 3) if b else None
    except (TypeError, ValueError):
        return None


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 7 with what was measured and whether it held."""
    rows: list[dict[str, Any]] = []

    def add(target: str, measured: Any, holds: bool | None, how: str) -> None:
        if "None" in str(measured):  # the scenario did not run (or failed): no row
            return
        rows.append({"target": target, "measured": measured, "holds": holds, "how": how})

    s2 = res.get("s2_throughput", {})
    for c in (16, 64):
        cand = _get(s2, "candela", f"c{c}", "throughput_rps")
        bare = _get(s2, "mitmproxy", f"c{c}", "throughput_rps")
        r = _ratio(cand, bare)
        per_round = round_ratios(s2, "candela", "mitmproxy", c)
        if per_round:  # the verdict: the median of the rounds' ratios (a pair measured together)
            med = round(statistics.median(per_round), 3)
            add(f"throughput >= 0.85x bare mitmproxy (c{c})",
                f"{med}x, median of rounds {per_round}; best of each: {r}x ({cand} vs {bare} req/s)",
                med >= 0.85, f"s2 closed loop, {len(per_round)} rounds, each Candela right after mitmproxy")
        else:
            add(f"throughput >= 0.85x bare mitmproxy (c{c})", f"{r}x ({cand} vs {bare} req/s)",
                None if r is None else r >= 0.85, "s2 closed loop, best of the rounds")
        opt = _get(s2, "mitmproxy -O", f"c{c}", "throughput_rps")
        if opt is not None:
            r1 = _ratio(cand, opt)
            per_opt = round_ratios(s2, "candela", "mitmproxy -O", c)
            med_opt = round(statistics.median(per_opt), 3) if per_opt else None
            add(f"(reference) throughput vs mitmproxy under python -O (c{c})",
                f"{med_opt}x, median of rounds {per_opt}; best of each: {r1}x ({cand} vs {opt} req/s)",
                None, "s2: Candela serves under -O; the target's baseline is mitmdump as installed")
        lite = _get(s2, "litellm", f"c{c}", "throughput_rps")
        r2 = _ratio(cand, lite)
        add(f"throughput >= 5x LiteLLM (c{c})", f"{r2}x ({cand} vs {lite} req/s)",
            None if r2 is None else r2 >= 5, "s2 closed loop")
    up = _get(s2, "upstream_direct_c64", "throughput_rps")
    best_proxy = max([_get(s2, k, f"c{c}", "throughput_rps") or 0 for k in ("mitmproxy", "candela")
                      for c in (16, 64)] or [0])
    r = _ratio(up, best_proxy)
    add("fake upstream >= 10x the proxy's rate", f"{r}x ({up} vs {best_proxy} req/s)",
        None if r is None else r >= 10, "direct closed loop c64 vs the fastest proxy run")
    s1 = res.get("s1_latency", {})
    c_add, m_add, l_add = (_get(s1, k, "added_p50_ms") for k in ("candela", "mitmproxy", "litellm"))
    r = _ratio(c_add, m_add)
    per_round = ratios(_get(s1, "candela", "rounds_added_p50_ms"),
                       _get(s1, "mitmproxy", "rounds_added_p50_ms"))
    if per_round:  # the verdict: the median of the rounds' ratios
        med = round(statistics.median(per_round), 3)
        add("added p50 latency <= 1.25x bare mitmproxy's",
            f"{med}x, median of rounds {per_round} (medians: {c_add} vs {m_add} ms)", med <= 1.25,
            f"s1 open loop, 50 req/s, concurrency 1, {len(per_round)} rounds")
    else:
        add("added p50 latency <= 1.25x bare mitmproxy's", f"{r}x ({c_add} vs {m_add} ms)",
            None if r is None else r <= 1.25, "s1 open loop, 50 req/s, concurrency 1")
    bc, bm = (_get(s1, "back_to_back", k, "added_p50_ms") for k in ("candela", "mitmproxy"))
    if bc is not None and bm:
        per_b2b = ratios(_get(s1, "back_to_back", "candela", "rounds_added_p50_ms"),
                         _get(s1, "back_to_back", "mitmproxy", "rounds_added_p50_ms"))
        med_b2b = round(statistics.median(per_b2b), 3) if per_b2b else _ratio(bc, bm)
        add("(reference) added p50 at concurrency 1 back to back vs bare mitmproxy's",
            f"{med_b2b}x, median of rounds {per_b2b} (medians: {bc} vs {bm} ms)", None,
            "s1 closed loop, one connection: no pause between requests, so no cold caches")
    o_add = _get(s1, "mitmproxy -O", "added_p50_ms")
    if o_add is not None:
        add("(reference) added p50 vs mitmproxy under python -O", f"{_ratio(c_add, o_add)}x ({c_add} vs {o_add} ms)",
            None, "s1: Candela serves under -O; the target's baseline is mitmdump as installed")
    r = _ratio(c_add, l_add)
    add("added p50 latency <= 1/5 of LiteLLM's", f"{r}x ({c_add} vs {l_add} ms)",
        None if r is None else r <= 0.2, "s1")
    s3 = res.get("s3_streaming", {})
    ttfts = {n: _get(s3, "ttft", n, "candela", "added_ttft_p50_ms") for n in _get(s3, "ttft") or {}}
    ttfts = {int(k): v for k, v in ttfts.items() if v is not None}
    if ttfts:
        worst = max(ttfts.values())
        growth = s3.get("ttft_growth_ms", ttfts[max(ttfts)] - ttfts[min(ttfts)])
        add("added time to first token <= 3 ms", f"{worst} ms (p50, worst length)", worst <= 3.0,
            "s3 open loop, 5 streams/s")
        add("added TTFT flat in stream length",
            f"{ {k: v for k, v in sorted(ttfts.items())} } ms; longest minus shortest {round(growth, 3)} ms (median of rounds)",
            abs(growth) <= 1.0, "s3: added p50 at 512 tokens within 1 ms of that at 16 (median of rounds)")
    s4 = res.get("s4_memory", {})
    kb = _get(s4, "candela", "kb_per_stream")
    add("RSS <= 64 KB per concurrent stream", f"{kb} KB (mitmproxy: {_get(s4, 'mitmproxy', 'kb_per_stream')} KB)",
        None if kb is None else kb <= 64, "s4 1,000 streams")
    s5 = res.get("s5_audit", {})
    eps = _get(s5, "ledger", "entries_per_s")
    add("audit >= 20,000 entries/s", f"{eps} entries/s (durable waiter per entry: {_get(s5, 'ledger_durable', 'entries_per_s')})",
        None if eps is None else eps >= 20_000, "s5 AuditWriter, SQLite on disk, fsync per batch")
    p99a, p99b = _get(s5, "no_mirror", "latency_ms", "p99"), _get(s5, "mirror_stalled", "latency_ms", "p99")
    if p99a is not None:
        add("proxy p99 unaffected by a stalled mirror", f"{p99b} ms stalled vs {p99a} ms without",
            None, "s5 open loop 200 req/s (reported, no numeric target)")
    s6 = res.get("s6_workers", {})
    r = _ratio(_get(s6, "workers_2", "throughput_rps"), _get(s6, "workers_1", "throughput_rps"))
    if s6.get("rounds_ratio"):  # the median of the rounds' ratios, each pair measured together
        r = round(statistics.median(s6["rounds_ratio"]), 3)
    one, busy = _cores(s6.get("workers_1")), _get(s6, "workers_2", "machine_busy_cores")
    room = "" if one is None or busy is None else (
        f" (one worker uses {one} cores, so 2x needs {round(2 * one, 2)}; the machine was {busy} of "
        f"{s6.get('cores')} busy with two)")
    per = f", median of rounds {s6['rounds_ratio']}" if s6.get("rounds_ratio") else ""
    add("two workers >= 1.6x one", f"{r}x{per} on {s6.get('cores')} cores{room}", None if r is None else r >= 1.6,
        "s6 closed loop c64; load generator and upstream share the same cores")
    ex = _get(s6, "budget", "exact")
    if ex is not None:
        add("budgets exact with two workers", f"{_get(s6, 'budget', 'allowed')} of 200 admitted, expected {EXACT_FITS}",
            bool(ex), "s6 burst of 200 from a user with room for exactly 14")
    s7 = res.get("s7_transparent", {})
    if s7:
        add("transparent TLS: new connections/s", f"candela {_get(s7, 'candela', 'throughput_rps')}, "
            f"mitmproxy {_get(s7, 'mitmproxy', 'throughput_rps')}", None, "s7 (reported, no numeric target)")
    return rows


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Run {res['started']} on {m['cpu']}, {m['cores']} cores, {m['memory_mb']} MB RAM, Linux "
        f"{m['kernel']}, Python {m['python']}, mitmproxy {m['mitmproxy']}, LiteLLM {m['litellm']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}. "
        "Proxy, load generator and fake upstream share these cores, on loopback.",
        "",
        "| Target (issue 7) | Measured | Holds |",
        "|---|---|---|",
    ]
    for v in res["verdicts"]:
        holds = {True: "yes", False: "**no**", None: "n/a"}[v["holds"]]
        lines.append(f"| {v['target']} | {v['measured']} | {holds} |")
    s2 = res.get("s2_throughput")
    if s2:
        lines += ["", "Throughput (closed loop) and latency under it:", "",
                  "| Target | c16 req/s | c16 p50 / p99 ms | c64 req/s | c64 p50 / p99 ms | CPU µs/req (c64) |",
                  "|---|---|---|---|---|---|"]
        for k in ("mitmproxy", "candela", "mitmproxy -O", "litellm"):
            if k in s2:
                a, c = s2[k]["c16"], s2[k]["c64"]
                lines.append(f"| {k} | {a['throughput_rps']} | {_f(a['latency_ms']['p50'])} / {_f(a['latency_ms']['p99'])} "
                             f"| {c['throughput_rps']} | {_f(c['latency_ms']['p50'])} / {_f(c['latency_ms']['p99'])} "
                             f"| {c.get('target_cpu_us_per_request', '-')} |")
        lines.append(f"| direct (upstream) | | | {s2['upstream_direct_c64']['throughput_rps']} | "
                     f"{_f(s2['upstream_direct_c64']['latency_ms']['p50'])} / {_f(s2['upstream_direct_c64']['latency_ms']['p99'])} | |")
    s1 = res.get("s1_latency")
    if s1:
        lines += ["", f"Latency at concurrency 1 (open loop, {s1['rate_rps']} req/s; medians of "
                  f"{s1.get('rounds', 1)} rounds over targets kept running):", "",
                  "| Target | p50 ms | p99 ms | added p50 ms | CPU µs/req |", "|---|---|---|---|---|"]
        for k in ("direct", "mitmproxy", "mitmproxy -O", "candela", "litellm"):
            if k in s1:
                r = s1[k]
                lines.append(f"| {k} | {_f(r['latency_ms']['p50'], 3)} | {_f(r['latency_ms']['p99'], 3)} | "
                             f"{_f(r.get('added_p50_ms'), 3)} | {r.get('target_cpu_us_per_request', '-')} |")
        bb = s1.get("back_to_back")
        if bb:
            lines += ["", "The same, back to back (closed loop, one connection: each request sent as the "
                      "last answer ends), added p50 ms: " + ", ".join(
                          f"{k} {_f(bb[k].get('added_p50_ms'), 3)} ({bb[k].get('target_cpu_us_per_request', '-')} µs CPU/req)"
                          for k in ("mitmproxy", "mitmproxy -O", "candela", "litellm") if k in bb) + "."]
        cp = s1.get("cold_probe")
        if cp:
            t, a = cp["rate_check_txn"], cp["audit_entry"]
            lines += ["", f"The machine at this rate (`bench/coldprobe.py`, thread CPU, median of {cp['calls']}): "
                      f"a rate-limit check in the SQLite state store takes {t['back_to_back_us']} µs back to back "
                      f"and {t['after_gap_us']} µs after a {cp['gap_ms']:g} ms pause ({t['factor']}x); an audit "
                      f"entry's redaction and JSON {a['back_to_back_us']} and {a['after_gap_us']} µs ({a['factor']}x)."]
    s3 = res.get("s3_streaming")
    if s3:
        lines += ["", f"Streaming: time to first token (p50 / p99 ms, medians of {s3.get('rounds', 1)} rounds; "
                  f"upstream paces chunks {s3['chunk_gap_ms']} ms apart):", "",
                  "| Tokens | direct | mitmproxy | candela | candela added p50 |", "|---|---|---|---|---|"]
        for n, row in s3["ttft"].items():
            cells = [f"{_f(row[k]['ttft_ms']['p50'], 3)} / {_f(row[k]['ttft_ms']['p99'], 3)}" for k in ("direct", "mitmproxy", "candela")]
            lines.append(f"| {n} | {' | '.join(cells)} | {_f(row['candela']['added_ttft_p50_ms'], 3)} |")
        g = s3["gaps"]
        lines += ["", f"Inter-chunk gap under 100 concurrent streams (upstream gap {g['chunk_gap_ms']} ms), ms:", "",
                  "| Target | p50 | p99 | p99.9 | max | streams done | errors |", "|---|---|---|---|---|---|---|"]
        for k in ("direct", "mitmproxy", "candela"):
            r = g[k]
            lines.append(f"| {k} | {_f(r['gap_ms']['p50'])} | {_f(r['gap_ms']['p99'])} | {_f(r['gap_ms']['p99.9'])} | "
                         f"{_f(r['gap_ms']['max'])} | {r['completed']} | {r['errors']} |")
    s4 = res.get("s4_memory")
    if s4:
        lines += ["", f"Memory with {s4['streams']} concurrent streams:", "",
                  "| Target | idle RSS MB | peak RSS MB | KB per stream |", "|---|---|---|---|"]
        for k in ("mitmproxy", "candela"):
            r = s4[k]
            lines.append(f"| {k} | {r['idle_rss_kb'] / 1024:.1f} | {r['peak_rss_kb'] / 1024:.1f} | {r['kb_per_stream']} |")
    s5 = res.get("s5_audit")
    if s5:
        lines += ["", "Audit: "
                  f"{s5['ledger']['entries_per_s']} entries/s committed ({s5['ledger']['batches']} batches); "
                  f"{s5['ledger_durable']['entries_per_s']} entries/s when every entry has a durable waiter. "
                  f"Proxy at {s5['rate_rps']} req/s: p50/p99 {_f(s5['no_mirror']['latency_ms']['p50'])}/"
                  f"{_f(s5['no_mirror']['latency_ms']['p99'])} ms without a mirror, "
                  f"{_f(s5['mirror_stalled']['latency_ms']['p50'])}/{_f(s5['mirror_stalled']['latency_ms']['p99'])} ms "
                  f"with a BigQuery mirror that never answers (errors {s5['mirror_stalled']['errors']})."]
    s6 = res.get("s6_workers")
    if s6:
        b = s6.get("budget", {})
        lines += ["", f"Workers (c64, the median of {s6.get('rounds', 1)} rounds): 1 worker "
                  f"{s6['workers_1']['throughput_rps']} req/s, 2 workers "
                  f"{s6['workers_2']['throughput_rps']} req/s on {s6['cores']} cores; with 2 workers the "
                  f"machine was {_get(s6, 'workers_2', 'machine_busy_cores')} of {s6['cores']} cores busy "
                  f"(Candela {_cores(s6.get('workers_2'))}, the load generator "
                  f"{_get(s6, 'workers_2', 'loadgen_cores')}; 1 worker: Candela {_cores(s6.get('workers_1'))}, "
                  f"machine {_get(s6, 'workers_1', 'machine_busy_cores')}). Budget burst: "
                  f"{b.get('allowed')} of 200 admitted (expected {b.get('expected_allowed')}), spent "
                  f"{b.get('spent_nano_usd')} nano-USD (expected {b.get('expected_spent_nano_usd')}), "
                  f"reserved after {b.get('reserved_after_nano_usd')}: exact = {b.get('exact')}."]
    s7 = res.get("s7_transparent")
    if s7:
        lines += ["", "Transparent mode, TLS intercepted, one request per new connection:", "",
                  "| Target | connections/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
        for k in ("direct", "mitmproxy", "candela"):
            if k in s7:
                r = s7[k]
                lines.append(f"| {k} | {r['throughput_rps']} | {_f(r['latency_ms']['p50'])} | {_f(r['latency_ms']['p99'])} | {r['errors']} |")
        if "note" in s7:
            lines += ["", s7["note"]]
    prof = res.get("profile")
    if prof and "candela" in prof and "mitmproxy" in prof:
        c, m = prof["candela"], prof["mitmproxy"]
        th = c.get("cpu_us_per_request_by_thread", {})
        est = c.get("main_thread_us_per_request_estimate", {})
        lines += ["", f"Where Candela's CPU goes (py-spy at 16 connections, µs per request): "
                  f"{c.get('cpu_us_per_request')} in all against bare mitmproxy's {m.get('cpu_us_per_request')}. "
                  f"Event loop {th.get('MainThread')}: mitmproxy's proxy core {est.get('mitmproxy')}, "
                  f"Candela's pipeline code {est.get('candela_pipeline')}, its state store (SQLite: 2 write "
                  f"transactions, run on the event loop when the lock is free) {est.get('candela_state_store')}, "
                  f"its audit entries' encoding {est.get('candela_audit')}, asyncio {est.get('asyncio_and_io')}; "
                  f"state-store threads (only when the lock was taken) {th.get('candela-gov', 0)}; "
                  f"audit writer thread (hash chain, insert, fsync) {th.get('candela-audit-writer')}; "
                  f"WAL checkpoints {th.get('candela-state-checkpoint', 0)}. Profiles: `bench/results/profile-*`."]
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    if res.get("errors"):
        lines += ["", "Scenarios that failed to run:", ""] + [f"- {k}: {v}" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


def update_readme(md: str, stamp: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    section = (
        "## Benchmarks\n\n"
        "`make bench` (not part of `make test`) installs the harness (`.venv-bench`: uvloop, py-spy, "
        "pyinstrument) and LiteLLM (`.venv-litellm`), then runs `bench/run.py`: a fake OpenAI upstream "
        "(`bench/upstream.py`), an open- and closed-loop load generator (`bench/loadgen.py`), and the "
        "scenarios of issue 7 against direct, bare mitmproxy (mitmdump reverse mode, no addons), "
        "Candela with the full pipeline and LiteLLM's proxy, in one run. Figures are ratios measured "
        "side by side; results go to `bench/results/` (JSON and markdown). `bench/README.md` has "
        "the method, the workers' design, the hot-path changes, and, for each target that does not "
        "hold, the profile that says why.\n\n"
        f"Newest run ({stamp}):\n\n" + md
    )
    marker = "\n## Benchmarks\n"
    if marker in text:
        head, rest = text.split(marker, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt:] if nxt >= 0 else "\n"
        text = head + "\n" + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", help="comma-separated scenarios (s1..s7); default all")
    p.add_argument("--quick", action="store_true", help="half durations (a smoke run)")
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, databases)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--render", metavar="JSON", help="only rewrite the tables (and README) from a results file")
    a = p.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text())
        res["verdicts"] = verdicts(res)
        Path(a.render).write_text(json.dumps(res, indent=1, default=str))
        md = markdown(res)
        stamp = res["started"]
        (RESULTS / f"{stamp}.md").write_text(f"# Benchmarks {stamp}\n\n" + md)
        (RESULTS / "latest.md").write_text(f"# Benchmarks {stamp}\n\n" + md)
        if not a.no_readme:
            update_readme(md, stamp)
        print(md)
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    chosen = [s.strip() for s in a.only.split(",")] if a.only else list(SCENARIOS)
    # only a whole run (every scenario, full durations) is the newest result; a part goes aside
    full = not a.only and not a.quick
    where = RESULTS if full else RESULTS / "partial"
    where.mkdir(parents=True, exist_ok=True)
    b = Bench(a)
    b.results = where
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    res: dict[str, Any] = {"started": stamp, "machine": machine(), "errors": {}, "notes": []}
    t0 = time.monotonic()
    try:
        for name in chosen:
            log(f"{name}: {(SCENARIOS[name].__doc__ or name).splitlines()[0]}")
            s0 = time.monotonic()
            try:
                SCENARIOS[name](b, res)
            except Exception as e:  # one broken scenario must not lose the others
                res["errors"][name] = f"{type(e).__name__}: {str(e)[:1500]}"
                log(f"{name} failed: {res['errors'][name]}")
            log(f"{name} done in {time.monotonic() - s0:.0f} s")
    finally:
        b.close()
    res["seconds"] = round(time.monotonic() - t0)
    res["verdicts"] = verdicts(res)
    (where / f"{stamp}.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (where / f"{stamp}.md").write_text(f"# Benchmarks {stamp}\n\n" + md)
    if full:
        (RESULTS / "latest.md").write_text(f"# Benchmarks {stamp}\n\n" + md)
        if not a.no_readme:
            update_readme(md, stamp)
    print(md)
    log(f"all done in {res['seconds']} s; results in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
