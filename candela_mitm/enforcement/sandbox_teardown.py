"""Taking sandboxes down: the one teardown path (a run that ends, a setup that fails half-way, a
leftover of a run that was killed) and the sweep for leftovers."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from candela_mitm.enforcement.registry import SandboxRegistry, pids_in_netns

log = logging.getLogger("candela.sandbox")

SANDBOX_ACTION_CLEANUP = "sandbox_cleanup"
CGROUP_PARENT = "candela"


def _unregister_netns(cookie: int) -> None:
    from candela_mitm.ebpf import host

    with contextlib.suppress(OSError):
        host.register_netns(cookie, redirected=False)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _kill_members(cgroup: Path | None, net: Any) -> None:
    """SIGKILL whatever is left in the sandbox: its cgroup and, if it left that, its namespace."""
    from candela_mitm.enforcement import cgroups
    from candela_mitm.netns import network

    if cgroup is not None and cgroup.is_dir():
        kill = cgroup / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        with contextlib.suppress(OSError):
            for pid in cgroups.pids(cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    inode = network.netns_inode(net)
    if inode is not None:
        for pid in pids_in_netns(inode):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        alive = (cgroup is not None and cgroup.is_dir() and bool(_safe_pids(cgroup))) or (
            inode is not None and bool(pids_in_netns(inode))
        )
        if not alive:
            return
        time.sleep(0.02)


def _safe_pids(cgroup: Path) -> list[int]:
    from candela_mitm.enforcement import cgroups

    try:
        return cgroups.pids(cgroup)
    except OSError:
        return []


def cgroup_name(index: int) -> str:
    """Sandbox `index`'s cgroup, relative to the cgroup v2 root."""
    return f"{CGROUP_PARENT}/sandbox-{index}"


def bundle_path(registry: SandboxRegistry, net: Any) -> Path:
    """The CA bundle a sandbox's programs trust (Candela's CA with the system's)."""
    return registry.root / "etc" / f"{net.netns}-ca.pem"


def teardown(
    registry: SandboxRegistry,
    index: int,
    *,
    stop_guard: Callable[[], None] | None = None,
    netns_cookie: int | None = None,
) -> None:
    """Take down whatever exists of sandbox `index`, in reverse order of creation, each piece
    attempted even when another fails (and logged): the one cleanup path, for a run that ends,
    a setup that fails half-way, and a leftover of a run that was killed.

    The processes go first (nothing may outlive the sandbox in it); `stop_guard` (the run's own
    eBPF guard: its last refusals are audited, then it detaches) and `netns_cookie` (the
    namespace registered with the host guard) are what only a live run holds. The record goes
    last: until then no other run can claim the index.
    """
    from candela_mitm.enforcement import cgroups
    from candela_mitm.netns import firewall, network

    net = network.SandboxNet(index)
    try:
        cgroup: Path | None = cgroups.resolve(cgroup_name(index))
    except (FileNotFoundError, ValueError):  # no cgroup v2 here: none was made
        cgroup = None
    steps: list[tuple[str, Callable[[], object] | None]] = [
        ("processes", lambda: _kill_members(cgroup, net)),
        ("guard", stop_guard),
        ("firewall", lambda: firewall.delete_tagged({index})),
        ("host guard", None if netns_cookie is None else lambda: _unregister_netns(netns_cookie)),
        ("network", lambda: network.remove(net)),
        ("cgroup", None if cgroup is None else lambda: cgroups.remove(cgroup)),
        ("files", lambda: shutil.rmtree(registry.root / "etc" / net.netns, ignore_errors=True)),
        ("bundle", lambda: _unlink(bundle_path(registry, net))),
        ("record", lambda: registry.release(index)),
    ]
    for what, step in steps:
        if step is None:
            continue
        try:
            step()
        except Exception as e:  # one stuck piece must not keep the others
            log.warning("cleaning sandbox %d (%s): %s", index, what, e)


def cleanup_leftovers(registry: SandboxRegistry, audit: Any = None) -> list[int]:
    """Remove what killed runs left behind: their namespaces, veths, rules, cgroups and records.

    A sandbox is left over when its record's owner is dead, or when its namespace, veth or rules
    exist with no record at all. Live sandboxes are never touched. Returns the indexes cleaned.
    """
    from candela_mitm.enforcement import cgroups
    from candela_mitm.netns import firewall, network

    with registry.locked():
        present = network.sandbox_indexes_present()
        tagged = {i for i, _ in firewall.tagged_rules("iptables")} | {
            i for i, _ in firewall.tagged_rules("ip6tables")
        }
        try:
            groups = {
                int(p.name.split("-", 1)[1])
                for p in (cgroups.cgroup2_root() / CGROUP_PARENT).glob("sandbox-*")
                if p.name.split("-", 1)[1].isdigit()
            }
        except (FileNotFoundError, OSError):
            groups = set()
        records = registry.records()
        live = {r.index for r in records if r.owner_alive()}
        stale_records = {r.index: r for r in records if r.index not in live}
        indexes = (set(stale_records) | present | tagged | groups) - live
        for index in sorted(indexes):
            teardown(registry, index)
            if audit is not None:
                rec = stale_records.get(index)
                audit.record(
                    SANDBOX_ACTION_CLEANUP,
                    sandbox=network.SandboxNet(index).netns,
                    user_id=rec.user if rec else None,
                    tenant_id=rec.tenant if rec else None,
                    owner_pid=rec.pid if rec else None,
                )
    return sorted(indexes)
