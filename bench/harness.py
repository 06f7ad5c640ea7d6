"""The bench harness: the processes under test (fake upstream, bare mitmproxy, Candela, LiteLLM),
how they are started and stopped, the load generator run, and what is measured about them (CPU,
RSS, listeners), plus the arithmetic over rounds the scenarios and the report share."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
VENV_PY = ROOT / ".venv" / "bin" / "python"
BENCH_PY = Path(os.environ.get("BENCH_PY", sys.executable))
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
TICK = os.sysconf("SC_CLK_TCK")

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


def get_in(d: dict[str, Any], *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


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


class Proc:
    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        logdir: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = (logdir or Path(tempfile.gettempdir())) / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.p = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
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


def wait_http(
    proc: Proc, url: str, timeout: float = 60.0, ok: Callable[[int], bool] = lambda s: s < 500
) -> None:
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


def connections_to(url: str) -> int:
    """Established connections to url's port: proof the mirror is stuck waiting on it."""
    port = int(url.rsplit(":", 1)[1])
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:
            n += 1
    return n


def project_script(name: str, *args: str) -> Any:
    """Run bench/<name> with the project's environment (Candela importable); its JSON answer."""
    r = subprocess.run(
        [str(VENV_PY), str(BENCH / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)


# -- targets and load -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="candela-bench-", dir=args.workdir))
        self.procs: list[Proc] = []
        self.scale = 0.5 if args.quick else 1.0
        self.results = (
            RESULTS / "partial"
        )  # where files of this run go (main: RESULTS for a full run)

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
        p = self.start(
            f"upstream-{port}",
            [str(BENCH_PY), str(BENCH / "upstream.py"), "--port", str(port), *extra],
        )
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
    def redis(self) -> Iterator[str]:
        """A redis-server of its own (no persistence), for Candela's Redis state backend."""
        port = free_port()
        p = self.start(
            f"redis-{port}",
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
        )
        deadline = time.monotonic() + 10
        while listeners(port) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            self.stop(p)

    @contextmanager
    def mitmdump(
        self, upstream: str, stream: bool = False, optimize: bool = False
    ) -> Iterator[tuple[str, Proc]]:
        """Bare mitmproxy; optimize: under `python -O`, as Candela serves (a reference only)."""
        port = free_port()
        argv = [
            str(ROOT / ".venv" / "bin" / "mitmdump"),
            "--mode",
            f"reverse:{upstream}",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "-q",
        ]
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
        for f in d.glob("*.db*"):  # the ledger, its log, its entry journals' folder
            if f.is_dir():
                shutil.rmtree(f)
            else:
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
        # issue 21: budget slices and rate leases are on by default; BENCH_SLICES=0 or
        # BENCH_LEASES=0 measures without them (per-request reservations and rate checks)
        gov: dict[str, Any] = cfg["governance"]
        if os.environ.get("BENCH_SLICES") in ("0", "1"):
            slices: dict[str, Any] = {"enabled": os.environ["BENCH_SLICES"] == "1"}
            if os.environ.get("BENCH_SLICE_FLUSH_MS"):
                slices["flush_ms"] = int(os.environ["BENCH_SLICE_FLUSH_MS"])
            gov["budgets"] = {"slices": slices}
        if os.environ.get("BENCH_LEASES") in ("0", "1"):
            gov["rate_limits"] = {"leases": {"enabled": os.environ["BENCH_LEASES"] == "1"}}
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        path = d / "candela.json"  # YAML is a superset of JSON
        path.write_text(json.dumps(cfg, indent=1))
        return path

    @contextmanager
    def candela(
        self,
        upstream: str,
        tag: str = "candela",
        workers: int = 1,
        env: dict[str, str] | None = None,
        **extra: Any,
    ) -> Iterator[tuple[str, Proc]]:
        """A candela-server on the fake upstream, `extra` merged into its config, `env` added
        to its environment."""
        cfg = self.candela_config(upstream, tag, **extra)
        port = free_port()
        argv = [
            str(ROOT / ".venv" / "bin" / "candela-server"),
            "--config",
            str(cfg),
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            "--workers",
            str(workers),
        ]
        p = self.start(
            f"{tag}-{port}", argv, env={"OPENAI_API_KEY": PROVIDER_KEY, **(env or {})}, cwd=cfg.parent
        )
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
        cfg.write_text(
            json.dumps(
                {
                    "model_list": [
                        {
                            "model_name": MODEL,
                            "litellm_params": {
                                "model": f"openai/{MODEL}",
                                "api_base": f"{upstream}/v1",
                                "api_key": PROVIDER_KEY,
                            },
                        }
                    ],
                    "litellm_settings": {"telemetry": False, "drop_params": True},
                    # LiteLLM refuses to start without one; with no database it is checked per request
                    "general_settings": {"master_key": LITELLM_KEY},
                }
            )
        )
        port = free_port()
        p = self.start(
            f"litellm-{port}",
            [
                str(LITELLM),
                "--config",
                str(cfg),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            env={
                "LITELLM_LOG": "ERROR",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "DISABLE_SCHEMA_UPDATE": "True",
                "NO_DOCS": "True",
                "PYTHONWARNINGS": "ignore",
            },
            cwd=d,
        )
        wait_http(p, f"http://127.0.0.1:{port}/health/liveliness", 180, ok=lambda s: s == 200)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.load(url, "closed", 4, 1.0, warmup=0.5, keys=[LITELLM_KEY])  # lazy imports
        try:
            yield url, p
        finally:
            self.stop(p)

    # -- load --------------------------------------------------------------------------------
    def load(
        self,
        url: str,
        mode: str,
        concurrency: int,
        duration: float,
        *,
        rate: float = 0,
        warmup: float = 1.0,
        stream: bool = False,
        max_tokens: int = 16,
        keys: bool | list[str] = True,
        model: str = MODEL,
        extra: list[str] | None = None,
        proc: Proc | None = None,
        sample_rss: bool = False,
        python: Path | None = None,
        start_at: float = 0.0,
    ) -> dict[str, Any]:
        argv = [
            str(python or BENCH_PY),
            str(BENCH / "loadgen.py"),
            "--url",
            url,
            "--mode",
            mode,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--max-tokens",
            str(max_tokens),
            "--model",
            model,
        ]
        if rate:
            argv += ["--rate", str(rate)]
        if start_at:
            argv += ["--start-at", repr(start_at)]
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

    def load_paired(
        self, targets: list[tuple[str, str, Proc | None, bool | list[str]]], duration: float,
        *, rate: float, concurrency: int = 1, **kw: Any,
    ) -> dict[str, dict[str, Any]]:
        """One open-loop load per target, all at once, each from its own load generator on its
        own connections at `rate`; their schedules staggered by 1/(rate x targets), so every
        target's requests meet the same moments of the machine (what a round-by-round
        comparison cannot: on this shared 2-core VM a target's p50 moves by up to 2x between
        rounds a minute apart). {name: load result}."""
        start = time.time() + 1.5  # every load generator up and connected by then
        out: dict[str, dict[str, Any]] = {}
        errors: list[BaseException] = []

        def one(j: int, name: str, url: str, p: Proc | None, keys: bool | list[str]) -> None:
            try:
                out[name] = self.load(
                    url, "open", concurrency, duration, rate=rate, keys=keys, proc=p,
                    start_at=start + j / (rate * len(targets)), **kw,
                )
            except BaseException as e:  # raised in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=one, args=(j, *t)) for j, t in enumerate(targets)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


# -- over rounds ------------------------------------------------------------------------------


def merged(rs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Rounds of one target as one result: each quantile and the CPU per request, their medians."""
    out: dict[str, Any] = {
        key: {q: round(statistics.median(r[key][q] for r in rs), 4) for q in rs[0][key]},
        "completed": sum(r["completed"] for r in rs),
        "errors": sum(r["errors"] for r in rs),
    }
    cpu = [r["target_cpu_us_per_request"] for r in rs if "target_cpu_us_per_request" in r]
    if cpu:
        out["target_cpu_us_per_request"] = round(statistics.median(cpu))
    return out


def added(rs: list[dict[str, Any]], base: list[dict[str, Any]], key: str, q: str) -> float:
    """What a target adds to the direct path: the median of the rounds' differences."""
    return round(statistics.median(r[key][q] - d[key][q] for r, d in zip(rs, base, strict=True)), 3)


def round_ratios(s2: dict[str, Any], a: str, b: str, c: int) -> list[float]:
    """Target a's rate over target b's, round by round (each round measures both minutes apart)."""
    return ratios(get_in(s2, a, f"c{c}", "rounds_rps"), get_in(s2, b, f"c{c}", "rounds_rps"))


def ratios(xs: list[float] | None, ys: list[float] | None) -> list[float]:
    """xs[i] / ys[i], round by round (a pair measured in the same round); none where y <= 0."""
    return [round(x / y, 3) for x, y in zip(xs or [], ys or [], strict=False) if y > 0]
