"""CgroupGuard: the connection guard (guard.c) attached to one governed cgroup.

API (used by the sandbox, `candela run`)::

    from candela_mitm.ebpf.guard import CgroupGuard

    with CgroupGuard(allow_v4=[("10.200.0.1", 8443)],    # (ip, port); port 0 = any port
                     allow_tcp_ports_v4=(80, 443),       # TCP to ANY IPv4 on these ports
                     deny_udp_ports=(443, 853),
                     deny_all_v6=True,
                     allow_dns_to=["10.200.0.1"],
                     netns_cookies=[netns_cookie("/run/netns/candela-1")]) as guard:
        guard.attach("/sys/fs/cgroup/unified/candela-run-1")   # or a path relative to the v2 root
        ...
        for event in guard.poll(timeout_ms=100):               # list[BypassEvent]
            writer.record(*audit_record(event)) ...

Policy, for every process in the cgroup and its descendants (threads and children included):

- UDP (connect or sendmsg) to a port in `deny_udp_ports`: refused, whatever the address.
- A destination in `allow_v4` (exact port, or any port when listed with 0): allowed.
- From a network namespace not in `netns_cookies` (when it is a list): refused (foreign_netns),
  except `allow_v4` destinations and refused UDP ports. A namespace made inside the sandbox
  (`unshare -Urn`) or a process moved into the cgroup from elsewhere is outside the sandbox's
  firewall redirect, so "TCP 80/443 to any address" must not hold there.
- DNS (port 53, TCP or UDP) when `allow_dns_to` is a list: only to those resolvers (IPv4 or IPv6
  addresses; an empty list refuses all DNS). `None` leaves DNS to the rules below.
- Other IPv4 TCP: allowed only to ports in `allow_tcp_ports_v4` (any address), else refused.
- Other IPv4 UDP: allowed (UDP is refused by port: QUIC and DNS over QUIC).
- IPv6: refused when `deny_all_v6`, else allowed (UDP still by port). IPv4-mapped IPv6
  addresses (::ffff:a.b.c.d) follow the IPv4 rules, so a dual-stack socket is no way around.

Refusals fail the call with EPERM and emit a BypassEvent (pid = thread id, tgid = process id,
uid, comm, cgroup id, destination, protocol, hook, reason) through a ring buffer; `poll` drains
it. The programs are attached with BPF_F_ALLOW_MULTI through the legacy attach call: they stay
attached if this process dies, so a crashed Candela leaves the cgroup blocked, not open; `detach`
(also on `__exit__`) removes them and removing the cgroup frees them.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import importlib.resources
import ipaddress
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from candela_mitm.enforcement import cgroups
from candela_mitm.enforcement.bypass import EVENT_SIZE, BypassEvent

from . import libbpf

SOURCE = "guard.c"
DNS_PORT = 53
F_DENY_ALL_V6 = 1
F_DNS_RESTRICTED = 2
F_NETNS_RESTRICTED = 4

# (function in guard.c, attach type): the four hooks every guard attaches.
HOOKS: tuple[tuple[str, int], ...] = (
    ("candela_conn4", libbpf.CGROUP_INET4_CONNECT),
    ("candela_conn6", libbpf.CGROUP_INET6_CONNECT),
    ("candela_send4", libbpf.CGROUP_UDP4_SENDMSG),
    ("candela_send6", libbpf.CGROUP_UDP6_SENDMSG),
)


def source() -> str:
    return importlib.resources.files("candela_mitm.ebpf").joinpath(SOURCE).read_text()


def addr_bytes(ip: str) -> bytes:
    """16 bytes, network order: IPv6 as is, IPv4 as IPv4-mapped (the maps' key form)."""
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{a}").packed
    return a.packed


def compile_guard(
    *, host: bool, max_entries: int = 1024, ringbuf_pages: int = 16, cgroup_depth: int = 8
) -> Any:
    """Compile guard.c with bcc and load its four programs; returns (BPF, {name: Function})."""
    from bcc import BPF  # imported here: bcc is a Debian package, absent on unprivileged hosts

    cflags = [
        f"-DGUARD_HOST={1 if host else 0}",
        f"-DMAX_ENTRIES={int(max_entries)}",
        f"-DRINGBUF_PAGES={int(ringbuf_pages)}",
        f"-DCGROUP_DEPTH={int(cgroup_depth)}",
    ]
    # bcc wants bytes (str works but warns on every call).
    b = BPF(text=source().encode(), cflags=cflags)
    fns = {
        name: b.load_func(name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
        for name, attach_type in HOOKS
    }
    return b, fns


def set_flag(table: Any, key: int) -> None:
    table[table.Key(key)] = table.Leaf(1)


def set_addr(table: Any, ip: str) -> None:
    table[table.Key.from_buffer_copy(addr_bytes(ip))] = table.Leaf(1)


def set_addr_port(table: Any, ip: str, port: int) -> None:
    raw = addr_bytes(ip) + struct.pack("=HH", port, 0)
    table[table.Key.from_buffer_copy(raw)] = table.Leaf(1)


def set_config(b: Any, *, flags: int) -> None:
    t = b[b"config"]
    leaf = t.Leaf()
    leaf.flags = flags
    leaf.dns_port = DNS_PORT
    t[t.Key(0)] = leaf


def read_counts(table: Any) -> dict[int, int]:
    """Refusals per reason code since load (the `counts` array)."""
    return {int(k.value): int(v.value) for k, v in table.items() if v.value}


class EventQueue:
    """Decoded events from a bcc ring buffer, collected by its callback."""

    def __init__(self) -> None:
        self.events: list[BypassEvent] = []
        self.malformed = 0

    def on_raw(self, _ctx: Any, data: Any, size: int) -> int:
        raw = ct.string_at(data, size)
        if size < EVENT_SIZE:
            self.malformed += 1
        else:
            self.events.append(BypassEvent.from_bytes(raw))
        return 0

    def take(self) -> list[BypassEvent]:
        out, self.events = self.events, []
        return out


def _port(value: int, what: str) -> int:
    if not 0 <= int(value) <= 65535:
        raise ValueError(f"{what}: port {value} is out of range")
    return int(value)


class CgroupGuard:
    """The connection guard for one cgroup (see the module docstring for the policy)."""

    def __init__(
        self,
        *,
        allow_v4: list[tuple[str, int]],
        allow_tcp_ports_v4: tuple[int, ...] = (),
        deny_udp_ports: tuple[int, ...] = (443, 853),
        deny_all_v6: bool = True,
        allow_dns_to: list[str] | None = None,
        netns_cookies: list[int] | None = None,
    ):
        self.allow_v4 = [
            (str(ipaddress.IPv4Address(ip)), _port(p, "allow_v4")) for ip, p in allow_v4
        ]
        self.allow_tcp_ports_v4 = tuple(_port(p, "allow_tcp_ports_v4") for p in allow_tcp_ports_v4)
        self.deny_udp_ports = tuple(_port(p, "deny_udp_ports") for p in deny_udp_ports)
        self.deny_all_v6 = deny_all_v6
        self.allow_dns_to = (
            None if allow_dns_to is None else [str(ipaddress.ip_address(a)) for a in allow_dns_to]
        )
        # None: any namespace; a list (cookies from candela_mitm.ebpf.host.netns_cookie): only those
        self.netns_cookies = None if netns_cookies is None else [int(c) for c in netns_cookies]
        self.cgroup_path: Path | None = None
        self._bpf: Any = None
        self._fns: dict[str, Any] = {}
        self._cgroup_fd: int | None = None
        self._attached: list[tuple[Any, int]] = []
        self._queue = EventQueue()

    # -- lifecycle ----------------------------------------------------------------------------

    def attach(self, cgroup_path: str) -> None:
        """Compile and load the programs, write the policy into their maps, attach to the cgroup.

        Raises ImportError without bcc, OSError/Exception from bcc when loading fails; on any
        failure nothing stays attached.
        """
        if self._attached:
            raise RuntimeError(f"already attached to {self.cgroup_path}")
        path = cgroups.resolve(cgroup_path)
        b, fns = compile_guard(host=False)
        self._bpf, self._fns = b, fns
        self._fill(b)
        b[b"events"].open_ring_buffer(self._queue.on_raw)
        from bcc import BPF

        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self._cgroup_fd, self.cgroup_path = fd, path
        try:
            for name, attach_type in HOOKS:
                BPF.attach_func(fns[name], fd, attach_type, libbpf.BPF_F_ALLOW_MULTI)
                self._attached.append((fns[name], attach_type))
        except BaseException:
            self.detach()
            raise

    def _fill(self, b: Any) -> None:
        flags = F_DENY_ALL_V6 if self.deny_all_v6 else 0
        if self.allow_dns_to is not None:
            flags |= F_DNS_RESTRICTED
            for ip in self.allow_dns_to:
                set_addr(b[b"dns"], ip)
        if self.netns_cookies is not None:
            flags |= F_NETNS_RESTRICTED
            for cookie in self.netns_cookies:
                set_flag(b[b"own_netns"], cookie)
        for ip, port in self.allow_v4:
            set_addr_port(b[b"allow"], ip, port)
        for port in self.allow_tcp_ports_v4:
            set_flag(b[b"tcp_ports"], port)
        for port in self.deny_udp_ports:
            set_flag(b[b"udp_deny"], port)
        set_config(b, flags=flags)

    def detach(self) -> None:
        """Detach every program (idempotent); the compiled object is released."""
        from bcc import BPF

        errors: list[str] = []
        while self._attached:
            fn, attach_type = self._attached.pop()
            try:
                BPF.detach_func(fn, self._cgroup_fd, attach_type)
            except Exception as e:  # the cgroup may be gone already: its programs went with it
                if self.cgroup_path is not None and self.cgroup_path.exists():
                    errors.append(str(e))
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None
        if self._bpf is not None:
            # What is still in the ring buffer stays available to poll(); bcc raises when there
            # is nothing to consume from, which is no reason to keep programs loaded.
            with contextlib.suppress(Exception):
                self._bpf.ring_buffer_consume()
            self._bpf.cleanup()
            self._bpf = None
            self._fns = {}
        if errors:
            raise OSError(f"detach from {self.cgroup_path}: {'; '.join(errors)}")

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def __enter__(self) -> CgroupGuard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    # -- events -------------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> list[BypassEvent]:
        """Drain the ring buffer: waits up to timeout_ms for the first event, then takes all."""
        if self._bpf is None:
            return self._queue.take()
        self._bpf.ring_buffer_poll(timeout_ms)
        self._bpf.ring_buffer_consume()
        return self._queue.take()

    def counts(self) -> dict[str, int]:
        """Refusals per reason since attach (kept by the kernel even when events are dropped)."""
        from candela_mitm.enforcement.bypass import REASONS

        if self._bpf is None:
            return {}
        return {REASONS.get(k, str(k)): v for k, v in read_counts(self._bpf[b"counts"]).items()}


def describe_policy(guard: CgroupGuard) -> Iterable[str]:
    """Human-readable lines for logs: what the guard lets through."""
    allowed = [f"{ip}:{port or '*'}" for ip, port in guard.allow_v4]
    yield f"allow: {', '.join(allowed) or 'nothing'}"
    if guard.allow_tcp_ports_v4:
        yield f"tcp to any IPv4 on ports {', '.join(map(str, guard.allow_tcp_ports_v4))}"
    yield f"udp refused on ports {', '.join(map(str, guard.deny_udp_ports)) or 'none'}"
    yield "ipv6 refused" if guard.deny_all_v6 else "ipv6 allowed"
    if guard.allow_dns_to is not None:
        yield f"dns only to {', '.join(guard.allow_dns_to) or 'nothing'}"
    if guard.netns_cookies is not None:
        yield f"only from network namespaces {', '.join(map(str, guard.netns_cookies)) or 'none'}"
