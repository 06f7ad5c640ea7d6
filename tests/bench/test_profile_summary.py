"""bench/profile_summary.py: a profile's summary and the comparison of two profiles."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from profile_summary import diff, inclusive_us, load  # noqa: E402

BEFORE = """\
thread (1): MainThread;main (cli.py:3);charge (accounting.py:10);price (pricing.py:5) 30
thread (1): MainThread;main (cli.py:3);serve (server.py:7) 70
"""
AFTER = """\
thread (1): MainThread;main (cli/main.py:3);charge (governance/accounting.py:12) 10
thread (1): MainThread;main (cli/main.py:3);serve (server.py:7) 90
"""


def test_two_profiles_compare_by_function_even_across_moved_modules(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(BEFORE)
    (tmp_path / "b.txt").write_text(AFTER)
    before = inclusive_us(load(str(tmp_path / "a.txt")), 1000.0)
    after = inclusive_us(load(str(tmp_path / "b.txt")), 500.0)
    assert before == {"main": 1000.0, "charge": 300.0, "price": 300.0, "serve": 700.0}
    assert after == {"main": 500.0, "charge": 50.0, "serve": 450.0}  # charge moved, still matched
    out = diff(before, after, 2)
    grew, shrank = out.split("shrank most:")
    assert "-500.0  main" in shrank and "-300.0  price" in shrank  # the two that fell most
    assert "-250.0  serve" in grew and "-250.0  charge" in grew
