"""The one /proc/net/tcp parser: rows, listening ports, socket inodes, from tables of real text."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from candela_mitm.enforcement import procnet

HEAD = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
TCP = HEAD + (
    "   0: 0100007F:20FB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11 1\n"
    "   1: 0100007F:20FB 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 12 1\n"
    "   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13 1\n"
    "   3: 0200C80A:9C41 0100C80A:01BB 06 00000000:00000000 03:00001000 00000000     0        0 0 3\n"
    "   4: 0200C80A:9C42 0100C80A:01BB 01 00000000:00000000 00:00000000 00000000  1000        0 14 1\n"
)
TCP6 = HEAD + (
    "   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000     0        0 21 1\n"
    "   1: 0000000000000000FFFF00000200C80A:9C43 0000000000000000FFFF00000100C80A:01BB 01"
    " 00000000:00000000 00:00000000 00000000     0        0 22 1\n"
    "   2: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000     0        0 23 1\n"
)


def native(ip: str) -> str:
    """What the kernel prints for an IPv4 address on this machine (its byte order)."""
    return f"{int.from_bytes(socket.inet_aton(ip), 'little' if socket.htonl(1) != 1 else 'big'):08X}"


@pytest.mark.parametrize(
    "table, row, local, lport, remote, rport, state, inode",
    [
        (TCP, 0, "127.0.0.1", 8443, "0.0.0.0", 0, procnet.LISTEN, 11),
        (TCP, 1, "127.0.0.1", 8443, "127.0.0.1", 40000, 0x01, 12),
        (TCP, 3, "10.200.0.2", 40001, "10.200.0.1", 443, 0x06, 0),  # TIME_WAIT: no inode
        (TCP6, 0, "::", 8080, "::", 0, procnet.LISTEN, 21),
        (TCP6, 1, "::ffff:10.200.0.2", 40003, "::ffff:10.200.0.1", 443, 0x01, 22),
        (TCP6, 2, "::1", 22, "::", 0, procnet.LISTEN, 23),
    ],
)
def test_rows(table, row, local, lport, remote, rport, state, inode):
    if socket.htonl(1) == 1:
        pytest.skip("the tables above are as a little-endian kernel prints them")
    s = procnet.parse(table)[row]
    assert (s.local, s.local_port) == (ipaddress.ip_address(local), lport)
    assert (s.remote, s.remote_port) == (ipaddress.ip_address(remote), rport)
    assert (s.state, s.inode) == (state, inode)


@pytest.mark.parametrize(
    "text, ports",
    [
        (TCP, {0x20FB, 80}),
        (TCP6, {8080, 22}),
        (HEAD, set()),
        ("", set()),
        (HEAD + "   0: garbage\n   1: 0100007F:ZZZZ 00000000:0000 0A 0 0 0 0 0 1 1\n", set()),
    ],
    ids=["tcp", "tcp6", "heading-only", "empty", "malformed-rows"],
)
def test_listening_ports(text, ports):
    assert procnet.listening_ports(text) == ports


@pytest.mark.parametrize(
    "text, address, port, inode",
    [
        (TCP, "10.200.0.2", 40002, 14),
        (TCP, "10.200.0.2", 40001, None),  # TIME_WAIT: no process holds it
        (TCP, "10.200.0.2", 40009, None),
        (TCP, "127.0.0.1", 8443, 11),  # the listener comes first
        (TCP6, "10.200.0.2", 40003, 22),  # a dual-stack socket, by its IPv4 form
        (TCP6, "::ffff:10.200.0.2", 40003, 22),
    ],
)
def test_socket_inode(text, address, port, inode):
    if socket.htonl(1) == 1:
        pytest.skip("the tables above are as a little-endian kernel prints them")
    assert procnet.socket_inode(text, address, port) == inode


def test_the_address_words_are_read_in_this_machines_byte_order():
    row = f"   0: {native('192.0.2.7')}:0050 00000000:0000 0A 0 0 0 0 0 5 1\n"
    [s] = procnet.parse(HEAD + row)
    assert str(s.local) == "192.0.2.7" and s.local_port == 80


def test_listening_reads_the_tables_and_skips_missing_ones(tmp_path: Path):
    (tmp_path / "tcp").write_text(TCP)
    tables = [str(tmp_path / "tcp"), str(tmp_path / "no-ipv6-here")]
    assert procnet.listening(0x20FB, tables)
    assert not procnet.listening(40000, tables)  # an established socket is not a listener


def test_a_real_listener_is_seen():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not procnet.listening(port)
        s.listen()
        assert procnet.listening(port)
        [found] = [x for x in procnet.read() if x.local_port == port]
        assert found.state == procnet.LISTEN and found.inode > 0


# The client end of a loopback connection 127.0.0.1:40000 -> 127.0.0.1:1234 owned by uid 1000,
# the server's end owned by 0, and another user's connection to another port.
LOOPBACK = HEAD + (
    "   0: 0100007F:04D2 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31 1\n"
    "   1: 0100007F:9C40 0100007F:04D2 01 00000000:00000000 00:00000000 00000000  1000        0 32 1\n"
    "   2: 0100007F:04D2 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 33 1\n"
    "   3: 0100007F:9C41 0100007F:0050 01 00000000:00000000 00:00000000 00000000  1001        0 34 1\n"
)


@pytest.mark.parametrize(
    "peer, peer_port, server_port, uid",
    [
        ("127.0.0.1", 40000, 1234, 1000),  # the client's own row, not the server's
        ("::ffff:127.0.0.1", 40000, 1234, 1000),  # as a dual-stack listener names the peer
        ("127.0.0.1", 40001, 80, 1001),
        ("127.0.0.1", 40001, 1234, None),  # that port talks to another server
        ("127.0.0.2", 40000, 1234, None),
    ],
)
def test_the_client_end_of_a_loopback_connection_is_found_with_its_owner(
    peer, peer_port, server_port, uid
):
    if socket.htonl(1) == 1:
        pytest.skip("the tables above are as a little-endian kernel prints them")
    found = procnet.find(LOOPBACK, peer, peer_port, ("127.0.0.1", server_port))
    assert (found.uid if found else None) == uid


def test_parse_reads_the_owner_uid():
    assert [s.uid for s in procnet.parse(TCP)] == [0, 0, 0, 0, 1000]


@pytest.mark.parametrize(
    "text, port, inodes",
    [
        (TCP, 0x20FB, [11, 12]),  # local ends
        (TCP, 0x9C40, [12]),  # a remote end
        (TCP, 0x01BB, [0, 14]),  # remote ends, one in TIME_WAIT
        (TCP, 0x1F90, []),  # only in the other table
        (TCP6, 0x1F90, [21]),
        (HEAD, 0x20FB, []),
        ("", 0x20FB, []),
        ("   0: 0100007F:20FB garbage\n", 0x20FB, []),  # malformed: skipped
        ("   0: 0100007F:20FB 0100007F:20FB 01 0 0 0 0 0 7 1", 0x20FB, [7]),  # both ends, once
    ],
)
def test_rows_with_port_are_the_rows_naming_it_at_either_end(text, port, inodes):
    if socket.htonl(1) == 1:
        pytest.skip("the tables above are as a little-endian kernel prints them")
    assert [s.inode for s in procnet.rows_with_port(text, port)] == inodes


def test_a_socket_is_found_parsing_only_the_rows_with_its_port(monkeypatch):
    """Thousands of other rows (a load generator's TIME_WAIT) are searched, never parsed."""
    others = "".join(
        f"{i:4d}: 0200C80A:{40000 + i:04X} 0100C80A:0050 06 0 0 0 0 0 0 3\n" for i in range(5000)
    )
    parsed: list[str] = []
    real = procnet._row

    def spy(line: str) -> procnet.TcpSocket | None:
        parsed.append(line)
        return real(line)

    monkeypatch.setattr(procnet, "_row", spy)
    table = HEAD + others + TCP.split("\n", 1)[1]
    assert procnet.find(table, "10.200.0.2", 40100) is None  # in TIME_WAIT: no inode
    assert len(parsed) == 1
    if socket.htonl(1) != 1:
        # 40002: one of the 5000 in TIME_WAIT, and an established row of TCP's
        assert procnet.find(table, "10.200.0.2", 40002).inode == 14
        assert procnet.find(table, "10.200.0.2", 40002, ("10.200.0.1", 443)).uid == 1000
        assert len(parsed) == 1 + 2 + 2


# connect() shares an ephemeral port between connections to different destinations: two
# sockets with the local end 127.0.0.1:40000, to :1234 and to :80 (and a listener on :40000's
# neighbour, 40001, to show a listener is never a connection)
SHARED = HEAD + (
    "   0: 0100007F:9C40 0100007F:0050 01 00000000:00000000 00:00000000 00000000  1001        0 41 1\n"
    "   1: 0100007F:9C40 0100007F:04D2 01 00000000:00000000 00:00000000 00000000  1000        0 42 1\n"
    "   2: 0100007F:9C41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 43 1\n"
)


@pytest.mark.parametrize(
    "address, port, remote, inode",
    [
        ("127.0.0.1", 40000, None, 41),  # by the local end only: the first
        ("127.0.0.1", 40000, ("127.0.0.1", 1234), 42),  # that connection, not the first
        ("::ffff:127.0.0.1", 40000, ("::ffff:127.0.0.1", 80), 41),
        ("127.0.0.1", 40000, ("127.0.0.1", 443), None),  # not there: no other socket instead
        ("127.0.0.1", 40001, None, 43),
        ("127.0.0.1", 40001, ("0.0.0.0", 0), None),  # a listener is no connection
    ],
)
def test_find_takes_the_connection_to_its_other_end(address, port, remote, inode):
    if socket.htonl(1) == 1:
        pytest.skip("the tables above are as a little-endian kernel prints them")
    found = procnet.find(SHARED, address, port, remote)
    assert (found.inode if found else None) == inode
