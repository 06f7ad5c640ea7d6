"""Workload identity from the kernel: this test's own process plays the peer."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from candela_mitm.enforcement import workload


def test_the_peer_of_a_loopback_connection_is_this_process_with_its_exe_and_hash():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        address, port = client.getsockname()
        w = workload.peer(address, port)
        assert w is not None and w.pid == os.getpid()
        real = os.path.realpath(sys.executable)
        assert w.exe == real
        assert w.exe_sha256 == hashlib.sha256(Path(real).read_bytes()).hexdigest()
        assert w.uid == os.geteuid()
        assert w.comm == Path("/proc/self/comm").read_text().strip()
        assert w.cgroup == workload._cgroup(os.getpid())
        assert workload.peer(address, 1) is None  # no such socket
        assert workload.peer(address, port, []) is None  # an empty namespace holds nothing
        fields = w.fields()
        assert fields["workload_pid"] == os.getpid() and "workload_exe_sha256" in fields
    finally:
        client.close()
        listener.close()


def test_the_holder_is_found_among_the_given_processes_only():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        address, port = client.getsockname()
        other = subprocess.Popen(["sleep", "5"])
        try:
            assert workload.peer(address, port, [other.pid]) is None
            found = workload.peer(address, port, [other.pid, os.getpid()])
            assert found is not None and found.pid == os.getpid()
        finally:
            other.kill()
            other.wait()
    finally:
        client.close()
        listener.close()


def test_a_binary_is_hashed_by_what_runs_not_by_its_name(tmp_path):
    """A copy at another path has the same hash; a different binary at the same name does not."""
    copy = tmp_path / "sleep"
    copy.write_bytes(Path("/bin/sleep").read_bytes())
    copy.chmod(0o755)
    p = subprocess.Popen([str(copy), "5"])
    try:
        w = workload.describe(p.pid)
        assert w.exe == str(copy)
        assert w.exe_sha256 == hashlib.sha256(Path("/bin/sleep").read_bytes()).hexdigest()
    finally:
        p.kill()
        p.wait()
    true = subprocess.Popen(["/bin/true"])
    true.wait()
    assert workload.exe_sha256(true.pid) is None  # gone: nothing to hash


@pytest.mark.parametrize(
    "cgroup, cid",
    [
        ("/system.slice/docker-" + "a" * 64 + ".scope", "a" * 64),
        ("/docker/" + "b" * 64, "b" * 64),
        (
            "/kubepods.slice/kubepods-burstable.slice/cri-containerd-" + "c" * 64 + ".scope",
            "c" * 64,
        ),
        ("/machine.slice/libpod-" + "d" * 64 + ".scope/container", "d" * 64),
        ("/user.slice/user-0.slice/session-1.scope", None),
        ("/candela/sandbox-3", None),
        (None, None),
    ],
)
def test_container_ids_are_read_from_the_cgroup_path(cgroup, cid):
    assert workload.container_id(cgroup) == cid


def _w(exe="/usr/bin/agent", sha="a" * 64):
    return workload.Workload(1, "agent", exe, sha, 0, "/", None)


@pytest.mark.parametrize(
    "rules, w, index",
    [
        ([{"exe": "/usr/bin/agent"}], _w(), 0),
        ([{"sha256": "a" * 64}], _w(exe="/tmp/renamed"), 0),  # the same binary anywhere
        ([{"sha256": "b" * 64}], _w(), None),  # another binary at the tool's path
        ([{"exe": "/usr/bin/agent", "sha256": "b" * 64}], _w(), None),  # both must hold
        ([{"exe": "/usr/bin/other"}, {"sha256": "a" * 64, "user": "u"}], _w(), 1),
        ([{"sha256": "a" * 64}], _w(sha=None), None),  # unhashable: matches no hash
        ([], _w(), None),
    ],
)
def test_a_rule_matches_the_executable_the_kernel_names(rules, w, index):
    from candela_mitm.config import WorkloadRule

    assert workload.matching_rule([WorkloadRule(**r) for r in rules], w) == index


def test_a_workload_rule_names_its_binary():
    from candela_mitm.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"governance.workloads.0.*exe, sha256"):
        parse_config({"governance": {"workloads": [{"user": "u"}]}})
    with pytest.raises(ConfigError, match=r"governance.workloads.0.sha256"):
        parse_config({"governance": {"workloads": [{"sha256": "nothex"}]}})


# -- the lookup's cost: the kernel's one row, the holder's fd table -------------------------------



@pytest.fixture
def fresh(monkeypatch):
    """No socket seen yet, no uid's last holder known."""
    monkeypatch.setattr(workload, "_seen", {})
    monkeypatch.setattr(workload, "_last", {})
    monkeypatch.setattr(workload, "_member", {})


