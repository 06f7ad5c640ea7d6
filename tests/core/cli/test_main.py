"""cli: the serving commands re-run themselves under `python -O`, once, with the same command line."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from candela_mitm.cli import main as cli


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(cli.os, "execv", lambda path, args: calls.append((path, list(args))))
    monkeypatch.setattr(sys, "flags", SimpleNamespace(optimize=0))
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "-u", "/venv/bin/candela-server", "--port", "1"])
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    return calls


def test_reruns_the_same_command_line_with_dash_o(execs: list[tuple[str, list[str]]]) -> None:
    cli.rerun_optimized()
    assert execs == [
        (sys.executable, [sys.executable, "-O", "-u", "/venv/bin/candela-server", "--port", "1"])
    ]


def test_not_again_when_optimized(execs: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "flags", SimpleNamespace(optimize=1))
    cli.rerun_optimized()
    assert execs == []


def test_debug_checks_kept_on_request(execs: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    cli.rerun_optimized()
    assert execs == []


def test_a_failed_rerun_serves_as_is(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(path: str, args: list[str]) -> None:
        raise PermissionError("no exec here")

    monkeypatch.setattr(cli.os, "execv", refuse)
    monkeypatch.setattr(sys, "flags", SimpleNamespace(optimize=0))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    cli.rerun_optimized()  # returns: the caller goes on serving
    assert "without -O" in capsys.readouterr().err


def test_called_with_arguments_it_never_reruns(execs: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """server_main(argv) from another program (tests, embedding) must not replace that program."""
    monkeypatch.setattr(cli, "_serve", lambda argv, command, prog: 0)
    assert cli.server_main(["--port", "1"]) == 0
    assert cli.local_main(["--port", "1"]) == 0
    assert execs == []
    monkeypatch.setattr(sys, "argv", ["candela-server", "--port", "1"])
    assert cli.server_main() == 0
    assert len(execs) == 1


def test_importing_the_cli_does_not_import_the_proxy() -> None:
    """The re-run happens before the serving modules (pydantic, mitmproxy, SQLite stores) load."""
    import subprocess

    code = "import sys, candela_mitm.cli.main; print(sorted(m for m in ('candela_mitm.runtime', 'mitmproxy', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
