"""What `candela run` builds that needs no kernel: the sandbox's names, and the one teardown path
(the kernel side: tests/privileged/test_sandbox.py)."""

from pathlib import Path

import pytest

from candela_mitm.enforcement import sandbox
from candela_mitm.enforcement.registry import SandboxRecord, SandboxRegistry


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


class Pieces:
    """The kernel-side removers teardown calls, recorded instead of run; `broken` ones raise."""

    def __init__(self, monkeypatch, tmp_path: Path, broken: set[str]):
        from candela_mitm.enforcement import cgroups
        from candela_mitm.netns import firewall, network

        self.calls: list[str] = []
        self.broken = broken

        def step(name):
            def call(*args, **kw):
                self.calls.append(name)
                if name in broken:
                    raise OSError(f"{name} is stuck")

            return call

        monkeypatch.setattr(sandbox, "_kill_members", step("processes"))
        monkeypatch.setattr(sandbox, "_unregister_netns", step("host guard"))
        monkeypatch.setattr(firewall, "delete_tagged", step("firewall"))
        monkeypatch.setattr(network, "remove", step("network"))
        monkeypatch.setattr(cgroups, "resolve", lambda name: tmp_path / "cg" / name)
        monkeypatch.setattr(cgroups, "remove", step("cgroup"))


@pytest.mark.parametrize(
    "live, broken, order",
    [
        (False, set(), ["processes", "firewall", "network", "cgroup"]),
        (True, set(), ["processes", "guard", "firewall", "host guard", "network", "cgroup"]),
        (True, {"processes", "guard", "network"},
         ["processes", "guard", "firewall", "host guard", "network", "cgroup"]),
        (False, {"firewall", "cgroup"}, ["processes", "firewall", "network", "cgroup"]),
    ],
    ids=["leftover", "live-run", "live-run-with-stuck-pieces", "leftover-with-stuck-pieces"],
)  # fmt: skip
def test_teardown_takes_every_piece_down_in_reverse_order(
    monkeypatch, tmp_path, live, broken, order
):
    """One path for a run that ends and for a leftover: each piece attempted even when another
    fails, the record released last (until then no run can claim the index)."""
    pieces = Pieces(monkeypatch, tmp_path, broken)
    reg = SandboxRegistry(tmp_path)
    rec = reg.claim(
        lambda i: SandboxRecord(i, "10.200.0.2", "u", None, 1, None, f"candela-{i}", f"cdl{i}h")
    )
    (reg.root / "etc" / rec.netns).mkdir(parents=True)
    (reg.root / "etc" / f"{rec.netns}-ca.pem").write_text("pem")

    def stop_guard():
        pieces.calls.append("guard")
        assert reg.get(rec.index) is not None  # the record outlives every kernel piece
        if "guard" in broken:
            raise RuntimeError("detach failed")

    sandbox.teardown(
        reg,
        rec.index,
        stop_guard=stop_guard if live else None,
        netns_cookie=4242 if live else None,
    )
    assert pieces.calls == order
    assert reg.get(rec.index) is None
    assert not (reg.root / "etc" / rec.netns).exists()
    assert not (reg.root / "etc" / f"{rec.netns}-ca.pem").exists()
