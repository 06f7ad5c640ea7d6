"""Progress on a terminal, silence when piped: `candela audit verify` and `export` in a pty and a pipe."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from candela_mitm.audit.chain import PROGRESS_EVERY, fields_json
from candela_mitm.audit.sqlite_sink import append_batch, connect_writer
from candela_mitm.cli.progress import ERASE, Progress

CANDELA = str(Path(sys.executable).parent / "candela")
N = PROGRESS_EVERY * 2 + 123  # more than one report


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_line_redrawn_in_place_then_erased(monkeypatch):
    monkeypatch.delenv("CANDELA_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    now = [0.0]
    out = Tty()
    with Progress("verify", "entries", stream=out, interval_s=1.0, clock=lambda: now[0]) as p:
        p.update(0, 2000)
        p.update(500, 2000)  # within the interval: not drawn
        now[0] = 1.5
        p.update(1000, 2000)
        p.update(2000, 2000)  # the end is always drawn
    assert out.getvalue() == (
        ERASE
        + "verify: 0 of 2,000 entries (0%)"
        + ERASE
        + "verify: 1,000 of 2,000 entries (50%)"
        + ERASE
        + "verify: 2,000 of 2,000 entries (100%)"
        + ERASE
    )


@pytest.mark.parametrize("env", [{}, {"CANDELA_PROGRESS": "0"}, {"TERM": "dumb"}])
def test_nothing_is_written_when_not_wanted(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = Tty() if env else io.StringIO()  # a pipe, or a terminal that said no
    with Progress("export", "entries written", stream=out) as p:
        p.update(0)
        p.update(10)
    assert out.getvalue() == ""


def test_without_a_total_it_counts():
    assert Progress("export", "entries written", stream=Tty()).line(12345, None) == (
        "export: 12,345 entries written"
    )


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("progress") / "audit.db"
    conn, _ = connect_writer(db)
    try:
        for b in range(0, N, 1000):
            rows = [
                ("request", "alice", None, fields_json({"i": i}))
                for i in range(b, min(N, b + 1000))
            ]
            append_batch(conn, rows)
    finally:
        conn.close()
    return db


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CANDELA_PROGRESS"}
    env["TERM"] = "xterm"
    return env


def run_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, what the terminal showed on stderr): stderr is a pty, stdout a pipe."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [CANDELA, *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=_env()
    )
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for 60 s; so far {shown!r}")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(master)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(60), stdout, shown.decode()


@pytest.mark.parametrize(
    "command, final",
    [
        (["verify"], f"ok: {N} entries verified"),
        (["export", "--format", "jsonl", "--out", "{tmp}/out.jsonl"], f"exported {N} entries"),
        (["export", "--format", "parquet", "--out", "{tmp}/out.parquet"], f"exported {N} entries"),
    ],
)
def test_on_a_terminal_progress_shows_and_is_erased(audit_db, tmp_path, command, final):
    args = ["audit", "--db", str(audit_db), *(a.format(tmp=tmp_path) for a in command)]
    code, stdout, shown = run_on_a_terminal(args)
    assert code == 0, (stdout, shown)
    label = command[0]
    assert f"{label}: 0" in shown
    # redrawn at most every 0.1 s: the first and (with a total) the last line always show
    if label == "verify":
        assert f"verify: 0 of {N:,} entries (0%)" in shown
        assert f"verify: {N:,} of {N:,} entries (100%)" in shown
        assert final in stdout
    else:
        assert "export: 0 entries written" in shown
        assert final in shown  # export reports on stderr
    # erased before the final line, so the terminal is left with the result alone
    assert shown.count("\r\x1b[K") >= 2
    last_erase = shown.rindex("\r\x1b[K")
    assert f"{label}: " not in shown[last_erase:]


@pytest.mark.parametrize(
    "command",
    [["verify"], ["export", "--format", "csv", "--out", "{tmp}/out.csv"]],
)
def test_piped_there_is_no_progress(audit_db, tmp_path, command):
    args = ["audit", "--db", str(audit_db), *(a.format(tmp=tmp_path) for a in command)]
    proc = subprocess.run([CANDELA, *args], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr + proc.stdout and "\x1b" not in proc.stderr + proc.stdout
    if command[0] == "verify":
        assert proc.stdout.startswith(f"ok: {N} entries verified") and proc.stderr == ""
    else:
        assert proc.stderr == f"exported {N} entries to {tmp_path}/out.csv\n"
