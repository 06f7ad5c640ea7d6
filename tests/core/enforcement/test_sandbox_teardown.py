"""enforcement/sandbox_teardown.py: the one teardown path, every piece in reverse order of creation
(the kernel side: tests/privileged/test_sandbox.py)."""

from pathlib import Path

import pytest

from candela_mitm.enforcement import sandbox_teardown as sandbox
from candela_mitm.enforcement.registry import SandboxRecord, SandboxRegistry


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