@pytest.fixture
def counts(monkeypatch) -> dict[str, int]:
    """What a lookup reads: /proc table rows parsed, rows the kernel answered with, fd links."""
    from candela_mitm.enforcement import procnet, sockdiag

    seen = {"rows_parsed": 0, "kernel_rows": 0, "readlinks": 0}
    row, rows, readlink = procnet._row, sockdiag._rows, os.readlink

    def spy_row(line):
        seen["rows_parsed"] += 1
        return row(line)

    def spy_rows(*a, **kw):
        for r in rows(*a, **kw):
            seen["kernel_rows"] += 1
            yield r

    def spy_readlink(path, *a, **kw):
        seen["readlinks"] += 1
        return readlink(path, *a, **kw)

    monkeypatch.setattr(procnet, "_row", spy_row)
    monkeypatch.setattr(sockdiag, "_rows", spy_rows)
    monkeypatch.setattr(os, "readlink", spy_readlink)
    return seen


def _own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_socket_found_is_this_process_connection_by_its_4_tuple(fresh):
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        address, port = client.getsockname()
        row = workload.find_socket(address, port, remote=listener.getsockname())
        assert row is not None
        assert (row.inode, row.uid) == (os.fstat(client.fileno()).st_ino, os.geteuid())
        w = workload.peer(address, port, remote=listener.getsockname())
        assert w is not None and (w.pid, w.uid) == (os.getpid(), os.geteuid())
    finally:
        client.close()
        listener.close()


@pytest.mark.parametrize("remote_known", [True, False])
def test_a_lookup_reads_the_same_with_2000_other_sockets(fresh, counts, many_sockets, remote_known):
    """No /proc table row parsed and one kernel row whatever the machine holds; the holder
    found in the fd table of the process that held this uid's last socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    warm = socket.create_connection(listener.getsockname())
    client = socket.create_connection(listener.getsockname())
    try:
        server = listener.getsockname()
        # learns that this uid's sockets are here
        first = workload.peer(*warm.getsockname(), remote=server)
        assert first is not None and first.pid == os.getpid()
        for k in counts:
            counts[k] = 0
        third = socket.create_connection(server)  # opened after: never seen
        with third:
            w = workload.peer(*third.getsockname(), remote=server if remote_known else None)
            assert w is not None and counts["rows_parsed"] == 0
            if remote_known:
                assert w.pid == os.getpid() and counts["kernel_rows"] == 1
                # this process's fd table, and the exe link describe() reads
                assert counts["readlinks"] <= _own_fds() + 1
            else:
                # by the local end only: connect() may have let a few other sockets share the
                # port (any of them can be the answer), never the 2,000
                assert 1 <= counts["kernel_rows"] <= 5
            # the client seen on the way is then one verified link (and the exe's); (by the
            # local end only, the answer may have been another process sharing the port, which
            # it then remembers as the uid's holder: this process is learnt again first)
            assert workload.peer(*warm.getsockname(), remote=server).pid == os.getpid()
            for k in counts:
                counts[k] = 0
            assert workload.peer(*client.getsockname(), remote=server).pid == os.getpid()
            assert counts["readlinks"] == 2 and counts["rows_parsed"] == 0
    finally:
        client.close()
        warm.close()
        listener.close()


def test_without_netlink_the_tables_are_read_but_only_rows_with_the_port_parsed(
    fresh, counts, many_sockets, monkeypatch
):
    from candela_mitm.enforcement import sockdiag

    def unavailable(*a, **kw):
        raise OSError(93, "Protocol not supported")

    monkeypatch.setattr(sockdiag, "find", unavailable)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        w = workload.peer(*client.getsockname(), remote=listener.getsockname())
        assert w is not None and w.pid == os.getpid() and w.uid == os.geteuid()
        # the client's row and the server end's (the port is its remote end); more only if
        # another namespace-mate happens to use that port number somewhere
        assert 1 <= counts["rows_parsed"] <= 6
        assert counts["kernel_rows"] == 0
    finally:
        client.close()
        listener.close()


def test_a_remembered_holder_is_trusted_only_once_its_link_is_read_again(fresh):
    """pids and fd numbers are reused: a remembered (pid, fd) that no longer names the socket,
    or a uid's last holder that does not hold it, is passed over."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    other = subprocess.Popen(["sleep", "30"])
    try:
        address, port = client.getsockname()
        ino = os.fstat(client.fileno()).st_ino
        workload._seen[ino] = (other.pid, "0")  # its stdin, not this socket
        workload._last[os.geteuid()] = other.pid
        w = workload.peer(address, port)
        assert w is not None and w.pid == os.getpid()
        assert workload._seen[ino] == (os.getpid(), str(client.fileno()))
        assert workload._last[os.geteuid()] == os.getpid()
        # a sandbox's members only: a remembered holder outside them is not asked
        assert workload.peer(address, port, [other.pid]) is None
    finally:
        other.kill()
        other.wait()
        client.close()
        listener.close()


