"""The host's nat chain (CANDELA-ENFORCE): what host enforcement redirects to the proxy, written
as iptables-restore input and applied through the one iptables runner."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from candela_mitm.enforcement.iptables import Iptables

CHAIN = "CANDELA-ENFORCE"
REDIRECT_ALL_PORTS = (443,)  # every destination: TLS carries the name the listener decides by
REDIRECT_PROVIDER_PORTS = (80,)  # only to provider addresses: plain HTTP names no server up front


def restore_text(
    ipv4: Iterable[str], proxy_port: int, exempt_cgroup: str, scope: str | None = None
) -> str:
    """iptables-restore input that (re)defines the chain; with --noflush only it is replaced.

    `exempt_cgroup` and `scope` are cgroup paths relative to the v2 root (`-m cgroup --path`
    matches a socket's cgroup and its descendants); scope None or "/" enforces every process.
    """
    port = int(proxy_port)
    lines = [
        "*nat",
        f":{CHAIN} - [0:0]",
        f'-A {CHAIN} -m cgroup --path "{exempt_cgroup}" -j RETURN',
    ]
    if scope and scope != "/":
        lines.append(f'-A {CHAIN} -m cgroup ! --path "{scope}" -j RETURN')
    lines += [
        f"-A {CHAIN} -p tcp -m multiport --dports {','.join(map(str, REDIRECT_ALL_PORTS))} "
        f"-j REDIRECT --to-ports {port}"
    ]
    lines += [
        f"-A {CHAIN} -d {ip}/32 -p tcp -m multiport "
        f"--dports {','.join(map(str, REDIRECT_PROVIDER_PORTS))} -j REDIRECT --to-ports {port}"
        for ip in ipv4
    ]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass
class HostChain:
    """Candela's nat chain and the jump to it from OUTPUT, through the one iptables runner."""

    ipt: Iptables = field(default_factory=Iptables)

    def apply(self, text: str) -> None:
        p = self.ipt.restore(text)
        if p.returncode != 0:
            raise OSError(f"{self.ipt.binary}-restore failed: {p.stderr.strip()}")
        if not self.jumped() and not self.ipt.ok("nat", "-I", "OUTPUT", "1", "-j", CHAIN):
            raise OSError(f"cannot add the jump to {CHAIN} in nat OUTPUT")

    def rules(self) -> list[str] | None:
        """The chain's rules as `iptables -S` prints them; None if there is no chain."""
        p = self.ipt.table("nat", "-S", CHAIN)
        if p.returncode != 0:
            return None
        return [line for line in p.stdout.splitlines() if line.startswith("-A ")]

    def jumped(self) -> bool:
        return self.ipt.ok("nat", "-C", "OUTPUT", "-j", CHAIN)

    def remove(self) -> bool:
        """Drop every jump and the chain; True if anything was there."""
        found = False
        while self.ipt.ok("nat", "-D", "OUTPUT", "-j", CHAIN):
            found = True
        if self.ipt.ok("nat", "-F", CHAIN):
            found = True
            self.ipt.ok("nat", "-X", CHAIN)
        return found
