"""The kernel's TCP socket tables (/proc/net/tcp and tcp6): the one parser of their text.

Read rather than probed: connecting to a port to see whether something listens would reach the
proxy (and make a transparent listener log a failed redirect lookup).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
ESTABLISHED = 0x01  # TCP_ESTABLISHED in include/net/tcp_states.h
LISTEN = 0x0A  # TCP_LISTEN

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class TcpSocket:
    """One row of a TCP table."""

    local: Address
    local_port: int
    remote: Address
    remote_port: int
    state: int  # TCP_* state number (LISTEN is 0x0A)
    inode: int  # 0 for sockets in TIME_WAIT and others no process holds
    uid: int = -1  # the socket owner's effective uid, as the kernel recorded it


def _address(text: str) -> tuple[Address, int]:
    """`0100007F:20FB` -> (127.0.0.1, 8443). The kernel prints each 32-bit word of the
    (network-order) address as a host-order number, so the words are re-packed in host order."""
    hexaddr, _, hexport = text.rpartition(":")
    words = [int(hexaddr[i : i + 8], 16) for i in range(0, len(hexaddr), 8)]
    raw = struct.pack(f"={len(words)}I", *words)
    return ipaddress.ip_address(raw), int(hexport, 16)


def _row(line: str) -> TcpSocket | None:
    """One row of a table's text; None for the heading or a malformed row."""
    cols = line.split()
    if len(cols) < 10 or not cols[0].endswith(":"):
        return None  # the heading, or a truncated row
    try:
        local, lport = _address(cols[1])
        remote, rport = _address(cols[2])
        return TcpSocket(local, lport, remote, rport, int(cols[3], 16), int(cols[9]), int(cols[7]))
    except ValueError:
        return None


def parse(text: str) -> list[TcpSocket]:
    """The rows of a /proc/net/tcp or tcp6 text (its heading and malformed rows skipped)."""
    return [s for s in map(_row, text.splitlines()) if s is not None]


def rows_with_port(text: str, port: int) -> Iterator[TcpSocket]:
    """The rows of a table's text with `port` at either end, each parsed once; the others are
    never split or parsed (the kernel prints a port as `:%04X ` after its address, so a row is
    found by that text: a load generator's thousands of TIME_WAIT rows cost a search, not a
    parse each)."""
    needle = f":{port:04X} "
    at = text.find(needle)
    while at >= 0:
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        row = _row(text[start:end])
        if row is not None:
            yield row
        at = text.find(needle, end)


def listening_ports(text: str) -> set[int]:
    """Local ports in LISTEN state in a table's text."""
    return {s.local_port for s in parse(text) if s.state == LISTEN}


def read(tables: Iterable[str] = TABLES) -> Iterator[TcpSocket]:
    """The sockets of this network namespace's tables; a missing table (no IPv6) is skipped."""
    for name in tables:
        with suppress(OSError):
            yield from parse(Path(name).read_text())


def listening(port: int, tables: Iterable[str] = TABLES) -> bool:
    """Whether a TCP socket of this network namespace listens on the port (any address)."""
    return any(s.state == LISTEN and s.local_port == port for s in read(tables))


def find(
    text: str, address: str, port: int, remote: tuple[str, int] | None = None
) -> TcpSocket | None:
    """The first socket held by a process (inode not 0) bound locally to address:port in a
    table's text (IPv4-mapped addresses match their IPv4 form); with `remote`, only one
    connected to that other end (connect() shares a local port between connections to
    different destinations)."""
    want = _plain(ipaddress.ip_address(address))
    other = (_plain(ipaddress.ip_address(remote[0])), remote[1]) if remote is not None else None
    for s in rows_with_port(text, port):
        if s.local_port == port and s.inode and _plain(s.local) == want:
            if other is None or (s.state != LISTEN and (_plain(s.remote), s.remote_port) == other):
                return s
    return None


def socket_inode(text: str, address: str, port: int) -> int | None:
    """The inode of the socket bound locally to address:port in a table's text (IPv4-mapped
    addresses match their IPv4 form); None if no process holds one."""
    found = find(text, address, port)
    return found.inode if found is not None else None


def _plain(a: Address) -> Address:
    return getattr(a, "ipv4_mapped", None) or a
