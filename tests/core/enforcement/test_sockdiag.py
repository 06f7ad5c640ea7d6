"""One TCP socket asked of the kernel (sock_diag): real sockets of this test, real kernel answers."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from candela_mitm.enforcement import procnet, sockdiag


@contextmanager
def connection(family: int = socket.AF_INET) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(listener, client) of a loopback connection; a dual-stack client with AF_INET6."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket(family, socket.SOCK_STREAM)
    try:
        target = "::ffff:127.0.0.1" if family == socket.AF_INET6 else "127.0.0.1"
        client.connect((target, listener.getsockname()[1]))
        yield listener, client
    finally:
        client.close()
        listener.close()


def inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


@pytest.fixture
def requests(monkeypatch) -> list[str]:
    """Which requests the lookup sent the kernel, in order ("exact" or "dump")."""
    sent: list[str] = []
    exact, dump = sockdiag._exact_request, sockdiag._dump_request

    def spy_exact(*a):
        sent.append("exact")
        return exact(*a)

    def spy_dump(*a):
        sent.append("dump")
        return dump(*a)

    monkeypatch.setattr(sockdiag, "_exact_request", spy_exact)
    monkeypatch.setattr(sockdiag, "_dump_request", spy_dump)
    return sent


@pytest.fixture
def answered(monkeypatch) -> list[procnet.TcpSocket]:
    """Every row the kernel answered with (before the lookup drops any)."""
    rows: list[procnet.TcpSocket] = []
    real = sockdiag._rows

    def spy(*a, **kw):
        for r in real(*a, **kw):
            rows.append(r)
            yield r

    monkeypatch.setattr(sockdiag, "_rows", spy)
    return rows


def test_a_connection_is_found_by_its_local_end_with_its_uid_and_inode(requests):
    with connection() as (listener, client):
        address, port = client.getsockname()
        found = sockdiag.find(address, port)
        assert found is not None
        assert (found.inode, found.uid, found.state) == (inode(client), os.geteuid(), 0x01)
        assert (str(found.local), found.local_port) == (address, port)
        assert (str(found.remote), found.remote_port) == listener.getsockname()
        assert requests == ["dump"]  # found in the IPv4 table: IPv6's is not asked
        assert sockdiag.find(address, 1) is None  # nothing bound there


def test_with_its_other_end_the_kernel_finds_it_by_the_4_tuple(requests, answered):
    with connection() as (listener, client):
        address, port = client.getsockname()
        found = sockdiag.find(address, port, remote=listener.getsockname())
        assert found is not None and found.inode == inode(client)
        assert requests == ["exact"] and len(answered) == 1


def test_with_its_other_end_only_that_connection_is_taken(requests):
    """A connection that is not there (closed, or another destination) is not replaced by a
    socket that shares its local end: connect() shares ephemeral ports between destinations."""
    with connection() as (listener, client):
        address, port = client.getsockname()
        assert sockdiag.find(address, port, remote=("127.0.0.9", 5555)) is None
        # the dumps (IPv4's, then IPv6's for a dual-stack socket) only look for that other end
        assert requests == ["exact", "dump", "dump"]
        other_port = (listener.getsockname()[0], listener.getsockname()[1] + 1)
        assert sockdiag.find(address, port, remote=other_port) is None
        found = sockdiag.find(address, port, remote=listener.getsockname())
        assert found is not None and found.inode == inode(client)


def test_the_listener_the_kernels_exact_lookup_falls_back_to_is_not_the_connection():
    """inet_diag's exact lookup returns a listener on the local end when no connection has the
    4-tuple: that is not the connection asked for."""
    with connection() as (listener, _client):
        address, port = listener.getsockname()
        nl = sockdiag._netlink()
        with nl:
            want = ipaddress.ip_address(address)
            elsewhere = (ipaddress.ip_address("127.0.0.9"), 5555)
            assert sockdiag._exact(nl, want, port, elsewhere) is None
        found = sockdiag.find(address, port)  # by its local end: the listener, as /proc lists it
        assert found is not None and found.state == procnet.LISTEN
        assert found.inode == inode(listener)


@pytest.mark.parametrize("with_remote", [False, True])
def test_a_dual_stack_socket_is_found_by_its_ipv4_form(with_remote):
    with connection(socket.AF_INET6) as (listener, client):
        address, port = client.getsockname()[:2]
        assert address == "::ffff:127.0.0.1"
        remote = listener.getsockname() if with_remote else None
        for asked in ("127.0.0.1", address):
            found = sockdiag.find(asked, port, remote=remote)
            assert found is not None and found.inode == inode(client)


def test_a_socket_in_time_wait_is_held_by_no_process():
    with connection() as (listener, client):
        server, _ = listener.accept()
        address, port = client.getsockname()
        client.shutdown(socket.SHUT_RDWR)
        server.close()
        client.close()  # closed first by the client: its end waits in TIME_WAIT
        needle = f":{port:04X} "
        for _ in range(500):  # the kernel moves it on at once; this only bounds a surprise
            rows = [r for r in procnet.rows_with_port(Path("/proc/net/tcp").read_text(), port)]
            if any(r.local_port == port and r.state == 0x06 for r in rows):
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"no TIME_WAIT row with {needle!r}")
        assert sockdiag.find(address, port) is None


def test_many_other_sockets_change_nothing_the_lookup_reads(requests, answered, many_sockets):
    """2,000 sockets of another process (1,000 loopback connections, both ends): the kernel
    still answers with the one row asked for, by either request."""
    with connection() as (listener, client):
        address, port = client.getsockname()
        assert sockdiag.find(address, port, remote=listener.getsockname()) is not None
        assert [r.inode for r in answered] == [inode(client)]
        assert sockdiag.find(address, port) is not None
        # by its local end: ours, and at most a few others connect() let share the port
        assert inode(client) in [r.inode for r in answered[1:]]
        assert {(str(r.local), r.local_port) for r in answered} == {(address, port)}
        assert len(answered) <= 1 + 4
    assert requests == ["exact", "dump"]




def test_another_namespace_than_the_one_asked_for_answers_nothing():
    here = os.stat("/proc/self/ns/net").st_ino
    with connection() as (_listener, client):
        address, port = client.getsockname()
        with pytest.raises(sockdiag.NamespaceChanged):
            sockdiag.find(address, port, netns="/proc/self/ns/net", netns_inode=here + 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN")
def test_a_namespace_is_asked_from_inside_it():
    """Entering a namespace (here this process's own, by its /proc link) changes only the
    entering thread's: this thread's netlink sockets still answer for its own."""
    here = os.stat("/proc/self/ns/net").st_ino
    with connection() as (listener, client):
        address, port = client.getsockname()
        found = sockdiag.find(
            address, port, listener.getsockname(), f"/proc/{os.getpid()}/ns/net", here
        )
        assert found is not None and found.inode == inode(client)


def test_a_namespace_that_cannot_be_entered_is_an_error(monkeypatch):
    import errno

    def refused(fd: int, kind: int) -> int:
        import ctypes

        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(sockdiag, "_libc_setns", lambda: refused)
    with connection() as (_listener, client):
        address, port = client.getsockname()
        with pytest.raises(OSError) as e:
            sockdiag.find(address, port, netns="/proc/self/ns/net")
        assert e.value.errno == errno.EPERM
