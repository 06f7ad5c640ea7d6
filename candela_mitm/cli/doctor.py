"""`candela doctor`: what this host supports for enforcement, and the fix for each missing piece."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from candela_mitm.certs.authority import CERT
from candela_mitm.config import load_config
from candela_mitm.enforcement import cgroups
from candela_mitm.errors import ConfigError

VENV_BCC_FIX = (
    "apt-get install -y python3-bpfcc, then link it into the venv: `make system` "
    "(ln -sfn /usr/lib/python3/dist-packages/bcc <venv site-packages>/bcc)"
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _import_bcc() -> str:
    import bcc

    return str(getattr(bcc, "__file__", "bcc"))


def _load_guard() -> str:
    # Compile and load (not attach) the real programs: the only proof that bcc, the headers and
    # the kernel's cgroup sock_addr hooks and ring buffers work together.
    from candela_mitm.ebpf.guard import compile_guard

    b, fns = compile_guard(host=False)
    try:
        return f"{len(fns)} cgroup sock_addr programs loaded"
    finally:
        b.cleanup()


@dataclass
class Probes:
    """How the checks look at the host; tests replace them."""

    euid: Callable[[], int] = os.geteuid
    mounts: Callable[[], str] = lambda: Path(cgroups.PROC_MOUNTS).read_text()
    import_bcc: Callable[[], str] = _import_bcc
    load_guard: Callable[[], str] = _load_guard
    kernel_release: Callable[[], str] = lambda: os.uname().release
    exists: Callable[[str], bool] = os.path.exists
    which: Callable[[str], str | None] = shutil.which
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def _mounted(mounts: str, fstype: str) -> list[str]:
    return [m.target for m in cgroups.parse_mounts(mounts) if m.fstype == fstype]


def _binary(p: Probes, name: str, package: str, why: str, required: bool = True) -> Check:
    path = p.which(name)
    return Check(
        name,
        path is not None,
        path or f"{name} not on PATH ({why})",
        f"apt-get install -y {package}",
        required,
    )


def run_checks(p: Probes, certs_dir: str, *, load: bool = True) -> list[Check]:
    checks: list[Check] = []
    root = p.euid() == 0
    checks.append(
        Check(
            "root",
            root,
            f"euid {p.euid()}",
            "run as root (sudo candela ...): eBPF, cgroups and iptables need it",
        )
    )

    try:
        mounts = p.mounts()
    except OSError as e:
        mounts = ""
        checks.append(Check("/proc/mounts", False, str(e), "mount -t proc proc /proc"))
    v2 = cgroups.find_cgroup2_mount(mounts)
    checks.append(
        Check(
            "cgroup v2",
            v2 is not None,
            f"mounted at {v2}" if v2 else "no cgroup2 mount in /proc/mounts",
            "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified",
        )
    )
    bpffs = _mounted(mounts, "bpf")
    checks.append(
        Check(
            "bpffs",
            bool(bpffs),
            f"mounted at {', '.join(bpffs)}" if bpffs else "not mounted (pins need it)",
            "mount -t bpf bpf /sys/fs/bpf (candela enforce host mounts it itself)",
            required=False,
        )
    )

    bcc_ok = True
    try:
        where = p.import_bcc()
    except Exception as e:  # ImportError, or OSError when libbcc.so is missing
        bcc_ok, where = False, f"not importable: {e}"
    checks.append(Check("bcc", bcc_ok, where, VENV_BCC_FIX))

    release = p.kernel_release()
    build = f"/lib/modules/{release}/build"
    headers = p.exists(f"{build}/include") or p.exists(f"{build}/Makefile")
    checks.append(
        Check(
            "kernel headers",
            headers,
            f"{build}" if headers else f"{build} is missing (bcc compiles against it)",
            "apt-get install -y linux-headers-$(uname -r) || { apt-get install -y "
            "linux-headers-amd64 && K=$(uname -r) && mkdir -p /lib/modules/$K && "
            "ln -sfn /usr/src/linux-headers-*-amd64 /lib/modules/$K/build && "
            "ln -sfn /usr/src/linux-headers-*-common /lib/modules/$K/source; } "
            "(generic headers serve: the programs read UAPI types only)",
        )
    )

    if load:
        if root and bcc_ok and headers:
            try:
                detail, ok = p.load_guard(), True
            except Exception as e:  # bcc reports compile/verifier failures as bare Exception
                first = str(e).splitlines()[0] if str(e) else repr(e)
                detail, ok = f"load failed: {first}", False
            checks.append(
                Check(
                    "ebpf load",
                    ok,
                    detail,
                    "needs a kernel with cgroup sock_addr hooks and BPF ring buffers (5.8+), "
                    "CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF",
                )
            )
        else:
            checks.append(
                Check(
                    "ebpf load", False, "not tried (needs root, bcc and headers)", "fix the above"
                )
            )

    checks.append(_binary(p, "iptables", "iptables", "host redirection: nat REDIRECT, -m cgroup"))
    checks.append(
        _binary(p, "iptables-restore", "iptables", "atomic replacement of Candela's chain")
    )
    checks.append(
        _binary(p, "nft", "nftables", "Debian's iptables is the nftables backend", required=False)
    )
    checks.append(_binary(p, "ip", "iproute2", "sandbox network namespaces"))

    ca = Path(certs_dir).expanduser() / CERT
    has_ca = p.exists(str(ca))
    checks.append(
        Check(
            "candela CA",
            has_ca,
            str(ca) if has_ca else f"{ca} is missing (clients must trust it in transparent mode)",
            "candela ca export > candela-ca.pem (creates the CA in interception.certs_dir)",
        )
    )
    checks.append(
        _binary(p, "redis-server", "redis-server", "only for state.backend: redis", required=False)
    )
    return checks


def report(checks: Sequence[Check], out: Any) -> int:
    width = max(len(c.name) for c in checks)
    for c in checks:
        word = "OK" if c.ok else "MISSING" if c.required else "optional"
        print(f"  {word:<8} {c.name:<{width}}  {c.detail}", file=out)
        if not c.ok:
            print(f"  {'':<8} {'':<{width}}  fix: {c.fix}", file=out)
    missing = [c.name for c in checks if c.required and not c.ok]
    if missing:
        print(f"candela doctor: missing {', '.join(missing)}", file=out)
        return 1
    print("candela doctor: everything enforcement needs is present", file=out)
    return 0


def main(
    argv: Sequence[str] | None = None, *, probes: Probes | None = None, out: Any = None
) -> int:
    p = argparse.ArgumentParser(prog="candela doctor", description=__doc__)
    p.add_argument("--config", metavar="PATH", help="YAML config (interception.certs_dir)")
    p.add_argument("--no-load", action="store_true", help="do not compile and load the programs")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = out or sys.stdout
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"candela doctor: config error:\n{e}", file=sys.stderr)
        return 2
    checks = run_checks(probes or Probes(), config.interception.certs_dir, load=not args.no_load)
    return report(checks, out)
