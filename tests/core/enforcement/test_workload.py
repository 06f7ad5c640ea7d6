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
