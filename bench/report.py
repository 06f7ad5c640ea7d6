"""The bench report: the machine, each target of issue 7 with its verdict, the markdown tables,
and the README's "## Benchmarks" section (the JSON is written by run.py)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import (
    BENCH_PY,
    EXACT_FITS,
    ROOT,
    VENV_PY,
    get_in,
    ratios,
    round_ratios,
)


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
            return (
                subprocess.run(
                    [str(py), "-c", f"import importlib.metadata as m; print(m.version('{mod}'))"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout.strip()
                or "?"
            )
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
        cand = get_in(s2, "candela", f"c{c}", "throughput_rps")
        bare = get_in(s2, "mitmproxy", f"c{c}", "throughput_rps")
        r = _ratio(cand, bare)
        per_round = round_ratios(s2, "candela", "mitmproxy", c)
        if per_round:  # the verdict: the median of the rounds' ratios (a pair measured together)
            med = round(statistics.median(per_round), 3)
            add(
                f"throughput >= 0.85x bare mitmproxy (c{c})",
                f"{med}x, median of rounds {per_round}; best of each: {r}x ({cand} vs {bare} req/s)",
                med >= 0.85,
                f"s2 closed loop, {len(per_round)} rounds, each Candela right after mitmproxy",
            )
        else:
            add(
                f"throughput >= 0.85x bare mitmproxy (c{c})",
                f"{r}x ({cand} vs {bare} req/s)",
                None if r is None else r >= 0.85,
                "s2 closed loop, best of the rounds",
            )
        opt = get_in(s2, "mitmproxy -O", f"c{c}", "throughput_rps")
        if opt is not None:
            r1 = _ratio(cand, opt)
            per_opt = round_ratios(s2, "candela", "mitmproxy -O", c)
            med_opt = round(statistics.median(per_opt), 3) if per_opt else None
            add(
                f"(reference) throughput vs mitmproxy under python -O (c{c})",
                f"{med_opt}x, median of rounds {per_opt}; best of each: {r1}x ({cand} vs {opt} req/s)",
                None,
                "s2: Candela serves under -O; the target's baseline is mitmdump as installed",
            )
        lite = get_in(s2, "litellm", f"c{c}", "throughput_rps")
        r2 = _ratio(cand, lite)
        add(
            f"throughput >= 5x LiteLLM (c{c})",
            f"{r2}x ({cand} vs {lite} req/s)",
            None if r2 is None else r2 >= 5,
            "s2 closed loop",
        )
    up = get_in(s2, "upstream_direct_c64", "throughput_rps")
    best_proxy = max(
        [
            get_in(s2, k, f"c{c}", "throughput_rps") or 0
            for k in ("mitmproxy", "candela")
            for c in (16, 64)
        ]
        or [0]
    )
    r = _ratio(up, best_proxy)
    add(
        "fake upstream >= 10x the proxy's rate",
        f"{r}x ({up} vs {best_proxy} req/s)",
        None if r is None else r >= 10,
        "direct closed loop c64 vs the fastest proxy run",
    )
    s1 = res.get("s1_latency", {})
    c_add, m_add, l_add = (
        get_in(s1, k, "added_p50_ms") for k in ("candela", "mitmproxy", "litellm")
    )
    r = _ratio(c_add, m_add)
    per_round = ratios(
        get_in(s1, "candela", "rounds_added_p50_ms"), get_in(s1, "mitmproxy", "rounds_added_p50_ms")
    )
    if per_round:  # the verdict: the median of the rounds' ratios
        med = round(statistics.median(per_round), 3)
        add(
            "added p50 latency <= 1.25x bare mitmproxy's",
            f"{med}x, median of rounds {per_round} (medians: {c_add} vs {m_add} ms)",
            med <= 1.25,
            f"s1 open loop, 50 req/s, concurrency 1, {len(per_round)} rounds",
        )
    else:
        add(
            "added p50 latency <= 1.25x bare mitmproxy's",
            f"{r}x ({c_add} vs {m_add} ms)",
            None if r is None else r <= 1.25,
            "s1 open loop, 50 req/s, concurrency 1",
        )
    bc, bm = (get_in(s1, "back_to_back", k, "added_p50_ms") for k in ("candela", "mitmproxy"))
    if bc is not None and bm:
        per_b2b = ratios(
            get_in(s1, "back_to_back", "candela", "rounds_added_p50_ms"),
            get_in(s1, "back_to_back", "mitmproxy", "rounds_added_p50_ms"),
        )
        med_b2b = round(statistics.median(per_b2b), 3) if per_b2b else _ratio(bc, bm)
        add(
            "(reference) added p50 at concurrency 1 back to back vs bare mitmproxy's",
            f"{med_b2b}x, median of rounds {per_b2b} (medians: {bc} vs {bm} ms)",
            None,
            "s1 closed loop, one connection: no pause between requests, so no cold caches",
        )
    o_add = get_in(s1, "mitmproxy -O", "added_p50_ms")
    if o_add is not None:
        add(
            "(reference) added p50 vs mitmproxy under python -O",
            f"{_ratio(c_add, o_add)}x ({c_add} vs {o_add} ms)",
            None,
            "s1: Candela serves under -O; the target's baseline is mitmdump as installed",
        )
    r = _ratio(c_add, l_add)
    add(
        "added p50 latency <= 1/5 of LiteLLM's",
        f"{r}x ({c_add} vs {l_add} ms)",
        None if r is None else r <= 0.2,
        "s1",
    )
    s3 = res.get("s3_streaming", {})
    ttfts = {
        n: get_in(s3, "ttft", n, "candela", "added_ttft_p50_ms") for n in get_in(s3, "ttft") or {}
    }
    ttfts = {int(k): v for k, v in ttfts.items() if v is not None}
    if ttfts:
        worst = max(ttfts.values())
        growth = s3.get("ttft_growth_ms", ttfts[max(ttfts)] - ttfts[min(ttfts)])
        add(
            "added time to first token <= 3 ms",
            f"{worst} ms (p50, worst length)",
            worst <= 3.0,
            "s3 open loop, 5 streams/s",
        )
        add(
            "added TTFT flat in stream length",
            f"{ {k: v for k, v in sorted(ttfts.items())} } ms; longest minus shortest {round(growth, 3)} ms (median of rounds)",
            abs(growth) <= 1.0,
            "s3: added p50 at 512 tokens within 1 ms of that at 16 (median of rounds)",
        )
    issue21(res, add)
    s4 = res.get("s4_memory", {})
    kb = get_in(s4, "candela", "kb_per_stream")
    add(
        "RSS <= 64 KB per concurrent stream",
        f"{kb} KB (mitmproxy: {get_in(s4, 'mitmproxy', 'kb_per_stream')} KB)",
        None if kb is None else kb <= 64,
        "s4 1,000 streams",
    )
    s5 = res.get("s5_audit", {})
    eps = get_in(s5, "ledger", "entries_per_s")
    add(
        "audit >= 20,000 entries/s",
        f"{eps} entries/s (durable waiter per entry: {get_in(s5, 'ledger_durable', 'entries_per_s')})",
        None if eps is None else eps >= 20_000,
        "s5 AuditWriter, SQLite on disk, fsync per batch",
    )
    p99a, p99b = (
        get_in(s5, "no_mirror", "latency_ms", "p99"),
        get_in(s5, "mirror_stalled", "latency_ms", "p99"),
    )
    if p99a is not None:
        add(
            "proxy p99 unaffected by a stalled mirror",
            f"{p99b} ms stalled vs {p99a} ms without",
            None,
            "s5 open loop 200 req/s (reported, no numeric target)",
        )
    s6 = res.get("s6_workers", {})
    r = _ratio(get_in(s6, "workers_2", "throughput_rps"), get_in(s6, "workers_1", "throughput_rps"))
    if s6.get("rounds_ratio"):  # the median of the rounds' ratios, each pair measured together
        r = round(statistics.median(s6["rounds_ratio"]), 3)
    one, busy = _cores(s6.get("workers_1")), get_in(s6, "workers_2", "machine_busy_cores")
    room = (
        ""
        if one is None or busy is None
        else (
            f" (one worker uses {one} cores, so 2x needs {round(2 * one, 2)}; the machine was {busy} of "
            f"{s6.get('cores')} busy with two)"
        )
    )
    per = f", median of rounds {s6['rounds_ratio']}" if s6.get("rounds_ratio") else ""
    add(
        "two workers >= 1.6x one",
        f"{r}x{per} on {s6.get('cores')} cores{room}",
        None if r is None else r >= 1.6,
        "s6 closed loop c64; load generator and upstream share the same cores",
    )
    ex = get_in(s6, "budget", "exact")
    if ex is not None:
        add(
            "budgets exact with two workers",
            f"{get_in(s6, 'budget', 'allowed')} of 200 admitted, expected {EXACT_FITS}",
            bool(ex),
            "s6 burst of 200 from a user with room for exactly 14",
        )
    s7 = res.get("s7_transparent", {})
    if s7:
        add(
            "transparent TLS: new connections/s",
            f"candela {get_in(s7, 'candela', 'throughput_rps')}, "
            f"mitmproxy {get_in(s7, 'mitmproxy', 'throughput_rps')}",
            None,
            "s7 (reported, no numeric target)",
        )
    otlp = res.get("otlp_dead_collector", {})
    for dead in ("candela, collector refused", "candela, collector stalled"):
        per = get_in(otlp, dead, "vs_no_export", "added_p50_rounds")
        if not per:
            continue
        p99 = get_in(otlp, dead, "vs_no_export", "p99_rounds") or []
        cpu = get_in(otlp, dead, "vs_no_export", "c16_cpu_rounds") or []
        rps = get_in(otlp, dead, "vs_no_export", "c16_rps_rounds") or []

        def med(xs: list[float]) -> float | None:
            return round(statistics.median(xs), 3) if xs else None

        add(
            f"(issue 20) {dead.split(', ', 1)[1]} vs no export: added p50",
            f"{med(per)}x, median of rounds {per}; p99 {med(p99)}x; at c16: "
            f"{med(rps)}x the rate, {med(cpu)}x the CPU per request "
            f"(export errors counted: {get_in(otlp, 'otlp_errors', dead)})",
            None,
            "otlp: open loop 50 req/s and closed loop c16, rounds over targets kept running",
        )
    return rows


def issue21(res: dict[str, Any], add: Callable[[str, Any, bool | None, str], None]) -> None:
    """Issue 21's targets, SQLite and Redis state each beside bare mitmproxy in the same run."""
    s1 = res.get("s1_latency", {})
    for name in ("candela", "candela redis"):
        for mode, into, bound in (("open 50/s", s1, 1.25), ("back to back", s1.get("back_to_back", {}), 1.5)):
            per = ratios(
                get_in(into, name, "rounds_added_p50_ms"),
                get_in(into, "mitmproxy", "rounds_added_p50_ms"),
            )
            if not per:
                continue
            med = round(statistics.median(per), 3)
            add(
                f"(issue 21) {name}: added p50 at concurrency 1, {mode}, <= {bound}x bare mitmproxy's",
                f"{med}x, median of rounds {per}",
                med <= bound,
                "s1, rounds over targets kept running",
            )
        paired = s1.get("paired", {})
        per = ratios(
            get_in(paired, name, "rounds_added_p50_ms"),
            get_in(paired, "mitmproxy", "rounds_added_p50_ms"),
        )
        if per:
            med = round(statistics.median(per), 3)
            add(
                f"(issue 21) {name}: added p50 at concurrency 1, open 50/s, paired, <= 1.25x bare "
                "mitmproxy's",
                f"{med}x, median of rounds {per} (medians: "
                f"{get_in(paired, name, 'added_p50_ms')} vs "
                f"{get_in(paired, 'mitmproxy', 'added_p50_ms')} ms)",
                med <= 1.25,
                "s1 paired: the targets loaded at once, schedules staggered (Bench.load_paired)",
            )
    pts = res.get("s2_points", {})
    for name, by_c in pts.items():
        if not isinstance(by_c, dict) or not name.startswith("candela"):
            continue
        at = {c: e.get("vs_mitmproxy") for c, e in by_c.items() if e.get("vs_mitmproxy") is not None}
        if at:
            worst = min(at.values())
            add(
                f"(issue 21) {name}: throughput at 1-16 keep-alive connections >= 0.9x bare mitmproxy's",
                ", ".join(f"{c} {v}x" for c, v in at.items()),
                worst >= 0.9,
                "s2p, medians of the rounds' ratios",
            )
    s3 = res.get("s3_streaming", {})
    for name in ("candela", "candela redis"):
        rounds = (s3.get("ttft_over_bare_rounds") or {}).get(name)
        if rounds:
            # each round measures bare mitmproxy and Candela seconds apart: the median of the
            # rounds' differences leaves out what the machine did between rounds
            over = {n: round(statistics.median(xs), 3) for n, xs in rounds.items() if xs}
            how = "s3 open loop, 5 streams/s, p50, median of the rounds' differences"
        else:  # a run from before the rounds were kept: the difference of the medians
            over = {
                n: round(row[name]["added_ttft_p50_ms"] - row["mitmproxy"]["added_ttft_p50_ms"], 3)
                for n, row in (s3.get("ttft") or {}).items()
                if name in row and row[name].get("added_ttft_p50_ms") is not None
            }
            how = "s3 open loop, 5 streams/s, p50, medians of rounds"
        if over:
            spread = f"; each round's p50 over bare's: {rounds} ms" if rounds else ""
            add(
                f"(issue 21) {name}: added time to first token <= bare mitmproxy's + 0.5 ms",
                f"over bare mitmproxy's by length: {over} ms{spread}",
                max(over.values()) <= 0.5,
                how,
            )


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
        lines += [
            "",
            "Throughput (closed loop) and latency under it:",
            "",
            "| Target | c16 req/s | c16 p50 / p99 ms | c64 req/s | c64 p50 / p99 ms | CPU µs/req (c64) |",
            "|---|---|---|---|---|---|",
        ]
        for k in ("mitmproxy", "candela", "mitmproxy -O", "litellm"):
            if k in s2:
                a, c = s2[k]["c16"], s2[k]["c64"]
                lines.append(
                    f"| {k} | {a['throughput_rps']} | {_f(a['latency_ms']['p50'])} / {_f(a['latency_ms']['p99'])} "
                    f"| {c['throughput_rps']} | {_f(c['latency_ms']['p50'])} / {_f(c['latency_ms']['p99'])} "
                    f"| {c.get('target_cpu_us_per_request', '-')} |"
                )
        lines.append(
            f"| direct (upstream) | | | {s2['upstream_direct_c64']['throughput_rps']} | "
            f"{_f(s2['upstream_direct_c64']['latency_ms']['p50'])} / {_f(s2['upstream_direct_c64']['latency_ms']['p99'])} | |"
        )
    pts = res.get("s2_points")
    if pts:
        cs = [f"c{c}" for c in pts["connections"]]
        lines += [
            "",
            f"Throughput at few keep-alive connections (issue 21; req/s, median of "
            f"{pts['rounds']} rounds, and the median of the rounds' ratios to bare mitmproxy):",
            "",
            "| Target | " + " | ".join(cs) + " |",
            "|---|" + "---|" * len(cs),
        ]
        for name, by_c in pts.items():
            if not isinstance(by_c, dict) or "c1" not in by_c:
                continue
            cells = []
            for c in cs:
                e = by_c.get(c, {})
                rps = statistics.median(e["rounds_rps"]) if e.get("rounds_rps") else None
                ratio = e.get("vs_mitmproxy")
                cells.append(
                    "-" if rps is None else f"{rps:.0f}" + (f" ({ratio}x)" if ratio else "")
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    s1 = res.get("s1_latency")
    if s1:
        lines += [
            "",
            f"Latency at concurrency 1 (open loop, {s1['rate_rps']} req/s; medians of "
            f"{s1.get('rounds', 1)} rounds over targets kept running):",
            "",
            "| Target | p50 ms | p99 ms | added p50 ms | CPU µs/req |",
            "|---|---|---|---|---|",
        ]
        for k in ("direct", "mitmproxy", "mitmproxy -O", "candela", "candela redis", "litellm"):
            if k in s1:
                r = s1[k]
                lines.append(
                    f"| {k} | {_f(r['latency_ms']['p50'], 3)} | {_f(r['latency_ms']['p99'], 3)} | "
                    f"{_f(r.get('added_p50_ms'), 3)} | {r.get('target_cpu_us_per_request', '-')} |"
                )
        bb = s1.get("back_to_back")
        if bb:
            lines += [
                "",
                "The same, back to back (closed loop, one connection: each request sent as the "
                "last answer ends), added p50 ms: "
                + ", ".join(
                    f"{k} {_f(bb[k].get('added_p50_ms'), 3)} ({bb[k].get('target_cpu_us_per_request', '-')} µs CPU/req)"
                    for k in ("mitmproxy", "mitmproxy -O", "candela", "candela redis", "litellm")
                    if k in bb
                )
                + ".",
            ]
        pa = s1.get("paired")
        if pa:
            lines += [
                "",
                "The same, paired (the direct path, bare mitmproxy and both Candelas loaded at once, "
                "each at the rate on its own connection, schedules staggered; medians of "
                f"{s1.get('rounds', 1)} rounds), added p50 ms: "
                + ", ".join(
                    f"{k} {_f(pa[k].get('added_p50_ms'), 3)} (rounds {pa[k].get('rounds_added_p50_ms')})"
                    for k in ("mitmproxy", "candela", "candela redis")
                    if k in pa
                )
                + ".",
            ]
        cp = s1.get("cold_probe")
        if cp:
            t, a = cp["rate_check_txn"], cp["audit_entry"]
            lines += [
                "",
                f"The machine at this rate (`bench/coldprobe.py`, thread CPU, median of {cp['calls']}): "
                f"a rate-limit check in the SQLite state store takes {t['back_to_back_us']} µs back to back "
                f"and {t['after_gap_us']} µs after a {cp['gap_ms']:g} ms pause ({t['factor']}x); an audit "
                f"entry's redaction and JSON {a['back_to_back_us']} and {a['after_gap_us']} µs ({a['factor']}x).",
            ]
    s3 = res.get("s3_streaming")
    if s3:
        lines += [
            "",
            f"Streaming: time to first token (p50 / p99 ms, medians of {s3.get('rounds', 1)} rounds"
            + (f", the longest streams {s3['longest_rounds']}" if s3.get("longest_rounds") else "")  # runs before 2026-12-06
            + "; "
            f"upstream paces chunks {s3['chunk_gap_ms']} ms apart):",
            "",
            "| Tokens | direct | mitmproxy | candela | candela redis | added p50: mitmproxy / candela / candela redis |",
            "|---|---|---|---|---|---|",
        ]
        for n, row in s3["ttft"].items():
            cells = [
                f"{_f(row[k]['ttft_ms']['p50'], 3)} / {_f(row[k]['ttft_ms']['p99'], 3)}"
                if k in row
                else "-"
                for k in ("direct", "mitmproxy", "candela", "candela redis")
            ]
            added_ = " / ".join(
                _f(row[k].get("added_ttft_p50_ms"), 3) if k in row else "-"
                for k in ("mitmproxy", "candela", "candela redis")
            )
            lines.append(f"| {n} | {' | '.join(cells)} | {added_} |")
        if s3.get("ttft_first_loads"):
            lines += [
                "",
                "Each user's first requests (one load a length before the rounds, not in them; a fresh "
                f"Candela admits them by the exact store call), TTFT p50 ms: {s3['ttft_first_loads']}",
            ]
        g = s3["gaps"]
        lines += [
            "",
            f"Inter-chunk gap under 100 concurrent streams (upstream gap {g['chunk_gap_ms']} ms), ms:",
            "",
            "| Target | p50 | p99 | p99.9 | max | streams done | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in ("direct", "mitmproxy", "candela"):
            r = g[k]
            lines.append(
                f"| {k} | {_f(r['gap_ms']['p50'])} | {_f(r['gap_ms']['p99'])} | {_f(r['gap_ms']['p99.9'])} | "
                f"{_f(r['gap_ms']['max'])} | {r['completed']} | {r['errors']} |"
            )
    s4 = res.get("s4_memory")
    if s4:
        lines += [
            "",
            f"Memory with {s4['streams']} concurrent streams:",
            "",
            "| Target | idle RSS MB | peak RSS MB | KB per stream |",
            "|---|---|---|---|",
        ]
        for k in ("mitmproxy", "candela"):
            r = s4[k]
            lines.append(
                f"| {k} | {r['idle_rss_kb'] / 1024:.1f} | {r['peak_rss_kb'] / 1024:.1f} | {r['kb_per_stream']} |"
            )
    s5 = res.get("s5_audit")
    if s5:
        lines += [
            "",
            "Audit: "
            f"{s5['ledger']['entries_per_s']} entries/s committed ({s5['ledger']['batches']} batches); "
            f"{s5['ledger_durable']['entries_per_s']} entries/s when every entry has a durable waiter. "
            f"Proxy at {s5['rate_rps']} req/s: p50/p99 {_f(s5['no_mirror']['latency_ms']['p50'])}/"
            f"{_f(s5['no_mirror']['latency_ms']['p99'])} ms without a mirror, "
            f"{_f(s5['mirror_stalled']['latency_ms']['p50'])}/{_f(s5['mirror_stalled']['latency_ms']['p99'])} ms "
            f"with a BigQuery mirror that never answers (errors {s5['mirror_stalled']['errors']}).",
        ]
    s6 = res.get("s6_workers")
    if s6:
        b = s6.get("budget", {})
        lines += [
            "",
            f"Workers (c64, the median of {s6.get('rounds', 1)} rounds): 1 worker "
            f"{s6['workers_1']['throughput_rps']} req/s, 2 workers "
            f"{s6['workers_2']['throughput_rps']} req/s on {s6['cores']} cores; with 2 workers the "
            f"machine was {get_in(s6, 'workers_2', 'machine_busy_cores')} of {s6['cores']} cores busy "
            f"(Candela {_cores(s6.get('workers_2'))}, the load generator "
            f"{get_in(s6, 'workers_2', 'loadgen_cores')}; 1 worker: Candela {_cores(s6.get('workers_1'))}, "
            f"machine {get_in(s6, 'workers_1', 'machine_busy_cores')}). Budget burst: "
            f"{b.get('allowed')} of 200 admitted (expected {b.get('expected_allowed')}), spent "
            f"{b.get('spent_nano_usd')} nano-USD (expected {b.get('expected_spent_nano_usd')}), "
            f"reserved after {b.get('reserved_after_nano_usd')}: exact = {b.get('exact')}.",
        ]
    s7 = res.get("s7_transparent")
    if s7:
        lines += [
            "",
            "Transparent mode, TLS intercepted, one request per new connection:",
            "",
            "| Target | connections/s | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|",
        ]
        for k in ("direct", "mitmproxy", "candela"):
            if k in s7:
                r = s7[k]
                lines.append(
                    f"| {k} | {r['throughput_rps']} | {_f(r['latency_ms']['p50'])} | {_f(r['latency_ms']['p99'])} | {r['errors']} |"
                )
        if "note" in s7:
            lines += ["", s7["note"]]
    ot = res.get("otlp_dead_collector")
    if ot:
        lines += [
            "",
            f"OTLP export to a dead collector (issue 20; open loop {ot['rate_rps']} req/s at "
            f"concurrency 1, then closed loop c16; medians of {ot['rounds']} rounds over targets "
            "kept running; every request sampled):",
            "",
            "| Target | p50 ms | p99 ms | added p50 ms | c16 req/s | CPU µs/req (c16) | export errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in (
            "direct",
            "candela, no export",
            "candela, collector refused",
            "candela, collector stalled",
        ):
            if k in ot:
                r = ot[k]
                cpu = [c for c in r["c16"].get("rounds_cpu_us", []) if c is not None]
                lines.append(
                    f"| {k} | {_f(r['latency_ms']['p50'], 3)} | {_f(r['latency_ms']['p99'], 3)} | "
                    f"{_f(r.get('added_p50_ms'), 3)} | {_f(max(r['c16']['rounds_rps']))} | "
                    f"{statistics.median(cpu) if cpu else '-'} | "
                    f"{_f(get_in(ot, 'otlp_errors', k))} |"
                )
    s9 = res.get("s9_relay")
    if s9 and "direct" in s9:
        lines += [
            "",
            "Host enforcement, HTTPS that is no provider's: direct vs relayed untouched by Candela:",
            "",
            "| Load | direct req/s | relayed req/s | ratio | direct p50 ms | relayed p50 ms | added p50 ms | errors (relayed) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k in s9.get("loads", ()):
            d, r, q = s9["direct"][k], s9["relayed"][k], s9["ratio"][k]
            lines.append(
                f"| {k} | {d['throughput_rps']} | {r['throughput_rps']} | {q['throughput']} | "
                f"{_f(d['latency_ms']['p50'])} | {_f(r['latency_ms']['p50'])} | "
                f"{_f(q['added_p50_ms'])} | {r['errors']} |"
            )
        if "note" in s9:
            lines += ["", s9["note"]]
    prof = res.get("profile")
    if prof and "candela" in prof and "mitmproxy" in prof:
        c, m = prof["candela"], prof["mitmproxy"]
        th = c.get("cpu_us_per_request_by_thread", {})
        est = c.get("main_thread_us_per_request_estimate", {})
        lines += [
            "",
            f"Where Candela's CPU goes (py-spy at 16 connections, µs per request): "
            f"{c.get('cpu_us_per_request')} in all against bare mitmproxy's {m.get('cpu_us_per_request')}. "
            f"Event loop {th.get('MainThread')}: mitmproxy's proxy core {est.get('mitmproxy')}, "
            f"Candela's pipeline code {est.get('candela_pipeline')}, its state store (SQLite: 2 write "
            f"transactions, run on the event loop when the lock is free) {est.get('candela_state_store')}, "
            f"its audit entries' encoding {est.get('candela_audit')}, asyncio {est.get('asyncio_and_io')}; "
            f"state-store threads (only when the lock was taken) {th.get('candela-gov', 0)}; "
            f"audit writer thread (hash chain, insert, fsync) {th.get('candela-audit-writer')}; "
            f"WAL checkpoints {th.get('candela-state-checkpoint', 0)}. Profiles: `bench/results/profile-*`.",
        ]
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    if res.get("errors"):
        lines += ["", "Scenarios that failed to run:", ""] + [
            f"- {k}: {v}" for k, v in res["errors"].items()
        ]
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
