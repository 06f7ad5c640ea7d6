"""enforcement/host_chain.py: the host's nat chain, as iptables-restore input and applied."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from candela_mitm.enforcement.host_chain import CHAIN, HostChain, restore_text
from candela_mitm.enforcement.iptables import Iptables


def test_restore_text_redirects_all_https_and_plain_http_to_providers() -> None:
    assert restore_text(["10.0.0.1", "10.0.0.2"], 8443, "/candela-proxy") == (
        "*nat\n"
        f":{CHAIN} - [0:0]\n"
        f'-A {CHAIN} -m cgroup --path "/candela-proxy" -j RETURN\n'
        f"-A {CHAIN} -p tcp -m multiport --dports 443 -j REDIRECT --to-ports 8443\n"
        f"-A {CHAIN} -d 10.0.0.1/32 -p tcp -m multiport --dports 80 -j REDIRECT --to-ports 8443\n"
        f"-A {CHAIN} -d 10.0.0.2/32 -p tcp -m multiport --dports 80 -j REDIRECT --to-ports 8443\n"
        "COMMIT\n"
    )


@pytest.mark.parametrize("scope", [None, "/"])
def test_restore_text_without_a_scope_enforces_every_process(scope: str | None) -> None:
    assert "!" not in restore_text(["10.0.0.1"], 8443, "/candela-proxy", scope)


def test_restore_text_with_a_scope_leaves_other_processes_alone() -> None:
    lines = restore_text(["10.0.0.1"], 8443, "/candela-proxy", "/ci.slice/job-7").splitlines()
    # Candela first, then everything outside the scope: neither reaches a REDIRECT
    assert lines[2:4] == [
        f'-A {CHAIN} -m cgroup --path "/candela-proxy" -j RETURN',
        f'-A {CHAIN} -m cgroup ! --path "/ci.slice/job-7" -j RETURN',
    ]
    assert all("REDIRECT" in line for line in lines[4:-1])


class FakeIptables:
    """Records commands; `fail` holds argument tuples that exit non-zero (each once per entry)."""

    def __init__(self, fail: Sequence[tuple[str, ...]] = ()):
        self.calls: list[tuple[list[str], str | None]] = []
        self.fail = list(fail)

    def __call__(self, args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(args), stdin))
        key = tuple(args[4:]) if args[:4] == ["iptables", "-w", "-t", "nat"] else tuple(args)
        code = 0
        if key in self.fail:
            self.fail.remove(key)
            code = 1
        return subprocess.CompletedProcess(list(args), code, "", "boom" if code else "")


def test_apply_adds_the_jump_only_when_missing() -> None:
    run = FakeIptables(fail=[("-C", "OUTPUT", "-j", CHAIN)])
    HostChain(Iptables(runner=run)).apply("TEXT")
    assert [c[0] for c in run.calls] == [
        ["iptables-restore", "-w", "--noflush"],
        ["iptables", "-w", "-t", "nat", "-C", "OUTPUT", "-j", CHAIN],
        ["iptables", "-w", "-t", "nat", "-I", "OUTPUT", "1", "-j", CHAIN],
    ]
    assert run.calls[0][1] == "TEXT"
    run = FakeIptables()
    HostChain(Iptables(runner=run)).apply("TEXT")
    assert len(run.calls) == 2  # the jump was there already


def test_apply_failure_is_an_oserror() -> None:
    run = FakeIptables(fail=[("iptables-restore", "-w", "--noflush")])
    with pytest.raises(OSError, match="boom"):
        HostChain(Iptables(runner=run)).apply("TEXT")


def test_remove_drops_every_jump_then_the_chain() -> None:
    d = ("-D", "OUTPUT", "-j", CHAIN)

    class Jumps(FakeIptables):
        left = 2

        def __call__(
            self, args: Sequence[str], stdin: str | None
        ) -> subprocess.CompletedProcess[str]:
            if tuple(args[4:]) == d:
                self.calls.append((list(args), stdin))
                self.left -= 1
                return subprocess.CompletedProcess(list(args), 0 if self.left >= 0 else 1, "", "")
            return super().__call__(args, stdin)

    run = Jumps()
    assert HostChain(Iptables(runner=run)).remove()
    ops = [tuple(c[0][4:]) for c in run.calls]
    assert ops == [d, d, d, ("-F", CHAIN), ("-X", CHAIN)]
    assert not HostChain(Iptables(runner=FakeIptables(fail=[d, ("-F", CHAIN)]))).remove()


def test_rules_reads_the_chain() -> None:
    class Listing(FakeIptables):
        def __call__(
            self, args: Sequence[str], stdin: str | None
        ) -> subprocess.CompletedProcess[str]:
            out = f"-N {CHAIN}\n-A {CHAIN} -j RETURN\n"
            return subprocess.CompletedProcess(list(args), 0, out, "")

    assert HostChain(Iptables(runner=Listing())).rules() == [f"-A {CHAIN} -j RETURN"]
    assert HostChain(Iptables(runner=FakeIptables(fail=[("-S", CHAIN)]))).rules() is None


