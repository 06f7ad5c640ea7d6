"""Issue 16: the audit ledger's disk fills up (a small tmpfs): requests are refused 503 and
nothing is forwarded that could not be recorded; once space is freed, forwarding resumes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import ALICE_KEY, base_config, candela_env
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.upstream import FakeUpstream
from tests.required import require

pytestmark = pytest.mark.privileged
AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        require("root, to mount a small tmpfs for the audit ledger")
    mnt = tmp_path / "ledger"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write until the filesystem refuses (ENOSPC)."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def chat(c: CandelaProcess) -> requests.Response:
    return requests.post(
        c.url + "/proxy/openai/v1/chat/completions", json=BODY, headers=AUTH, timeout=30
    )


def test_a_full_ledger_disk_refuses_then_recovers(small_disk: Path, tmp_path: Path) -> None:
    with FakeTokenServer() as tokens, FakeUpstream(google_token_valid=tokens.is_valid) as upstream:
        cfg = base_config(upstream.url)
        cfg["audit"] = {"sqlite_path": str(small_disk / "audit.db")}
        with CandelaProcess(tmp_path, cfg, env=candela_env(tokens, tmp_path)) as c:
            assert chat(c).status_code == 200
            assert len(upstream.requests) == 1
            upstream.clear()

            filler = small_disk / "filler"
            fill(filler)
            statuses = [chat(c) for _ in range(4)]
            # the first may have been forwarded before the ledger failed: its answer does
            # not complete (503); after that nothing is forwarded at all
            assert all(r.status_code == 503 for r in statuses), [r.text for r in statuses]
            assert {r.json()["error"] for r in statuses} == {"governance_unavailable"}
            assert len(upstream.requests) <= 1
            upstream.clear()
            for _ in range(3):
                r = chat(c)
                assert r.status_code == 503
            assert upstream.requests == []

            filler.unlink()  # space is back: the writer's retry commits, forwarding resumes
            deadline = time.monotonic() + 20
            while True:
                r = chat(c)
                if r.status_code == 200:
                    break
                assert r.status_code == 503
                assert time.monotonic() < deadline, "no recovery after space was freed"
                time.sleep(0.5)
            assert upstream.requests
        verify = subprocess.run(
            [str(Path(sys.executable).parent / "candela"), "audit", "verify",
             "--config", str(c.config_path)],
            capture_output=True, text=True, timeout=60,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
