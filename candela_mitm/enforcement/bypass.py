"""Bypass attempts: a connection the kernel refused because it tried to go around the proxy."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import asdict, dataclass
from typing import Any, Literal

from candela_mitm.audit.actions import BYPASS_ATTEMPT

# Why the guard refused, by the code ebpf/guard.c puts in the event (R_* there).
REASONS: dict[int, str] = {
    1: "not_allowed",  # sandbox: the destination is neither the proxy nor explicitly allowed
    2: "udp_port",  # UDP to a refused port: QUIC (443), DNS over QUIC (853)
    3: "ipv6",  # sandbox: IPv6 is refused as a whole
    4: "dns",  # DNS to a resolver that is not the allowed one
    5: "provider_port",  # host: a provider address on a port or protocol not redirected
    # host: a provider connect from a namespace redirection does not cover; sandbox: a connect
    # from a namespace other than the sandbox's own (made inside it, or a process moved in)
    6: "foreign_netns",
    7: "provider_ipv6",  # host: IPv6 to a provider (there is no IPv6 redirection)
    # host: TCP over IPv6 to a port IPv4 redirects for every address (443): it would go around
    # the decision by server name; clients fall back to IPv4, which is redirected
    8: "ipv6_redirected_port",
}
HOOKS: dict[int, str] = {1: "connect4", 2: "connect6", 3: "sendmsg4", 4: "sendmsg6"}
PROTOCOLS: dict[int, str] = {6: "tcp", 17: "udp"}

# struct guard_event in ebpf/guard.c: cgroup_id, pid, tgid, uid, gid, dst[16], port, family,
# protocol, hook, reason, pad, comm[16]. Native byte order (the kernel's), no padding.
EVENT_FORMAT = "=QIIII16sHBBBBH16s"
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)


@dataclass(frozen=True)
class BypassEvent:
    """One refused connect() or sendmsg(), as the guard saw it."""

    pid: int  # the thread that called (the kernel's pid)
    tgid: int  # its process (what ps calls the pid)
    uid: int
    gid: int
    comm: str
    cgroup_id: int
    family: Literal["ipv4", "ipv6"]  # the socket address family the program ran for
    ip: str  # the destination as the caller gave it (IPv4-mapped IPv6 stays in IPv6 form)
    port: int
    protocol: str  # tcp | udp | proto-<n>
    hook: str  # connect4 | connect6 | sendmsg4 | sendmsg6
    reason: str  # a REASONS value
    verdict: Literal["denied"] = "denied"

    @classmethod
    def from_bytes(cls, data: bytes) -> BypassEvent:
        """Decode one ring-buffer record; ValueError if it is not a guard event."""
        if len(data) < EVENT_SIZE:
            raise ValueError(f"bypass event is {len(data)} bytes, expected {EVENT_SIZE}")
        (cgroup_id, pid, tgid, uid, gid, dst, port, family, protocol, hook, reason, _pad, comm) = (
            struct.unpack_from(EVENT_FORMAT, data)
        )
        addr = ipaddress.IPv6Address(dst)
        v4 = addr.ipv4_mapped
        if v4 is None:
            ip = str(addr)
        elif family == 4:
            ip = str(v4)
        else:
            ip = f"::ffff:{v4}"  # a dual-stack socket's IPv4 destination, shown as written
        return cls(
            pid=pid,
            tgid=tgid,
            uid=uid,
            gid=gid,
            comm=comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
            cgroup_id=cgroup_id,
            family="ipv4" if family == 4 else "ipv6",
            ip=ip,
            port=port,
            protocol=PROTOCOLS.get(protocol, f"proto-{protocol}"),
            hook=HOOKS.get(hook, f"hook-{hook}"),
            reason=REASONS.get(reason, f"reason-{reason}"),
        )

    @property
    def destination(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @property
    def metric_kind(self) -> str:
        """The `kind` label of candela_bypass_attempts_total."""
        return self.reason

    def audit_fields(self, **context: Any) -> dict[str, Any]:
        """The fields of the audit entry; `context` adds where it was seen (e.g. sandbox name)."""
        fields: dict[str, Any] = asdict(self)
        fields["destination"] = self.destination
        fields.update(context)
        return fields

    def describe(self) -> str:
        """One line for logs and `candela enforce status`."""
        return (
            f"{self.verdict} {self.protocol} {self.destination} ({self.reason}) "
            f"from {self.comm} pid={self.tgid} tid={self.pid} uid={self.uid} "
            f"cgroup={self.cgroup_id} via {self.hook}"
        )


def audit_record(event: BypassEvent, **context: Any) -> tuple[str, dict[str, Any]]:
    """(action, fields) for the audit writer: ``action, f = audit_record(ev); writer.record(action, **f)``."""
    return BYPASS_ATTEMPT, event.audit_fields(**context)
