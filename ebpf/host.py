"""Host enforcement in the kernel: guard.c's host policy attached at the root cgroup, and pinned.

Programs are attached with the legacy attach call (BPF_F_ALLOW_MULTI) at the cgroup v2 root
(or at the scope's cgroup, when enforcement is confined to one: `root=`), so they apply to every
process on the host (in the scope) and stay attached after `candela enforce host`
exits; programs and maps are pinned under /sys/fs/bpf/candela so that later commands find them
(`status`, `off`) and the proxy can read refusals from the pinned ring buffer (PinnedEvents).

Policy (guard.c, GUARD_HOST=1), for every process outside the exempt cgroups:
- UDP to a port in deny_udp_ports (443, 853): refused, any address.
- TCP over IPv6 to a port in deny_v6_tcp_ports (443, which iptables redirects for every IPv4
  address): refused, any address but ::1 (there is no IPv6 redirection; clients fall back to IPv4).
- A provider address: TCP only to a redirected port (80, 443) and only from a network namespace
  registered as redirected (the host's own; sandboxes may add theirs); UDP, other ports and
  IPv6 provider addresses are refused (iptables redirects IPv4 TCP only).
- Everything else: allowed.
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from candela_mitm.enforcement import cgroups
from candela_mitm.enforcement.bypass import EVENT_SIZE, REASONS, BypassEvent

from . import libbpf
from .guard import (
    HOOKS,
    compile_guard,
    set_addr,
    set_config,
    set_flag,
)

PIN_DIR = f"{libbpf.BPFFS}/candela"
PROG_NAMES = frozenset(name for name, _ in HOOKS)
PINNED_MAPS = ("events", "counts", "providers", "exempt", "redirected", "tcp_ports", "udp_deny")
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14+
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class HostPolicy:
    providers: tuple[str, ...]  # provider IP addresses, IPv4 or IPv6
    exempt_cgroups: tuple[str, ...] = ()  # cgroup directories left alone (Candela's own)
    redirect_ports: tuple[int, ...] = (80, 443)
    deny_udp_ports: tuple[int, ...] = (443, 853)
    deny_v6_tcp_ports: tuple[int, ...] = ()  # redirected for every IPv4 address: refused on IPv6
    redirected_netns: tuple[int, ...] = ()  # netns cookies; empty: this process's namespace


def bpffs_mounted(mounts_text: str, path: str = libbpf.BPFFS) -> bool:
    return any(m.fstype == "bpf" and m.target == path for m in cgroups.parse_mounts(mounts_text))


def ensure_bpffs(path: str = libbpf.BPFFS) -> None:
    """Mount the BPF filesystem (where pins live) if it is not mounted yet."""
    if bpffs_mounted(Path(cgroups.PROC_MOUNTS).read_text(), path):
        return
    libc = ct.CDLL(None, use_errno=True)
    os.makedirs(path, exist_ok=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        err = ct.get_errno()
        raise OSError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}")


def netns_cookie(netns_path: str | None = None) -> int:
    """The kernel's cookie for a network namespace: this process's, or the one at netns_path
    (e.g. /run/netns/NAME), read from a socket opened inside it."""

    def _cookie() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])

    if netns_path is None:
        return _cookie()
    result: list[int | BaseException] = []

    def _in_netns() -> None:
        # setns moves only the calling thread: a throwaway thread keeps the process where it is.
        try:
            libc = ct.CDLL(None, use_errno=True)
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ct.get_errno()
                    raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(_cookie())
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=_in_netns, name="netns-cookie")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _candela_programs(root_fd: int) -> list[tuple[int, int, str]]:
    """(attach type, id, name) of Candela's programs attached to this cgroup itself."""
    found = []
    for _, attach_type in HOOKS:
        for prog_id in libbpf.prog_query(root_fd, attach_type):
            try:
                fd = libbpf.prog_fd_by_id(prog_id)
            except OSError:
                continue  # detached meanwhile
            try:
                _, name = libbpf.prog_info(fd)
            finally:
                os.close(fd)
            if name in PROG_NAMES:
                found.append((attach_type, prog_id, name))
    return found


def _detach_ids(root_fd: int, targets: list[tuple[int, int, str]]) -> int:
    n = 0
    for attach_type, prog_id, _ in targets:
        try:
            fd = libbpf.prog_fd_by_id(prog_id)
        except OSError:
            continue
        try:
            libbpf.prog_detach(fd, root_fd, attach_type)
            n += 1
        except OSError:
            pass  # already detached by a concurrent `off`
        finally:
            os.close(fd)
    return n


def _clear_pins(pin_dir: Path) -> None:
    if pin_dir.is_dir():
        for p in pin_dir.iterdir():
            p.unlink()


