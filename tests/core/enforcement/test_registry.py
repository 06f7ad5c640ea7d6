"""The sandbox registry: claims, lookups by source address, owners (the kernel side: tests/privileged)."""

import os
import subprocess
import sys

import pytest

from candela_mitm.enforcement import registry
from candela_mitm.enforcement.registry import SandboxRecord, SandboxRegistry


def record(index: int, **kw) -> SandboxRecord:
    fields = {
        "index": index,
        "address": f"10.200.0.{4 * index + 2}",
        "user": "alice@example.com",
        "tenant": "research-team",
        "pid": os.getpid(),
        "pid_start": registry.process_start_time(os.getpid()),
        "netns": f"candela-{index}",
        "host_if": f"cdl{index}h",
        "started": 1.5,
    }
    return SandboxRecord(**{**fields, **kw})


def test_claims_take_the_lowest_free_index_once(tmp_path):
    reg = SandboxRegistry(tmp_path)
    a = reg.claim(record)
    b = reg.claim(record, in_use=lambda: {1, 2})
    assert (a.index, b.index) == (0, 3)
    reg.release(0)
    assert reg.claim(record).index == 0
    with pytest.raises(OSError):
        reg.claim(record, in_use=lambda: {1, 2}, limit=4)


def test_concurrent_claims_never_share_an_index(tmp_path):
    code = (
        "import sys; from candela_mitm.enforcement.registry import SandboxRegistry, SandboxRecord\n"
        "r = SandboxRegistry(sys.argv[1]).claim(lambda i: SandboxRecord(i, f'a{i}', 'u', None, 1,"
        " None, f'n{i}', f'h{i}'))\nprint(r.index)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
        for _ in range(6)
    ]
    indexes = sorted(int(p.communicate(timeout=30)[0]) for p in procs)
    assert indexes == list(range(6))


def test_lookup_by_source_address_sees_changes(tmp_path):
    reg = SandboxRegistry(tmp_path)
    proxy_view = SandboxRegistry(tmp_path)  # another process's reader
    assert proxy_view.lookup("10.200.0.2") is None
    reg.claim(record)
    found = proxy_view.lookup("10.200.0.2")
    assert found is not None and (found.user, found.tenant) == (
        "alice@example.com",
        "research-team",
    )
    assert proxy_view.lookup("::ffff:10.200.0.2") == found
    assert proxy_view.lookup("10.200.0.6") is None and proxy_view.lookup(None) is None
    reg.update(record(0, user="bob@example.com", hosts=(("api.openai.com", "198.18.0.1"),)))
    updated = proxy_view.lookup("10.200.0.2")
    assert updated is not None and updated.user == "bob@example.com"
    assert updated.hosts == (("api.openai.com", "198.18.0.1"),)
    reg.release(0)
    assert proxy_view.lookup("10.200.0.2") is None


def test_a_damaged_record_is_skipped(tmp_path):
    reg = SandboxRegistry(tmp_path)
    reg.claim(record)
    (reg.dir / "5.json").write_text("{not json")
    assert [r.index for r in SandboxRegistry(tmp_path).records()] == [0]


def test_records_read_back_whatever_newer_fields_they_carry():
    text = record(2).to_json().replace('"user":', '"future_field": 1, "user":')
    assert SandboxRecord.from_json(text) == record(2)


def test_an_owner_is_alive_only_as_the_same_process():
    assert record(0).owner_alive()
    assert not record(0, pid_start=1).owner_alive()  # the pid was reused by another process
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not record(0, pid=dead.pid, pid_start=None).owner_alive()


def test_peer_process_finds_who_holds_a_connection():
    """The proxy's view of a refused connection: which process of the sandbox's namespace made it
    (here this test's own namespace and process)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        address, port = client.getsockname()
        rec = record(0, netns_inode=os.stat("/proc/self/ns/net").st_ino)
        pid, comm = registry.peer_process(rec, address, port)
        assert pid == os.getpid() and comm == open("/proc/self/comm").read().strip()
        assert registry.peer_process(rec, address, 1) is None  # no such socket
        assert registry.peer_process(record(0), address, port) is None  # namespace unknown
    finally:
        client.close()
        listener.close()
