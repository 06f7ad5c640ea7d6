"""The one iptables runner: what it runs, where it finds the binaries, and what a failure raises."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from candela_mitm.enforcement import iptables
from candela_mitm.enforcement.iptables import Iptables


class Recorder:
    def __init__(self, code: int = 0, out: str = "") -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.code, self.out = code, out

    def __call__(self, argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), stdin))
        return subprocess.CompletedProcess(list(argv), self.code, self.out, "")


@pytest.mark.parametrize(
    "binary, call, argv, stdin",
    [
        ("iptables", lambda i: i.table("nat", "-S", "X"), ["iptables", "-w", "-t", "nat", "-S", "X"], None),
        ("ip6tables", lambda i: i.table("filter", "-D", "INPUT", "-j", "DROP"),
         ["ip6tables", "-w", "-t", "filter", "-D", "INPUT", "-j", "DROP"], None),
        ("iptables", lambda i: i.restore("*nat\nCOMMIT\n"), ["iptables-restore", "-w", "--noflush"], "*nat\nCOMMIT\n"),
        ("ip6tables", lambda i: i.save(), ["ip6tables-save"], None),
    ],
    ids=["table", "table-v6", "restore", "save"],
)  # fmt: skip
def test_commands(binary, call, argv, stdin):
    rec = Recorder()
    call(Iptables(binary, rec))
    assert rec.calls == [(argv, stdin)]


@pytest.mark.parametrize("code, ok", [(0, True), (1, False), (2, False)])
def test_ok_is_the_exit_status(code, ok):
    assert Iptables(runner=Recorder(code)).ok("nat", "-C", "OUTPUT", "-j", "X") is ok


def fake_binary(folder: Path, name: str, script: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


def test_run_finds_the_binary_and_passes_stdin(tmp_path: Path, monkeypatch):
    fake_binary(tmp_path, "iptables-restore", 'echo "args:$*"; cat\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    p = iptables.run(["iptables-restore", "-w", "--noflush"], "*nat\n")
    assert p.returncode == 0 and p.stdout == "args:-w --noflush\n*nat\n"


def test_run_looks_in_sbin_when_path_lacks_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(iptables, "SBIN", "/bin:/usr/bin")
    assert iptables.find("true") is not None
    assert iptables.run(["true"]).returncode == 0


def test_a_missing_binary_says_which_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(iptables, "SBIN", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="apt-get install iptables"):
        iptables.run(["iptables", "-w", "-t", "nat", "-S"])
    assert Iptables("iptables").save() is None  # nothing to save where there is no iptables


def test_a_hung_binary_is_an_oserror(tmp_path: Path, monkeypatch):
    fake_binary(tmp_path, "iptables", "sleep 5\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(iptables, "TIMEOUT_S", 0.2)
    with pytest.raises(OSError, match="did not finish"):
        iptables.run(["iptables", "-L"])


def test_the_callers_use_this_runner():
    """netns/firewall.py and the host chain run no subprocess of their own."""
    import inspect

    from candela_mitm.enforcement import host, host_chain
    from candela_mitm.netns import firewall

    for module in (firewall, host, host_chain):
        assert "subprocess.run" not in inspect.getsource(module)
    assert host_chain.HostChain().ipt.runner is iptables.run
