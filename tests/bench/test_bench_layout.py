"""bench/ split into harness, scenarios and report with run.py as the entry: they import, every
scenario is registered, and the report renders a stored run (no benchmark is run here)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = ("harness", "scenarios", "report", "run")


@pytest.fixture
def bench(monkeypatch) -> Iterator[dict[str, ModuleType]]:
    """The bench modules, imported as run.py imports them (bench/ first on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    mods = {name: importlib.import_module(name) for name in MODULES}
    yield mods
    for name in MODULES:
        sys.modules.pop(name, None)


def test_the_modules_are_the_bench_folders(bench):
    for name, mod in bench.items():
        assert Path(mod.__file__).resolve() == BENCH / f"{name}.py"


def test_every_scenario_is_registered_once(bench):
    scenarios = bench["scenarios"]
    registered = scenarios.SCENARIOS
    assert list(registered) == [
        "s1", "s1d", "s2", "s2p", "s3", "s4", "s5", "s6", "s7", "otlp", "s9", "profile", "profile1"
    ]
    defined = {
        f for name, f in inspect.getmembers(scenarios, inspect.isfunction)
        if name.startswith("s_") and f.__module__ == "scenarios"
    }  # fmt: skip
    assert set(registered.values()) == defined
    for key, fn in registered.items():  # "1. Added latency ...": the docstring names its number
        number = key[1:] if key.startswith("s") else None
        assert fn.__doc__ and (number is None or fn.__doc__.startswith(f"{number}. "))


def test_each_part_keeps_to_its_job(bench):
    """The harness knows no scenario and no report; scenarios know no report; run.py only wires."""

    def imports(name: str) -> set[str | None]:
        tree = ast.parse((BENCH / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert not {"scenarios", "report", "run"} & imports("harness")
    assert not {"report", "run"} & imports("scenarios")
    assert "run" not in imports("report")
    assert not [n for n, _ in inspect.getmembers(bench["run"], inspect.isfunction)
                if _.__module__ == "run" and n != "main"]  # fmt: skip


def test_the_report_renders_a_stored_run(bench):
    # the newest full run (a one-scenario run such as s9-<time>.json carries no verdicts)
    results = sorted((BENCH / "results").glob("2*.json"))
    if not results:
        pytest.skip("no stored bench results in bench/results")
    res = json.loads(results[-1].read_text())
    verdicts = bench["report"].verdicts(res)
    assert verdicts and all({"target", "measured", "holds"} <= set(v) for v in verdicts)
    md = bench["report"].markdown({**res, "verdicts": verdicts})
    assert "| Target (issue 7) | Measured | Holds |" in md
    assert all(v["target"] in md for v in verdicts)


def test_run_help_works_with_the_projects_python():
    r = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "--only" in r.stdout and "--render" in r.stdout


def test_issue_21s_targets_are_judged_for_sqlite_and_redis_beside_bare_mitmproxy(bench):
    rounds = {"rounds_added_p50_ms": [1.0, 1.0, 1.0]}
    res = {
        "s1_latency": {
            "mitmproxy": rounds,
            "candela": {"rounds_added_p50_ms": [1.2, 1.3, 1.2]},  # 1.2x: holds (1.25x)
            "candela redis": {"rounds_added_p50_ms": [1.4, 1.3, 1.4]},  # 1.4x: does not
            "back_to_back": {
                "mitmproxy": rounds,
                "candela": {"rounds_added_p50_ms": [1.4, 1.6, 1.5]},  # 1.5x: holds (1.5x)
            },
        },
        "s2_points": {
            "connections": [1, 4],
            "candela sqlite, one user": {"c1": {"vs_mitmproxy": 0.95}, "c4": {"vs_mitmproxy": 0.91}},
            "candela redis, one user": {"c1": {"vs_mitmproxy": 0.95}, "c4": {"vs_mitmproxy": 0.7}},
        },
        "s3_streaming": {
            "ttft": {
                16: {
                    "mitmproxy": {"added_ttft_p50_ms": 3.0},
                    "candela": {"added_ttft_p50_ms": 3.4},
                    "candela redis": {"added_ttft_p50_ms": 4.0},
                }
            },
            "ttft_over_bare_rounds": {"candela": {16: [0.3, 0.5, 0.4]}},
        },
    }
    got = {
        v["target"]: v["holds"] for v in bench["report"].verdicts(res) if "(issue 21)" in v["target"]
    }
    assert got == {
        "(issue 21) candela: added p50 at concurrency 1, open 50/s, <= 1.25x bare mitmproxy's": True,
        "(issue 21) candela: added p50 at concurrency 1, back to back, <= 1.5x bare mitmproxy's": True,
        "(issue 21) candela redis: added p50 at concurrency 1, open 50/s, <= 1.25x bare mitmproxy's": False,
        "(issue 21) candela sqlite, one user: throughput at 1-16 keep-alive connections >= 0.9x bare mitmproxy's": True,
        "(issue 21) candela redis, one user: throughput at 1-16 keep-alive connections >= 0.9x bare mitmproxy's": False,
        "(issue 21) candela: added time to first token <= bare mitmproxy's + 0.5 ms": True,
        "(issue 21) candela redis: added time to first token <= bare mitmproxy's + 0.5 ms": False,
    }
    measured = {v["target"]: v["measured"] for v in bench["report"].verdicts(res)}
    ttft = "(issue 21) {}: added time to first token <= bare mitmproxy's + 0.5 ms"
    # each round's difference is shown beside the verdict (the spread it carries)
    assert measured[ttft.format("candela")].endswith(
        "; each round's p50 over bare's: {16: [0.3, 0.5, 0.4]} ms")
    assert "each round" not in measured[ttft.format("candela redis")]


def test_the_ttft_verdict_takes_the_median_of_the_rounds_differences(bench):
    """Each round measures bare mitmproxy and Candela seconds apart: issue 21's time-to-first-
    token line is the median of the rounds' differences, not the difference of two medians."""
    row = {"mitmproxy": {"added_ttft_p50_ms": 5.0}, "candela": {"added_ttft_p50_ms": 5.2}}
    res = {"s3_streaming": {"ttft": {512: row},
                            "ttft_over_bare_rounds": {"candela": {512: [0.9, -0.4, 0.6, 0.7, 0.1]}}}}
    (v,) = [v for v in bench["report"].verdicts(res) if "candela: added time to first" in v["target"]]
    assert v["holds"] is False and v["measured"].startswith("over bare mitmproxy's by length: {512: 0.6} ms")
    assert "median of the rounds' differences" in v["how"]
    res["s3_streaming"]["ttft_over_bare_rounds"]["candela"][512] = [0.9, -0.4, 0.5, 0.7, 0.1]
    (v,) = [v for v in bench["report"].verdicts(res) if "candela: added time to first" in v["target"]]
    assert v["holds"] is True
