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

from candela_mitm.audit.query import query_entries
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
            # Until the writer thread finds the ledger failing (its next commit, within
            # batch_max_delay_ms), an answer may still complete: its entry was written to the
            # entry journal (a page it already had) and reaches the ledger once space is back.
            # The first refused may have been forwarded (its answer does not complete); from
            # then on nothing is forwarded at all.
            answered: list[str] = []
            deadline = time.monotonic() + 20
            while (r := chat(c)).status_code == 200:
                answered.append(r.headers["x-candela-span-id"])
                assert time.monotonic() < deadline, "the full disk was never noticed"
                time.sleep(0.02)
            statuses = [r] + [chat(c) for _ in range(3)]
            assert all(r.status_code == 503 for r in statuses), [r.text for r in statuses]
            assert {r.json()["error"] for r in statuses} == {"governance_unavailable"}
            assert len(upstream.requests) <= len(answered) + 1
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
        logged = {e["fields"].get("span_id") for e in query_entries(small_disk / "audit.db", limit=10_000)}
        assert set(answered) <= logged  # every answer that completed has its entry
        verify = subprocess.run(
            [str(Path(sys.executable).parent / "candela"), "audit", "verify",
             "--config", str(c.config_path)],
            capture_output=True, text=True, timeout=60,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
