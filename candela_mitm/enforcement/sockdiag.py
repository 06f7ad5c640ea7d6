"""One TCP socket asked of the kernel by its addresses and ports (NETLINK_SOCK_DIAG, inet_diag).

With both ends known the kernel finds the connection by its own hash lookup (~25 us); with only
the local end it filters a dump (the port in the request, the address in a one-instruction
inet_diag bytecode program). Either way only that socket's row comes back, with its uid and
inode: a load generator's thousands of TIME_WAIT rows are never printed nor parsed, as
/proc/net/tcp and procnet.parse do with every one. pyroute2's DiagSocket only dumps whole
tables (no exact request, no bytecode), so the requests are packed here.

A netlink socket answers for the network namespace it was created in: `netns` names another
one (`/proc/<pid>/ns/net`), entered by a short-lived thread that creates the socket there (setns
changes only the calling thread's namespace, and that thread ends).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import itertools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import cast

from candela_mitm.enforcement.procnet import LISTEN, Address, TcpSocket

NETLINK_SOCK_DIAG = 4  # include/uapi/linux/netlink.h (Python 3.11's socket module lacks it)
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_COND = 7
CLONE_NEWNET = 0x40000000
TCP_TIME_WAIT, TCP_NEW_SYN_RECV = 6, 12
# every state but those of sockets no process holds (inode 0)
STATES = 0xFFFF & ~(1 << TCP_TIME_WAIT) & ~(1 << TCP_NEW_SYN_RECV)

Remote = tuple[Address, int]  # the other end of a connection, IPv4-mapped addresses as IPv4

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
# struct inet_diag_msg (72 bytes): family, state, (timer, retrans), its id's ports and addresses
# (then interface and cookie), and at 64 (after expires, rqueue, wqueue) uid and inode
_MSG = struct.Struct("=BB2x2s2s16s16s")
_OWNER = struct.Struct("=II")
_MSG_SIZE, _OWNER_AT = 72, 64


def _plain(a: Address) -> Address:
    return getattr(a, "ipv4_mapped", None) or a


def _sockid(local: Address, port: int, remote: Address, rport: int) -> bytes:
    """struct inet_diag_sockid: ports and addresses in network order (an IPv4 address in the
    first of four words), any interface, no cookie."""
    return (
        struct.pack("!HH", port, rport)
        + local.packed.ljust(16, b"\0")
        + remote.packed.ljust(16, b"\0")
        + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # INET_DIAG_NOCOOKIE
    )


def _message(family: int, flags: int, seq: int, sockid: bytes, attrs: bytes = b"") -> bytes:
    # struct inet_diag_req_v2, then its attributes
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, STATES) + sockid + attrs
    header = _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0)
    return header + body


def _exact_request(local: Address, port: int, remote: Address, rport: int, seq: int) -> bytes:
    """The one socket with this 4-tuple, by the kernel's own hash lookup (inet_diag's
    find_one): a few microseconds whatever the number of sockets. An IPv4 request finds a
    dual-stack socket's v4-mapped connection too."""
    family = socket.AF_INET if local.version == 4 else socket.AF_INET6
    return _message(family, NLM_F_REQUEST, seq, _sockid(local, port, remote, rport))


def _dump_request(family: int, address: Address, port: int, seq: int) -> bytes:
    """A dump of `family`'s TCP sockets whose local end is address:port: for when the other
    end is not known. The kernel walks its whole connection hash table for it (~3 ms a family
    on the bench machine), so the exact request comes first when it can."""
    raw = address.packed
    cond_family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    # struct inet_diag_hostcond: family, prefix_len, (pad), int port, then the address; the
    # kernel also matches an IPv4 condition against an AF_INET6 socket's v4-mapped address
    cond = struct.pack("=BBxxi", cond_family, len(raw) * 8, port) + raw
    size = 4 + len(cond)
    # struct inet_diag_bc_op: yes jumps to the end (accept), no jumps past it (reject)
    bytecode = struct.pack("=BBH", INET_DIAG_BC_S_COND, size, size + 4) + cond
    attr = struct.pack("=HH", 4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    # the id's source port set too: the kernel skips other ports' sockets before the bytecode
    sockid = struct.pack("!HH", port, 0) + bytes(32) + struct.pack("=III", 0, *(0xFFFFFFFF,) * 2)
    return _message(family, NLM_F_REQUEST | NLM_F_DUMP, seq, sockid, attr)


def _address(family: int, raw: bytes) -> Address:
    return ipaddress.ip_address(raw[:4] if family == socket.AF_INET else raw)


def _rows(sock: socket.socket, seq: int, single: bool = False) -> Iterator[TcpSocket]:
    """The answer's rows, until its NLMSG_DONE (a dump's) or its one message (`single`: an
    exact request's); OSError for the kernel's NLMSG_ERROR."""
    while True:
        data = sock.recv(65536)
        if not data:
            raise OSError("sock_diag: the kernel closed the answer")
        off = 0
        while off + _HEADER.size <= len(data):
            length, kind, _flags, got_seq, _pid = _HEADER.unpack_from(data, off)
            if length < _HEADER.size:
                raise OSError("sock_diag: a malformed answer")
            at = off + _HEADER.size
            if got_seq == seq:
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, at)
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                if kind == SOCK_DIAG_BY_FAMILY and length >= _HEADER.size + _MSG_SIZE:
                    family, state, sport, dport, src, dst = _MSG.unpack_from(data, at)
                    uid, inode = _OWNER.unpack_from(data, at + _OWNER_AT)
                    yield TcpSocket(
                        _address(family, src),
                        int.from_bytes(sport, "big"),
                        _address(family, dst),
                        int.from_bytes(dport, "big"),
                        state,
                        inode,
                        uid,
                    )
                    if single:
                        return
            off += (length + 3) & ~3


