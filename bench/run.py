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
import json
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import (
    RESULTS,
    Bench,
    log,
)
from report import (
    machine,
    markdown,
    update_readme,
    verdicts,
)
from scenarios import (
    SCENARIOS,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--only", help="comma-separated scenarios (s1..s7, s9, otlp, profile); default all"
    )
    p.add_argument("--quick", action="store_true", help="half durations (a smoke run)")
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, databases)")
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--render", metavar="JSON", help="only rewrite the tables (and README) from a results file"
    )
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