def test_a_namespace_whose_pid_moved_on_answers_nothing(fresh, monkeypatch):
    """The sandbox's namespace named by a pid that now runs elsewhere: no row, and no table of
    that other namespace read instead."""
    read: list[int | None] = []
    monkeypatch.setattr(workload, "_tables", lambda pid: read.append(pid) or "")
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        here = os.stat("/proc/self/ns/net").st_ino
        address, port = client.getsockname()
        assert workload.peer(address, port, [os.getpid()], netns_inode=here + 1) is None
        assert read == []
    finally:
        client.close()
        listener.close()


def test_the_owner_of_a_loopback_connection_is_read_by_its_4_tuple(fresh, monkeypatch):
    """LocalGuard's question: who owns the client end of a connection to us (the kernel's
    record, netlink or else the tables); a connection that is not there has no owner."""
    from candela_mitm.enforcement import sockdiag

    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                host, port = client.getsockname()
                ours = server.getsockname()
                assert workload.owner_uid(host, port, ours) == os.geteuid()
                assert workload.owner_uid(host, port, (ours[0], ours[1] + 1)) is None
                assert workload.owner_uid(host, 1, ours) is None

                def unavailable(*a, **kw):
                    raise OSError(93, "Protocol not supported")

                monkeypatch.setattr(sockdiag, "find", unavailable)
                assert workload.owner_uid(host, port, ours) == os.geteuid()
                assert workload.owner_uid(host, port, (ours[0], ours[1] + 1)) is None


def test_a_namespace_s_processes_are_listed_only_when_the_remembered_ones_do_not_answer(fresh):
    """A sandbox's connections: the first lists the namespace's processes (a scan of /proc);
    the next ones, from the same process, are asked of the member that answered and found held
    by the uid's last holder, both checked to be in the namespace: no listing."""
    here = os.stat("/proc/self/ns/net").st_ino  # this test's namespace plays the sandbox's
    listed: list[int] = []

    def members() -> list[int]:
        listed.append(1)
        return [os.getpid()]

    listener = socket.create_server(("127.0.0.1", 0))
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    try:
        for i, client in enumerate(clients):
            w = workload.peer_in_netns(
                *client.getsockname(), here, listener.getsockname(), members
            )
            assert w is not None and w.pid == os.getpid()
            assert len(listed) == 1, f"connection {i}: the namespace listed again"
    finally:
        for client in clients:
            client.close()
        listener.close()


def test_a_remembered_process_that_left_the_namespace_is_not_taken(fresh, monkeypatch):
    """The remembered member and holder are checked against the namespace each time: one that
    is no longer in it (here: every process but a listed one is said to have left) sends the
    lookup back to the namespace's processes, and a holder outside them is never named."""
    here = os.stat("/proc/self/ns/net").st_ino
    listener = socket.create_server(("127.0.0.1", 0))
    first = socket.create_connection(listener.getsockname())
    second = socket.create_connection(listener.getsockname())
    other = subprocess.Popen(["sleep", "30"])
    try:
        w = workload.peer_in_netns(
            *first.getsockname(), here, listener.getsockname(), lambda: [os.getpid()]
        )
        assert w is not None and w.pid == os.getpid()
        # this process "left": the remembered member and the uid's holder are both passed over
        monkeypatch.setattr(workload, "in_netns", lambda pid, inode: False)
        listed: list[int] = []

        def members() -> list[int]:
            listed.append(1)
            return [other.pid]  # the namespace now holds another process only

        remote = listener.getsockname()
        assert workload.peer_in_netns(*second.getsockname(), here, remote, members) is None
        assert listed == [1]
    finally:
        other.kill()
        other.wait()
        first.close()
        second.close()
        listener.close()
