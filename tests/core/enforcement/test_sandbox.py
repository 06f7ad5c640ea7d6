"""enforcement/sandbox.py without a kernel: how the command is launched inside the sandbox and
what a setup that fails answers (the kernel side: tests/privileged/test_sandbox.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from candela_mitm.config import parse_config
from candela_mitm.enforcement import cgroups, sandbox
from candela_mitm.enforcement.registry import SandboxRecord, SandboxRegistry


def made(tmp_path: Path, cgroup: str | None) -> sandbox.Sandbox:
    box = sandbox.Sandbox(None, SandboxRegistry(tmp_path), "u@x", None, [], ["curl", "-s", "x"])
    box.record = SandboxRecord(3, "10.200.0.2", "u@x", None, 1, None, "candela-3", "cdl3h", cgroup)
    box.etc_dir = tmp_path / "etc" / "candela-3"
    return box


def test_the_launcher_enters_the_namespace_and_cgroup_then_runs_the_command_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "cgroup2_root", lambda: Path("/sys/fs/cgroup"))
    box = made(tmp_path, "candela/sandbox-3")
    assert box.launcher() == [
        sys.executable, "-m", "candela_mitm.netns.enter", "--netns", "candela-3",
        "--etc", str(tmp_path / "etc" / "candela-3"),
        "--cgroup", "candela/sandbox-3", "--readonly", "/sys/fs/cgroup",
        "--", "curl", "-s", "x",
    ]  # fmt: skip
    no_cgroup = made(tmp_path, None).launcher()
    assert "--cgroup" not in no_cgroup and no_cgroup[-4:] == ["--", "curl", "-s", "x"]


def test_the_command_trusts_the_sandbox_bundle(tmp_path: Path) -> None:
    box = made(tmp_path, None)
    box.bundle = tmp_path / "ca.pem"
    env = box.env()
    assert str(tmp_path / "ca.pem") in env.values()
    assert env["PATH"]  # the caller's environment is kept


def test_a_setup_that_fails_is_125_and_takes_down_what_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    torn: list[int] = []
    monkeypatch.setattr(sandbox, "cleanup_leftovers", lambda registry, audit: [])
    monkeypatch.setattr(sandbox, "teardown", lambda registry, index, **kw: torn.append(index))

    def broken(self: sandbox.Sandbox) -> None:
        self.record = SandboxRecord(0, "10.200.0.2", "u@x", None, 1, None, "candela-0", "cdl0h")
        raise OSError("no network namespaces here")

    monkeypatch.setattr(sandbox.Sandbox, "_setup", broken)
    config = parse_config({"audit": {"sqlite_path": str(tmp_path / "audit.db")}})
    code = sandbox.run(config, ["true"], user="u@x", registry=SandboxRegistry(tmp_path))
    assert code == 125
    assert "cannot set up the sandbox: no network namespaces here" in capsys.readouterr().err
    assert torn == [0]