def install(policy: HostPolicy, *, pin_dir: str = PIN_DIR, root: Path | None = None) -> list[int]:
    """Load, attach at the root cgroup and pin the host programs; returns their ids.

    Make before break: the new programs are attached before any previous Candela programs at
    the root are detached, so re-running never leaves a window with no guard.
    """
    ensure_bpffs()
    root = root if root is not None else cgroups.cgroup2_root()
    b, fns = compile_guard(host=True)
    for ip in policy.providers:
        set_addr(b[b"providers"], ip)
    for port in policy.redirect_ports:
        set_flag(b[b"tcp_ports"], port)
    for port in policy.deny_udp_ports:
        set_flag(b[b"udp_deny"], port)
    for port in policy.deny_v6_tcp_ports:
        set_flag(b[b"v6_tcp_deny"], port)
    for path in policy.exempt_cgroups:
        set_flag(b[b"exempt"], cgroups.cgroup_id(path))
    for cookie in policy.redirected_netns or (netns_cookie(),):
        set_flag(b[b"redirected"], cookie)
    set_config(b, flags=0)

    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        new: list[tuple[int, int, str]] = []
        try:
            for name, attach_type in HOOKS:
                libbpf.prog_attach(fns[name].fd, root_fd, attach_type)
                new.append((attach_type, libbpf.prog_info(fns[name].fd)[0], name))
        except BaseException:
            _detach_ids(root_fd, new)
            raise
        new_ids = {prog_id for _, prog_id, _ in new}
        _detach_ids(root_fd, [t for t in _candela_programs(root_fd) if t[1] not in new_ids])
    finally:
        os.close(root_fd)

    pins = Path(pin_dir)
    pins.mkdir(parents=True, exist_ok=True)
    _clear_pins(pins)
    for name, _ in HOOKS:
        libbpf.obj_pin(fns[name].fd, str(pins / name))
    for name in PINNED_MAPS:
        libbpf.obj_pin(b[name.encode()].map_fd, str(pins / name))
    b.cleanup()  # our fds go; the cgroup and the pins keep programs and maps alive
    return sorted(new_ids)


def detach(root: Path) -> int:
    """Detach Candela's programs from one cgroup (a scope enforcement has moved away from),
    leaving the pins alone; how many were detached. A cgroup that is gone has none."""
    if not root.is_dir():
        return 0
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _detach_ids(root_fd, _candela_programs(root_fd))
    finally:
        os.close(root_fd)


def uninstall(*, pin_dir: str = PIN_DIR, root: Path | None = None) -> int:
    """Detach every Candela program at the root cgroup, or at `root` (a scope), pinned or not, and
    remove the pins; returns how many programs were detached. Idempotent. A scope that is gone
    took its programs with it: only the pins are left to remove."""
    n = detach(root if root is not None else cgroups.cgroup2_root())
    pins = Path(pin_dir)
    _clear_pins(pins)
    if pins.is_dir():
        pins.rmdir()
    return n


def attached(root: Path | None = None) -> list[tuple[str, int, str]]:
    """(hook, program id, name) of Candela's programs at the root cgroup."""
    root = root if root is not None else cgroups.cgroup2_root()
    names = {attach_type: name for name, attach_type in HOOKS}
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [(names[t], i, n) for t, i, n in _candela_programs(root_fd)]
    finally:
        os.close(root_fd)


def pinned_counts(pin_dir: str = PIN_DIR) -> dict[str, int]:
    """Refusals per reason since `enforce host` loaded the programs ({} when not pinned)."""
    path = Path(pin_dir) / "counts"
    if not path.exists():
        return {}
    fd = libbpf.obj_get(str(path))
    try:
        out = {}
        for code, name in REASONS.items():
            raw = libbpf.map_lookup(fd, struct.pack("=I", code), 8)
            if raw is not None and (value := struct.unpack("=Q", raw)[0]):
                out[name] = int(value)
        return out
    finally:
        os.close(fd)


def _pinned_flag(pin_dir: str, map_name: str, key: bytes, on: bool) -> bool:
    fd = libbpf.obj_get(str(Path(pin_dir) / map_name))
    try:
        if on:
            libbpf.map_update(fd, key, b"\x01")
            return True
        return libbpf.map_delete(fd, key)
    finally:
        os.close(fd)


def register_netns(cookie: int, *, pin_dir: str = PIN_DIR, redirected: bool = True) -> bool:
    """Tell the host guard that provider TCP from this namespace is redirected to the proxy (a
    sandbox with its own PREROUTING redirect), or no longer (redirected=False)."""
    return _pinned_flag(pin_dir, "redirected", struct.pack("=Q", cookie), redirected)


def register_exempt(cgroup_path: str, *, pin_dir: str = PIN_DIR, exempt: bool = True) -> bool:
    """Exempt (or stop exempting) one more cgroup from the host guard."""
    key = struct.pack("=Q", cgroups.cgroup_id(cgroup_path))
    return _pinned_flag(pin_dir, "exempt", key, exempt)


class PinnedEvents:
    """Refusals from the host guard's pinned ring buffer, for the long-running proxy.

    Only one reader should consume it. When `enforce host` is re-run the pins are replaced;
    poll notices (at most once a second) and reopens. With enforcement off, poll returns [].
    """

    def __init__(self, pin_dir: str = PIN_DIR):
        self.path = str(Path(pin_dir) / "events")
        self.malformed = 0
        self._events: list[BypassEvent] = []
        self._ring: libbpf.RingBuffer | None = None
        self._fd: int | None = None
        self._map_id: int | None = None
        self._checked = 0.0

    def _on_record(self, data: bytes) -> None:
        if len(data) < EVENT_SIZE:
            self.malformed += 1
        else:
            self._events.append(BypassEvent.from_bytes(data))

    def _close_ring(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._map_id = None

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._ring is not None and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            fd = libbpf.obj_get(self.path)
        except OSError:
            self._close_ring()  # enforcement is off
            return
        current = libbpf.map_id(fd)
        if current == self._map_id:
            os.close(fd)
            return
        self._close_ring()
        self._fd, self._map_id = fd, current
        self._ring = libbpf.RingBuffer(fd, self._on_record)

    def poll(self, timeout_ms: int = 100) -> list[BypassEvent]:
        self._refresh()
        if self._ring is None:
            time.sleep(timeout_ms / 1000)
            return []
        self._ring.poll(timeout_ms)
        out, self._events = self._events, []
        return out

    def close(self) -> None:
        self._close_ring()

    def __enter__(self) -> PinnedEvents:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
