"""Workload identity: the process at the other end of an intercepted connection, from the kernel.

Never from anything the process sends: the socket is asked of its network namespace's kernel
(sock_diag: that one socket's uid and inode; the namespace's TCP tables, procnet, where netlink
cannot answer), the process holding it found by its /proc/<pid>/fd links, and what it runs from
/proc/<pid>/exe (hashed through that link, so a deleted or replaced file, or one inside a
container's mount namespace, is still the code that runs), /proc/<pid>/status and
/proc/<pid>/cgroup. Reads of /proc: call it off the event loop, once per connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from candela_mitm.config import WorkloadRule
from candela_mitm.enforcement import procnet, sockdiag

log = logging.getLogger("candela.workload")

# docker-<id>.scope, /docker/<id>, cri-containerd-<id>.scope, crio-<id>, libpod-<id>: a container
# runtime names the cgroup after the container's 64-hex id
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)")
_HASH_CACHE_MAX = 4096


@dataclass(frozen=True)
class Workload:
    """The process that holds one end of a connection."""

    pid: int
    comm: str | None  # the kernel's name of the process (15 characters at most)
    exe: str | None  # the executable's path as the process's mount namespace names it
    exe_sha256: str | None  # of the bytes /proc/<pid>/exe opens: the code that runs
    uid: int | None  # effective uid
    cgroup: str | None  # cgroup v2 path
    container_id: str | None

    def fields(self) -> dict[str, Any]:
        """The audit and span fields, `workload_` prefixed."""
        return {f"workload_{k}": v for k, v in asdict(self).items()}


# (st_dev, st_ino, st_size, st_mtime_ns) of an executable -> its sha256: a binary is hashed once
_hashes: dict[tuple[int, int, int, int], str] = {}


def exe_sha256(pid: int) -> str | None:
    """SHA-256 of the executable a process runs (cached by the file's identity and mtime)."""
    link = f"/proc/{pid}/exe"
    try:
        with open(link, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            found = _hashes.get(key)
            if found is not None:
                return found
            digest = hashlib.sha256()
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    if len(_hashes) >= _HASH_CACHE_MAX:
        _hashes.clear()
    _hashes[key] = digest.hexdigest()
    return _hashes[key]


def container_id(cgroup: str | None) -> str | None:
    """The container id a cgroup path names (docker, containerd, CRI-O, podman), if any."""
    if not cgroup:
        return None
    m = _CONTAINER_ID.search(cgroup)
    return m.group(1) if m else None


def _cgroup(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[2])  # real, effective, saved, filesystem
    except (OSError, ValueError, IndexError):
        return None
    return None


def describe(pid: int) -> Workload:
    """What the kernel says about a process (None for what it would not tell)."""
    comm = exe = None
    with contextlib.suppress(OSError):
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    with contextlib.suppress(OSError):
        exe = os.readlink(f"/proc/{pid}/exe")
    cgroup = _cgroup(pid)
    return Workload(pid, comm, exe, exe_sha256(pid), _uid(pid), cgroup, container_id(cgroup))


def _all_pids() -> list[int]:
    return sorted(int(e.name) for e in os.scandir("/proc") if e.name.isdigit())


# Where sockets were last seen held, to look there first. Every answer taken from here is
# verified against the kernel (the /proc/<pid>/fd/<n> link names the socket) before it is
# trusted: pids and fd numbers are reused, a socket's inode is not while it lives.
_seen: dict[int, tuple[int, str]] = {}  # socket inode -> (pid, fd) of a fd table read lately
_last: dict[int, int] = {}  # socket owner uid -> the pid that held its last looked-up socket
_member: dict[int, int] = {}  # network namespace inode -> the member that last asked its kernel
_SEEN_MAX = 16384


def _remember(inode: int, pid: int, fd: str) -> None:
    if len(_seen) >= _SEEN_MAX:
        _seen.clear()
    _seen[inode] = (pid, fd)


def _verified(inode: int, allowed: set[int] | None) -> int | None:
    """The pid a recent fd table read showed holding `inode`, if it still does."""
    hit = _seen.get(inode)
    if hit is None or (allowed is not None and hit[0] not in allowed):
        return None
    pid, fd = hit
    try:
        if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
            return pid
    except OSError:
        pass
    _seen.pop(inode, None)
    return None


def socket_holder(inode: int, pids: Iterable[int]) -> int | None:
    """The first of `pids` with a file descriptor on socket `inode`; the other sockets read on
    the way are remembered (`_seen`), so the next connection of a busy client is one readlink."""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            with os.scandir(f"/proc/{pid}/fd") as fds:
                for fd in fds:
                    try:
                        link = os.readlink(fd.path)
                    except OSError:
                        continue
                    if link == target:
                        _remember(inode, pid, fd.name)
                        return pid
                    if link.startswith("socket:["):
                        with contextlib.suppress(ValueError):
                            _remember(int(link[8:-1]), pid, fd.name)
        except OSError:
            continue
    return None


def _tables(pid: int | None) -> str:
    base = f"/proc/{pid}/net" if pid is not None else "/proc/self/net"
    text = ""
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            text += Path(f"{base}/{name}").read_text()
    return text


def find_socket(
    address: str,
    port: int,
    pid: int | None = None,
    netns_inode: int | None = None,
    remote: tuple[str, int] | None = None,
) -> procnet.TcpSocket | None:
    """The socket a process holds bound locally to address:port (only the one connected to
    `remote`, when known), in this process's network namespace or `pid`'s (which must be the one whose inode
    is `netns_inode`, when given): asked of the kernel for that one socket (sock_diag), else
    (no netlink, a namespace this process may not enter) found in the namespace's TCP tables."""
    netns = f"/proc/{pid}/ns/net" if pid is not None else None
    try:
        return sockdiag.find(address, port, remote, netns, netns_inode)
    except sockdiag.NamespaceChanged:
        return None  # that pid now runs elsewhere: its tables are not the sandbox's either
    except OSError as e:
        log.debug("sock_diag unavailable (%s): reading the TCP tables", e)
    if netns_inode is not None and netns is not None:
        try:
            if os.stat(netns).st_ino != netns_inode:
                return None  # as above
        except OSError:
            return None  # gone
    return procnet.find(_tables(pid), address, port, remote)


def owner_uid(address: str, port: int, remote: tuple[str, int]) -> int | None:
    """The uid owning this namespace's socket of the connection address:port -> remote (the
    client end of a loopback connection to us: its local end is the peer's address, its other
    end ours), as the kernel recorded it; None when there is no such connection."""
    row = find_socket(address, port, remote=remote)
    return row.uid if row is not None else None


def peer(
    address: str,
    port: int,
    netns_pids: list[int] | None = None,
    netns_inode: int | None = None,
    remote: tuple[str, int] | None = None,
) -> Workload | None:
    """The process whose TCP socket is bound locally to address:port.

    `netns_pids`: the processes of the network namespace the connection came from (a
    sandbox's, whose inode `netns_inode` is); None: this process's own namespace (the host's,
    under host enforcement or on loopback), whose every process is a candidate. `remote`: the
    connection's other end as the kernel gave it (a transparent proxy's original destination),
    when known: the kernel then finds the socket by its hash lookup, and no other socket that
    shares the local end (connect() shares ephemeral ports between destinations) is taken.
    """
    if netns_pids is not None:
        listed = netns_pids
        return _in_namespace(address, port, netns_inode, remote, lambda: listed)
    row = find_socket(address, port, None, None, remote)
    if row is None:
        return None
    pid = _verified(row.inode, None) or _host_holder(row)
    return _found(row, pid)


def peer_in_netns(
    address: str,
    port: int,
    netns_inode: int,
    remote: tuple[str, int] | None,
    members: Callable[[], list[int]],
) -> Workload | None:
    """`peer` for a connection from the network namespace whose inode is `netns_inode` (a
    sandbox's). `members` lists the namespace's processes (a scan of every process's
    /proc/<pid>/ns/net: ~1-2 ms on a busy host), called only when the cheap answers fail: the
    member that last answered for this namespace asks its kernel, and the socket's holder is
    the one remembered for it or for its uid, each checked to be in the namespace now."""
    return _in_namespace(address, port, netns_inode, remote, members)


def _in_namespace(
    address: str,
    port: int,
    inode: int | None,
    remote: tuple[str, int] | None,
    members: Callable[[], list[int]],
) -> Workload | None:
    listed: list[int] | None = None
    pid0 = _member.get(inode) if inode is not None else None
    if pid0 is None or not in_netns(pid0, inode):
        listed = members()
        if not listed:
            return None
        pid0 = listed[0]  # the namespace's members share its tables: ask the first
        if inode is not None:
            if len(_member) >= _SEEN_MAX:
                _member.clear()
            _member[inode] = pid0
    row = find_socket(address, port, pid0, inode, remote)
    if row is None:
        return None
    last = _last.get(row.uid)
    if listed is not None:
        allowed = set(listed)
        pid = _verified(row.inode, allowed) or socket_holder(row.inode, _first(listed, last))
        return _found(row, pid)
    # a process outside the namespace may hold one of its sockets (passed to it): never taken
    pid = _verified(row.inode, None)
    if pid is not None and not in_netns(pid, inode):
        pid = None
    if pid is None and last is not None and in_netns(last, inode):
        pid = socket_holder(row.inode, [last])
    if pid is None:
        listed = [p for p in members() if p != last]
        pid = socket_holder(row.inode, listed)
    return _found(row, pid)


def _found(row: procnet.TcpSocket, pid: int | None) -> Workload | None:
    if pid is None:
        return None
    if len(_last) >= _SEEN_MAX:  # uids of user namespaces: many, bounded all the same
        _last.clear()
    _last[row.uid] = pid
    return describe(pid)


def in_netns(pid: int, inode: int | None) -> bool:
    """Whether `pid` is in the network namespace whose inode is `inode` now (None: the
    caller's own namespace, which `peer` never narrows)."""
    if inode is None:
        return True
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == inode
    except OSError:
        return False


def _first(pids: list[int], pid: int | None) -> list[int]:
    """`pids` with `pid` moved to the front (when it is one of them)."""
    if pid is None or pid not in pids:
        return pids
    return [pid, *(p for p in pids if p != pid)]


def _host_holder(row: procnet.TcpSocket) -> int | None:
    """Any process of the machine: the one that held this uid's last socket, then the socket
    owner uid's processes, then the rest (a socket passed to another user's process). A socket
    several processes share (inherited across fork) is reported as held by the first found, a
    process that holds it either way: the lowest pid only when no earlier holder was known."""
    last = _last.get(row.uid)
    if last is not None and (pid := socket_holder(row.inode, [last])) is not None:
        return pid
    owned = [p for p in _pids_of_uid(row.uid) if p != last]
    pid = socket_holder(row.inode, owned)
    if pid is None:
        tried = {*owned, last}
        pid = socket_holder(row.inode, [p for p in _all_pids() if p not in tried])
    return pid


def _pids_of_uid(uid: int) -> list[int]:
    """Processes owned by `uid` (a stat each: far cheaper than reading every fd table)."""
    out = []
    for pid in _all_pids():
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid == uid:
                out.append(pid)
    return out


def matching_rule(rules: Sequence[WorkloadRule], w: Workload) -> int | None:
    """The index of the first governance.workloads rule naming this process's executable: its
    path and/or its hash, each as the kernel gives it. A binary whose hash is unknown matches no
    rule that names a hash, so a copy of another program cannot borrow a known tool's rule."""
    for i, rule in enumerate(rules):
        if rule.sha256 is not None and rule.sha256 != w.exe_sha256:
            continue
        if rule.exe is not None and rule.exe != w.exe:
            continue
        return i
    return None
