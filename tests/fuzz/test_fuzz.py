"""The fuzz targets (tests/fuzz/targets.py): the kept corpus replays cleanly, and each target
runs under atheris for a bounded time (CANDELA_FUZZ_SECONDS, 15 by default) without a failure.
New inputs atheris finds go to a temporary folder; copy interesting ones into
tests/fuzz/corpus/<target>/ to keep them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).parent / "corpus"
SECONDS = int(os.environ.get("CANDELA_FUZZ_SECONDS", "15"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_kept_corpus_replays(name):
    seeds = sorted((CORPUS / name).iterdir())
    assert seeds, f"no corpus for {name}"
    for path in seeds:
        TARGETS[name](path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_for_a_bounded_time(name, tmp_path):
    found = tmp_path / "found"
    found.mkdir()
    proc = subprocess.run(
        [
            sys.executable, "-m", "tests.fuzz.targets", name, str(found), str(CORPUS / name),
            f"-max_total_time={SECONDS}", "-rss_limit_mb=1536", "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120,
    )
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    assert proc.returncode == 0 and not crashes, (crashes, proc.stderr[-4000:])
    assert "Done" in proc.stderr  # it ran: libFuzzer's closing line
