from __future__ import annotations

import ipaddress
import struct

import pytest

from candela_mitm.audit.actions import BYPASS_ATTEMPT
from candela_mitm.enforcement.bypass import EVENT_FORMAT, EVENT_SIZE, BypassEvent, audit_record


def raw_event(
    *,
    ip: str = "10.0.0.7",
    port: int = 8443,
    family: int = 4,
    protocol: int = 6,
    hook: int = 1,
    reason: int = 1,
    comm: bytes = b"curl",
    pid: int = 4242,
    tgid: int = 4240,
    uid: int = 1000,
    gid: int = 100,
    cgroup_id: int = 9001,
) -> bytes:
    a = ipaddress.ip_address(ip)
    dst = (
        ipaddress.IPv6Address(f"::ffff:{a}").packed
        if isinstance(a, ipaddress.IPv4Address)
        else a.packed
    )
    return struct.pack(
        EVENT_FORMAT, cgroup_id, pid, tgid, uid, gid, dst, port, family, protocol, hook, reason,
        0, comm,
    )  # fmt: skip


def test_event_layout_matches_guard_c() -> None:
    # struct guard_event in ebpf/guard.c is 64 bytes without holes.
    assert EVENT_SIZE == 64


DECODE = [
    # (raw kwargs, family, ip, protocol, hook, reason)
    ({}, "ipv4", "10.0.0.7", "tcp", "connect4", "not_allowed"),
    ({"ip": "2001:db8::1", "family": 6, "hook": 2, "reason": 3}, "ipv6", "2001:db8::1", "tcp",
     "connect6", "ipv6"),
    ({"ip": "127.0.0.1", "family": 6, "hook": 2}, "ipv6", "::ffff:127.0.0.1", "tcp", "connect6",
     "not_allowed"),
    ({"protocol": 17, "hook": 3, "reason": 2, "port": 443}, "ipv4", "10.0.0.7", "udp",
     "sendmsg4", "udp_port"),
    ({"protocol": 17, "hook": 4, "reason": 4, "family": 6, "ip": "::1"}, "ipv6", "::1", "udp",
     "sendmsg6", "dns"),
    ({"reason": 6}, "ipv4", "10.0.0.7", "tcp", "connect4", "foreign_netns"),
    ({"protocol": 99, "hook": 9, "reason": 42}, "ipv4", "10.0.0.7", "proto-99", "hook-9",
     "reason-42"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,family,ip,protocol,hook,reason", DECODE)
def test_from_bytes(
    kwargs: dict[str, object], family: str, ip: str, protocol: str, hook: str, reason: str
) -> None:
    ev = BypassEvent.from_bytes(raw_event(**kwargs))  # type: ignore[arg-type]
    assert (ev.family, ev.ip, ev.protocol, ev.hook, ev.reason) == (
        family,
        ip,
        protocol,
        hook,
        reason,
    )
    assert (ev.pid, ev.tgid, ev.uid, ev.gid, ev.cgroup_id) == (4242, 4240, 1000, 100, 9001)
    assert ev.verdict == "denied"


@pytest.mark.parametrize(
    "comm,expected",
    [(b"curl", "curl"), (b"python3\0junk", "python3"), (b"x" * 16, "x" * 16), (b"\xff\xfe", "\ufffd\ufffd")],
)  # fmt: skip
def test_comm_is_cut_at_nul_and_decoded(comm: bytes, expected: str) -> None:
    assert BypassEvent.from_bytes(raw_event(comm=comm)).comm == expected


def test_short_record_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 64"):
        BypassEvent.from_bytes(raw_event()[:40])


def test_longer_record_is_read_by_its_head() -> None:
    assert BypassEvent.from_bytes(raw_event() + b"\0" * 8).port == 8443


@pytest.mark.parametrize(
    "ip,family,destination",
    [("10.0.0.7", 4, "10.0.0.7:8443"), ("2001:db8::1", 6, "[2001:db8::1]:8443")],
)
def test_destination(ip: str, family: int, destination: str) -> None:
    assert BypassEvent.from_bytes(raw_event(ip=ip, family=family)).destination == destination


def test_audit_record() -> None:
    ev = BypassEvent.from_bytes(raw_event(protocol=17, hook=3, reason=2, port=443))
    action, fields = audit_record(ev, sandbox="run-1")
    assert action == BYPASS_ATTEMPT == "bypass_attempt"
    assert fields == {
        "pid": 4242,
        "tgid": 4240,
        "uid": 1000,
        "gid": 100,
        "comm": "curl",
        "cgroup_id": 9001,
        "family": "ipv4",
        "ip": "10.0.0.7",
        "port": 443,
        "protocol": "udp",
        "hook": "sendmsg4",
        "reason": "udp_port",
        "verdict": "denied",
        "destination": "10.0.0.7:443",
        "sandbox": "run-1",
    }
    assert ev.metric_kind == "udp_port"


def test_describe_names_who_and_where() -> None:
    line = BypassEvent.from_bytes(raw_event()).describe()
    for part in ("denied", "tcp", "10.0.0.7:8443", "not_allowed", "curl", "pid=4240", "tid=4242"):
        assert part in line