@functools.cache
def _libc_setns() -> Callable[[int, int], int]:
    fn = ctypes.CDLL(None, use_errno=True).setns  # os.setns arrives with Python 3.12
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int], int], fn)


def _netlink() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )


class NamespaceChanged(OSError):
    """The /proc/<pid>/ns/net named is no longer the namespace asked for: that pid is gone and
    its number was given to another process. Nothing of that namespace may answer."""


def netlink_in(netns: str, inode: int | None = None) -> socket.socket:
    """A sock_diag socket of the network namespace `netns` names (its /proc/<pid>/ns/net);
    NamespaceChanged if that is no longer the namespace with `inode`, OSError if it cannot be
    entered (setns needs CAP_SYS_ADMIN)."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if inode is not None and os.fstat(fd).st_ino != inode:
            raise NamespaceChanged(f"{netns} is no longer the namespace {inode}")
        out: list[socket.socket | BaseException] = []

        def enter() -> None:  # this thread only: it ends in that namespace
            try:
                if _libc_setns()(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
                out.append(_netlink())
            except BaseException as e:  # handed to the caller's thread
                out.append(e)

        t = threading.Thread(target=enter, name="candela-sockdiag-setns", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if not out:
        raise OSError("setns: the thread gave no answer")
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


_seq = itertools.count(1)  # next() is atomic under the GIL: threads never share a number


def _next_seq() -> int:
    return next(_seq) & 0x7FFFFFFF or 1


def _exact(sock: socket.socket, local: Address, port: int, remote: Remote) -> TcpSocket | None:
    """The connected socket with this 4-tuple (a listener the kernel falls back to, or any
    other row, is not it)."""
    if remote[0].version != local.version:
        return None
    seq = _next_seq()
    sock.sendto(_exact_request(local, port, remote[0], remote[1], seq), (0, 0))
    try:
        rows = list(_rows(sock, seq, single=True))
    except OSError as e:
        if e.errno == errno.ENOENT:  # no such connection
            return None
        raise
    return next((s for s in rows if _is_connection(s, local, port, remote)), None)


def _is_connection(s: TcpSocket, local: Address, port: int, remote: Remote) -> bool:
    return (
        s.inode != 0
        and s.state != LISTEN
        and (s.local_port, s.remote_port) == (port, remote[1])
        and (_plain(s.local), _plain(s.remote)) == (local, remote[0])
    )


def find(
    address: str,
    port: int,
    remote: tuple[str, int] | None = None,
    netns: str | None = None,
    netns_inode: int | None = None,
) -> TcpSocket | None:
    """The TCP socket a process holds (TIME_WAIT and half-open ones left out) whose local end is
    address:port, a dual-stack socket's v4-mapped address matching its IPv4 form.

    `remote`: the other end (address, port) when it is known, as the kernel gave it (a
    transparent proxy's original destination): then only the socket of exactly that connection
    (the kernel's hash lookup, else a dump of the local end's sockets for one with that other
    end), never another socket that shares the local end (connect() shares an ephemeral port
    between connections to different destinations). Without it: the first socket bound to
    address:port, IPv4 table first then IPv6 (as /proc/net/tcp and tcp6 list them).

    In this process's network namespace, or the one `netns` names (and whose inode is
    `netns_inode`, when given). OSError when the kernel will not answer (no netlink, no
    inet_diag, a namespace not entered), NamespaceChanged (an OSError) when `netns` names
    another namespace than `netns_inode`'s.
    """
    want = _plain(ipaddress.ip_address(address))
    other: Remote | None = None
    if remote is not None:
        other = (_plain(ipaddress.ip_address(remote[0])), remote[1])
    families = (socket.AF_INET, socket.AF_INET6) if want.version == 4 else (socket.AF_INET6,)
    sock = netlink_in(netns, netns_inode) if netns is not None else _netlink()
    with sock:
        sock.settimeout(5.0)  # the kernel answers at once: this only bounds a broken answer
        if other is not None and (found := _exact(sock, want, port, other)) is not None:
            return found
        for family in families:
            seq = _next_seq()
            sock.sendto(_dump_request(family, want, port, seq), (0, 0))
            # read to the answer's end: the next request's answer follows on this socket
            held = [
                s
                for s in _rows(sock, seq)
                if s.inode and (other is None or _is_connection(s, want, port, other))
            ]
            if held:
                return held[0]
    return None
