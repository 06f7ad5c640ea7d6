"""CgroupGuard on the real kernel: what a governed cgroup can and cannot reach, and the events."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from candela_mitm.ebpf.guard import CgroupGuard
from candela_mitm.enforcement import cgroups
from candela_mitm.enforcement.bypass import BypassEvent

from .conftest import Probe

EPERM = errno.EPERM
ALLOWED_DNS = "127.53.0.1"
OTHER_DNS = "127.53.0.2"


def _listener(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(64)
    return s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ports:
    """Listeners: `allowed` (127.0.0.1, in allow_v4), `open` (0.0.0.0, in allow_tcp_ports_v4),
    `v6` (::1), and `other`, a port nothing listens on and no rule allows."""

    def __init__(self) -> None:
        self._socks = [
            _listener(socket.AF_INET, "127.0.0.1"),
            _listener(socket.AF_INET, "0.0.0.0"),
            _listener(socket.AF_INET6, "::1"),
        ]
        self.allowed, self.open, self.v6 = (int(s.getsockname()[1]) for s in self._socks)
        self.other = _free_port()

    def port(self, name: str | int) -> int:
        return name if isinstance(name, int) else int(getattr(self, name))

    def close(self) -> None:
        for s in self._socks:
            s.close()


@pytest.fixture(scope="module")
def ports() -> Iterator[Ports]:
    p = Ports()
    yield p
    p.close()


@pytest.fixture(scope="module")
def governed(ports: Ports) -> Iterator[tuple[CgroupGuard, Path]]:
    """One guard on one cgroup for the policy table (compiling costs ~0.5 s per guard)."""
    from .conftest import missing_requirements, require

    missing = missing_requirements()
    if missing:
        require("needs " + ", ".join(missing))
    path = cgroups.create(f"candela-test-guard-{os.getpid()}")
    guard = CgroupGuard(
        allow_v4=[("127.0.0.1", ports.allowed)],
        allow_tcp_ports_v4=(ports.open,),
        allow_dns_to=[ALLOWED_DNS],
    )
    try:
        guard.attach(str(path))
        yield guard, path
    finally:
        guard.detach()
        cgroups.remove(path)


def events_of(guard: CgroupGuard, tgid: int) -> list[BypassEvent]:
    return [e for e in guard.poll(200) if e.tgid == tgid]


POLICY = [
    # (action, destination, port, errno, reason, hook)
    ("tcp", "127.0.0.1", "allowed", 0, None, None),
    ("tcp", "127.0.0.1", "other", EPERM, "not_allowed", "connect4"),
    ("tcp", "127.0.0.2", "open", 0, None, None),
    ("tcp", "::1", "v6", EPERM, "ipv6", "connect6"),
    ("tcp", "::ffff:127.0.0.1", "allowed", 0, None, None),
    ("tcp", "::ffff:127.0.0.1", "other", EPERM, "not_allowed", "connect6"),
    ("udp", "127.0.0.1", 443, EPERM, "udp_port", "sendmsg4"),
    ("udp", "127.0.0.1", 853, EPERM, "udp_port", "sendmsg4"),
    ("udpconnect", "127.0.0.1", 443, EPERM, "udp_port", "connect4"),
    ("udp", "::1", 443, EPERM, "udp_port", "sendmsg6"),
    ("udp", ALLOWED_DNS, 53, 0, None, None),
    ("udp", OTHER_DNS, 53, EPERM, "dns", "sendmsg4"),
    ("udp", "127.0.0.1", 9999, 0, None, None),
]


@pytest.mark.privileged
@pytest.mark.parametrize(
    "action,ip,port_name,expect,reason,hook",
    POLICY,
    ids=[f"{a}-{ip}-{p}" for a, ip, p, *_ in POLICY],
)
def test_policy_inside_the_cgroup(
    governed: tuple[CgroupGuard, Path],
    ports: Ports,
    probe: Probe,
    action: str,
    ip: str,
    port_name: str | int,
    expect: int,
    reason: str | None,
    hook: str | None,
) -> None:
    guard, path = governed
    guard.poll(0)
    port = ports.port(port_name)
    r = probe(action, ip, port, cgroup=path)
    assert r.errno == expect
    events = events_of(guard, r.tgid)
    if expect == 0:
        assert events == []
        return
    assert len(events) == 1
    ev = events[0]
    assert (ev.reason, ev.hook, ev.ip, ev.port) == (reason, hook, ip, port)
    assert ev.protocol == ("tcp" if action == "tcp" else "udp")
    assert ev.family == ("ipv6" if ":" in ip else "ipv4")
    assert (ev.pid, ev.comm, ev.uid) == (r.tid, "cdl-probe", os.geteuid())
    assert ev.cgroup_id == cgroups.cgroup_id(path)
    assert ev.verdict == "denied"


@pytest.mark.privileged
@pytest.mark.parametrize("flag", ["--thread", "--fork"])
def test_threads_and_children_are_governed(
    governed: tuple[CgroupGuard, Path], ports: Ports, probe: Probe, flag: str
) -> None:
    guard, path = governed
    guard.poll(0)
    r = probe("tcp", "127.0.0.1", ports.other, flag, cgroup=path)
    assert r.errno == EPERM
    if flag == "--thread":
        assert r.tid != r.tgid == r.launcher
    else:
        assert r.tgid != r.launcher
    [ev] = events_of(guard, r.tgid)
    assert (ev.pid, ev.tgid, ev.reason) == (r.tid, r.tgid, "not_allowed")


@pytest.mark.privileged
def test_processes_outside_the_cgroup_are_unaffected(
    governed: tuple[CgroupGuard, Path], ports: Ports, probe: Probe
) -> None:
    guard, _ = governed
    guard.poll(0)
    assert probe("tcp", "127.0.0.1", ports.other).errno == errno.ECONNREFUSED
    assert probe("tcp", "::1", ports.v6).errno == 0
    assert probe("udp", "127.0.0.1", 443).errno == 0
    assert probe("udp", OTHER_DNS, 53).errno == 0
    assert guard.poll(200) == []


@pytest.mark.privileged
def test_counts_follow_denials(governed: tuple[CgroupGuard, Path], probe: Probe) -> None:
    guard, path = governed
    before = guard.counts().get("udp_port", 0)
    assert probe("udp", "127.0.0.1", 853, cgroup=path).errno == EPERM
    assert guard.counts()["udp_port"] == before + 1


@pytest.mark.privileged
def test_detach_restores_connectivity(test_cgroup: Path, ports: Ports, probe: Probe) -> None:
    with CgroupGuard(allow_v4=[]) as guard:
        guard.attach(str(test_cgroup))
        assert guard.attached
        assert probe("tcp", "127.0.0.1", ports.allowed, cgroup=test_cgroup).errno == EPERM
        guard.detach()
        assert not guard.attached
        assert probe("tcp", "127.0.0.1", ports.allowed, cgroup=test_cgroup).errno == 0
        guard.detach()  # idempotent
    assert probe("udp", "127.0.0.1", 443, cgroup=test_cgroup).errno == 0


@pytest.mark.privileged
def test_context_exit_detaches(test_cgroup: Path, ports: Ports, probe: Probe) -> None:
    with CgroupGuard(allow_v4=[]) as guard:
        guard.attach(str(test_cgroup))
        assert probe("udp", "127.0.0.1", 443, cgroup=test_cgroup).errno == EPERM
    assert probe("udp", "127.0.0.1", 443, cgroup=test_cgroup).errno == 0


@pytest.mark.privileged
def test_permissive_options(test_cgroup: Path, ports: Ports, probe: Probe) -> None:
    with CgroupGuard(allow_v4=[], deny_all_v6=False, allow_dns_to=None) as guard:
        guard.attach(str(test_cgroup))
        assert probe("tcp", "::1", ports.v6, cgroup=test_cgroup).errno == 0
        assert probe("udp", OTHER_DNS, 53, cgroup=test_cgroup).errno == 0
        assert probe("udp", "::1", 443, cgroup=test_cgroup).errno == EPERM
        # IPv4 rules still hold for an IPv4-mapped destination on a dual-stack socket.
        assert probe("tcp", "::ffff:127.0.0.1", ports.allowed, cgroup=test_cgroup).errno == EPERM


@pytest.mark.privileged
def test_empty_dns_list_refuses_all_dns(test_cgroup: Path, probe: Probe) -> None:
    with CgroupGuard(allow_v4=[], allow_dns_to=[]) as guard:
        guard.attach(str(test_cgroup))
        r = probe("udp", ALLOWED_DNS, 53, cgroup=test_cgroup)
        assert r.errno == EPERM
        assert [e.reason for e in events_of(guard, r.tgid)] == ["dns"]


@pytest.mark.privileged
def test_guard_outlives_its_owner(test_cgroup: Path, ports: Ports, probe: Probe) -> None:
    """If the process that attached the guard dies, the cgroup stays blocked (fail closed)."""
    code = (
        "import os, sys\n"
        "from candela_mitm.ebpf.guard import CgroupGuard\n"
        "CgroupGuard(allow_v4=[]).attach(sys.argv[1])\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(test_cgroup)], check=True, timeout=60)
    assert probe("tcp", "127.0.0.1", ports.allowed, cgroup=test_cgroup).errno == EPERM
    # The test_cgroup fixture removes the cgroup, which releases the orphaned programs.


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allow_v4": [("::1", 80)]},
        {"allow_v4": [("127.0.0.1", 70000)]},
        {"allow_v4": [], "allow_tcp_ports_v4": (-1,)},
        {"allow_v4": [], "allow_dns_to": ["resolver.example"]},
    ],
)
def test_bad_parameters_are_refused_before_loading(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CgroupGuard(**kwargs)
