"""Workload identity across network namespaces: a sandbox's socket asked of its own namespace's
kernel tables (sock_diag from a thread that entered it), its holder among that namespace's
processes; the /proc tables of one of them when the namespace cannot be entered."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from candela_mitm.enforcement import registry, sockdiag, workload

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]

# the same loopback address as the host's, in a namespace of its own
CHILD = """
import os, socket, sys, time
listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
print(client.getsockname()[1], listener.getsockname()[1], os.fstat(client.fileno()).st_ino, flush=True)
time.sleep(60)  # killed by the test
"""


@pytest.fixture
def sandboxed() -> Iterator[tuple[subprocess.Popen[str], int, int, int]]:
    """(process, its client port, its listener port, its client socket's inode) in a new
    network namespace."""
    p = subprocess.Popen(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            f'ip link set lo up && exec "{sys.executable}" -c "$0"',
            CHILD,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline().split()
        assert len(line) == 3, f"the sandboxed process said {line!r}"
        port, lport, ino = map(int, line)
        yield p, port, lport, ino
    finally:
        p.kill()
        p.wait()


def _record(pid: int) -> registry.SandboxRecord:
    return registry.SandboxRecord(
        index=0,
        address="127.0.0.1",
        user="alice",
        tenant=None,
        pid=os.getpid(),
        pid_start=None,
        netns="test",
        host_if="none",
        netns_inode=os.stat(f"/proc/{pid}/ns/net").st_ino,
    )


@pytest.mark.parametrize("remote_known", [True, False])
def test_the_socket_is_asked_of_the_sandboxs_namespace(sandboxed, monkeypatch, remote_known):
    p, port, lport, ino = sandboxed
    rec = _record(p.pid)
    assert rec.netns_inode != os.stat("/proc/self/ns/net").st_ino
    read: list[int | None] = []
    tables = workload._tables
    monkeypatch.setattr(workload, "_tables", lambda pid: read.append(pid) or tables(pid))
    remote = ("127.0.0.1", lport) if remote_known else None
    row = workload.find_socket("127.0.0.1", port, p.pid, rec.netns_inode, remote)
    assert row is not None and row.inode == ino
    w = registry.peer_workload(rec, "127.0.0.1", port, remote)
    assert w is not None and w.pid == p.pid and w.exe == os.path.realpath(sys.executable)
    assert read == []  # the kernel answered: no table read
    # this namespace has no such connection (or another one, not the sandbox's)
    here = sockdiag.find("127.0.0.1", port, remote)
    assert here is None or here.inode != ino


def test_a_namespace_that_cannot_be_entered_is_read_from_its_tables(sandboxed, monkeypatch):
    p, port, lport, ino = sandboxed

    def refused(fd: int, kind: int) -> int:
        import ctypes

        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(sockdiag, "_libc_setns", lambda: refused)
    read: list[int | None] = []
    tables = workload._tables
    monkeypatch.setattr(workload, "_tables", lambda pid: read.append(pid) or tables(pid))
    w = registry.peer_workload(_record(p.pid), "127.0.0.1", port, ("127.0.0.1", lport))
    assert w is not None and w.pid == p.pid
    assert read == [p.pid]  # its namespace's tables, through /proc/<pid>/net
