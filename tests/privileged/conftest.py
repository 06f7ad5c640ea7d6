"""Privileged tests (real kernel: eBPF, cgroups, iptables): skipped without root or bcc, except
under CANDELA_REQUIRE_PRIVILEGED=1 (CI, `make test`), where every skip is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.required import REQUIRE, require


def missing_requirements() -> list[str]:
    """What this host lacks for the eBPF tests, with the fix."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (run the privileged tests as root)")
    try:
        from candela_mitm.enforcement import cgroups

        cgroups.cgroup2_root()
    except (OSError, FileNotFoundError) as e:
        missing.append(f"cgroup v2 ({e})")
    try:
        import bcc  # noqa: F401
    except Exception as e:
        missing.append(f"bcc ({e}; `make system`)")
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
        missing.append("kernel headers (`make system`)")
    return missing


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is None:
        return
    missing = missing_requirements()
    if missing:
        require("needs " + ", ".join(missing))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # A skip raised anywhere else (a fixture, the test body) must fail CI as well.
    report = yield
    if REQUIRE and report.skipped and item.get_closest_marker("privileged") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CANDELA_REQUIRE_PRIVILEGED=1: {reason}"
    return report


@pytest.fixture
def iptables() -> str:
    path = shutil.which("iptables")
    if path is None or shutil.which("iptables-restore") is None:
        require("iptables is not installed (apt-get install -y iptables)")
    assert path is not None
    return path


@pytest.fixture
def test_cgroup(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh cgroup under the v2 root, removed (processes moved out) afterwards."""
    from candela_mitm.enforcement import cgroups

    name = f"candela-test-{os.getpid()}-{request.node.name[:40]}"
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    path = cgroups.create(name)
    try:
        yield path
    finally:
        cgroups.remove(path)


PROBE = Path(__file__).with_name("probe.py")


@dataclass(frozen=True)
class ProbeResult:
    errno: int  # 0: the call succeeded
    tgid: int  # the process that made the call
    tid: int  # the thread that made the call
    launcher: int  # the pid we spawned (differs from tgid with --fork)


Probe = Callable[..., ProbeResult]


@pytest.fixture
def probe() -> Probe:
    """Run probe.py (one connect or sendto) in a cgroup, a new netns, or as is."""

    def run(
        action: str,
        ip: str,
        port: int,
        *flags: str,
        cgroup: Path | None = None,
        new_netns: bool = False,
        argv0: Sequence[str] = (),
    ) -> ProbeResult:
        cmd = [*argv0, sys.executable, str(PROBE), action, ip, str(port), *flags]
        if new_netns:
            cmd = ["unshare", "--net", *cmd]
        preexec = None
        if cgroup is not None:
            from candela_mitm.enforcement import cgroups

            preexec = cgroups.enter(cgroup)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, preexec_fn=preexec)
        out, _ = p.communicate(timeout=20)
        assert p.returncode == 0, f"probe failed: {cmd}"
        data = json.loads(out)
        return ProbeResult(data["errno"], data["tgid"], data["tid"], p.pid)

    return run
