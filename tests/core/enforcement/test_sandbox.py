"""The sandbox registry and the pure parts of `candela run` (the kernel side: tests/privileged)."""

import argparse
import os
import subprocess
import sys

import pytest

from candela_mitm.enforcement import sandbox
from candela_mitm.enforcement.sandbox import SandboxRecord, SandboxRegistry


def record(index: int, **kw) -> SandboxRecord:
    fields = {
        "index": index,
        "address": f"10.200.0.{4 * index + 2}",
        "user": "alice@example.com",
        "tenant": "research-team",
        "pid": os.getpid(),
        "pid_start": sandbox.process_start_time(os.getpid()),
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
        "import sys; from candela_mitm.enforcement.sandbox import SandboxRegistry, SandboxRecord\n"
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


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("api.openai.com:198.18.0.1", ("api.openai.com", "198.18.0.1")),
        ("API.OpenAI.com.:10.0.0.1", ("api.openai.com", "10.0.0.1")),
    ],
)
def test_add_host(value, parsed):
    assert sandbox.parse_add_host(value) == parsed


@pytest.mark.parametrize("value", ["api.openai.com", ":1.2.3.4", "x:fd00::1", "x:300.1.1.1"])
def test_add_host_refuses(value):
    with pytest.raises(argparse.ArgumentTypeError):
        sandbox.parse_add_host(value)


def test_provider_hosts_resolve_or_go_to_the_gateway():
    asked = []

    def resolve(names):
        asked.extend(names)
        return {"api.anthropic.com": "198.18.1.1"}

    entries = sandbox.sandbox_hosts(
        [("api.openai.com", "198.18.0.1"), ("other.example", "10.201.0.2")],
        ["api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com"],
        "10.200.0.1",
        resolve,
    )
    assert entries == [
        ("api.openai.com", "198.18.0.1"),  # --add-host wins, and is not looked up
        ("other.example", "10.201.0.2"),
        ("api.anthropic.com", "198.18.1.1"),
        ("generativelanguage.googleapis.com", "10.200.0.1"),
    ]
    assert asked == ["api.anthropic.com", "generativelanguage.googleapis.com"]


def test_the_hosts_file_lists_the_sandboxs_names_before_the_hosts(tmp_path):
    system = tmp_path / "hosts"
    system.write_text("127.0.0.1 localhost\n192.0.2.9 api.openai.com\n")
    text = sandbox.hosts_file([("api.openai.com", "198.18.0.1")], str(system))
    assert text.index("198.18.0.1\tapi.openai.com") < text.index("192.0.2.9 api.openai.com")


def test_resolution_gives_up_on_time():
    assert sandbox.resolve_ipv4([]) == {}
    assert sandbox.resolve_ipv4(["name.invalid"], timeout=2.0) == {}


@pytest.mark.parametrize("argv", [[], ["--user", "u"], ["--"]])
def test_run_needs_a_command(argv):
    with pytest.raises(SystemExit) as e:
        sandbox.main(argv)
    assert e.value.code == 2
