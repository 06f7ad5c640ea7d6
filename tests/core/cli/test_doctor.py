from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.cli.doctor import Probes, main, report, run_checks

MOUNTS = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n"
CERTS = "/home/u/.candela/certs"
RELEASE = "6.18.0-test"


def healthy(**overrides: Any) -> Probes:
    files = {
        f"/lib/modules/{RELEASE}/build/include",
        f"{CERTS}/mitmproxy-ca-cert.pem",
    }
    binaries = {"iptables", "iptables-restore", "nft", "ip", "redis-server"}
    base: dict[str, Any] = {
        "euid": lambda: 0,
        "mounts": lambda: MOUNTS,
        "import_bcc": lambda: "/usr/lib/python3/dist-packages/bcc/__init__.py",
        "load_guard": lambda: "4 cgroup sock_addr programs loaded",
        "kernel_release": lambda: RELEASE,
        "exists": lambda p: p in files,
        "which": lambda n: f"/usr/sbin/{n}" if n in binaries else None,
    }
    base.update(overrides)
    return Probes(**base)


def _no_bcc() -> str:
    raise ImportError("No module named 'bcc'")


def _bad_load() -> str:
    raise Exception("Failed to load BPF program candela_conn4: Invalid argument\nverifier log")


def _which_without(*missing: str) -> Any:
    return lambda n: None if n in missing else f"/usr/bin/{n}"


CASES = [
    # (probe overrides, exit code, names reported MISSING, names reported optional)
    ({}, 0, [], []),
    ({"euid": lambda: 1000}, 1, ["root", "ebpf load"], []),
    ({"mounts": lambda: "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"}, 1, ["cgroup v2"],
     ["bpffs"]),
    ({"import_bcc": _no_bcc}, 1, ["bcc", "ebpf load"], []),
    ({"exists": lambda p: p == f"{CERTS}/mitmproxy-ca-cert.pem"}, 1,
     ["kernel headers", "ebpf load"], []),
    ({"load_guard": _bad_load}, 1, ["ebpf load"], []),
    ({"which": _which_without("iptables", "iptables-restore")}, 1,
     ["iptables", "iptables-restore"], []),
    ({"which": _which_without("ip")}, 1, ["ip"], []),
    ({"which": _which_without("nft", "redis-server")}, 0, [], ["nft", "redis-server"]),
    ({"exists": lambda p: p.startswith("/lib/modules")}, 1, ["candela CA"], []),
]  # fmt: skip


@pytest.mark.parametrize("overrides,code,missing,optional", CASES)
def test_checks(
    overrides: dict[str, Any], code: int, missing: list[str], optional: list[str]
) -> None:
    checks = run_checks(healthy(**overrides), CERTS)
    out = io.StringIO()
    assert report(checks, out) == code
    assert sorted(c.name for c in checks if not c.ok and c.required) == sorted(missing)
    assert sorted(c.name for c in checks if not c.ok and not c.required) == sorted(optional)
    text = out.getvalue()
    for name in missing:
        line = next(ln for ln in text.splitlines() if ln.split()[:1] == ["MISSING"] and name in ln)
        assert line
    assert text.count("fix:") == len(missing) + len(optional)


@pytest.mark.parametrize(
    "overrides,name,fix_part",
    [
        ({"import_bcc": _no_bcc}, "bcc", "make system"),
        ({"euid": lambda: 1000}, "root", "sudo"),
        ({"mounts": lambda: ""}, "cgroup v2", "mount -t cgroup2"),
        ({"exists": lambda p: False}, "kernel headers", "/lib/modules/$K/build"),
        ({"exists": lambda p: False}, "candela CA", "candela ca export"),
        ({"which": _which_without("iptables")}, "iptables", "apt-get install -y iptables"),
    ],
)
def test_each_missing_piece_comes_with_its_fix(
    overrides: dict[str, Any], name: str, fix_part: str
) -> None:
    [check] = [c for c in run_checks(healthy(**overrides), CERTS) if c.name == name]
    assert not check.ok and fix_part in check.fix


def test_load_failure_reports_the_first_line() -> None:
    [check] = [c for c in run_checks(healthy(load_guard=_bad_load), CERTS) if c.name == "ebpf load"]
    assert check.detail == "load failed: Failed to load BPF program candela_conn4: Invalid argument"


def test_no_load_skips_the_compile() -> None:
    def boom() -> str:
        raise AssertionError("must not load")

    names = [c.name for c in run_checks(healthy(load_guard=boom), CERTS, load=False)]
    assert "ebpf load" not in names


def test_main_uses_the_configured_certs_dir(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"interception:\n  certs_dir: {certs}\n")
    out = io.StringIO()
    probes = healthy(exists=lambda p: p.startswith("/lib/modules"))
    assert main(["--config", str(cfg)], probes=probes, out=out) == 1
    assert f"{certs}/mitmproxy-ca-cert.pem is missing" in out.getvalue()
    (certs).mkdir()
    probes = healthy(exists=lambda p: p.startswith("/lib/modules") or p.startswith(str(certs)))
    out = io.StringIO()
    assert main(["--config", str(cfg)], probes=probes, out=out) == 0
    assert "everything enforcement needs is present" in out.getvalue()
