"""`candela service install`: units that systemd-analyze accepts, ordered before network-online."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from candela_mitm.cli import service
from tests.required import require


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        require("systemd-analyze (Debian package systemd; scripts/install-system.sh)")
    return subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=120)


def install(tmp_path: Path, config: str, *extra: str) -> tuple[int, Path, str]:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config)
    out = io.StringIO()
    units = tmp_path / "units"
    code = service.main(["install", "--config", str(cfg), "--dir", str(units), *extra], out)
    return code, units / service.UNIT, out.getvalue()


def directives(text: str) -> list[tuple[str, str]]:
    return [
        tuple(line.split("=", 1))  # type: ignore[misc]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    ]


@pytest.mark.parametrize(
    ("config", "extra", "enforce", "user"),
    [
        ("listen:\n  port: 9100\n", ("--user", "candela"), False, "candela"),
        ("mode: transparent\ninterception:\n  enforce: host\n", (), True, None),
        ("mode: transparent\n", ("--enforce", "host"), True, None),
    ],
)
def test_units_pass_systemd_analyze_verify(tmp_path, config, extra, enforce, user):
    code, unit, _ = install(tmp_path, config, *extra)
    assert code == 0
    d = directives(unit.read_text())
    assert ("Before", "network-online.target") in d and ("After", "network.target") in d
    assert ("WantedBy", "network-online.target") in d
    start = dict(d)["ExecStart"]
    assert start.endswith("--enforce host") is enforce
    assert (dict(d).get("User")) == user
    ready = dict(d)["ExecStartPost"]
    assert "service wait-ready --url http://127.0.0.1:" in ready
    assert ("9100/healthz" in ready) is ("9100" in config)
    result = verify(unit)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_verify_would_catch_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt key or a missing program is reported."""
    code, unit, _ = install(tmp_path, "{}\n")
    assert code == 0
    bad = tmp_path / "bad.service"
    bad.write_text(
        unit.read_text().replace("Restart=", "Restrt=").replace("ExecStart=/", "ExecStart=/nope/")
    )
    result = verify(bad)
    assert result.returncode != 0 and "Restrt" in result.stderr


@pytest.mark.parametrize(
    ("config", "extra", "error"),
    [
        ("interception:\n  enforce: host\n", (), "transparent"),
        ("mode: transparent\n", ("--enforce", "host", "--user", "x"), "root"),
        ("listen: 3\n", (), "config error"),
    ],
)
def test_refused(tmp_path, capsys, config, extra, error):
    code, unit, _ = install(tmp_path, config, *extra)
    assert code == 2 and not unit.exists()
    assert error in capsys.readouterr().err


def test_wait_ready_times_out_on_a_closed_port(capsys):
    from tests.fakes.candela import free_port

    out = io.StringIO()
    assert service.wait_ready(f"http://127.0.0.1:{free_port()}/healthz", 0.3, out) == 1
    assert "did not answer" in out.getvalue()
