"""Sandbox firewall: iptables rules in the host namespace that send a sandbox's web traffic to the
transparent listener and drop everything else it sends."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from candela_mitm.enforcement.iptables import Iptables

log = logging.getLogger("candela.firewall")

TAG_PREFIX = "candela-sandbox-"
REDIRECTED_PORTS = (80, 443)


class FirewallError(RuntimeError):
    """An iptables command failed; the message has its stderr."""


@dataclass(frozen=True)
class Rule:
    binary: str  # iptables | ip6tables
    table: str
    chain: str
    spec: tuple[str, ...]  # match and target, after the chain name


def tag(index: int) -> str:
    return f"{TAG_PREFIX}{index}"


def sandbox_rules(index: int, host_if: str, listen_port: int) -> list[Rule]:
    """The rules of one sandbox, in the order they are inserted (each at the top of its chain).

    Inserted at the top, later rules land above earlier ones: the DROP of everything from the
    veth goes in first so the ACCEPT of redirected connections ends up above it.
    """
    c = ("-m", "comment", "--comment", tag(index))
    ports = ",".join(str(p) for p in REDIRECTED_PORTS)
    return [
        Rule(
            "iptables",
            "nat",
            "PREROUTING",
            ("-i", host_if, "-p", "tcp", "-m", "multiport", "--dports", ports, *c)
            + ("-j", "REDIRECT", "--to-ports", str(listen_port)),
        ),
        Rule("iptables", "filter", "INPUT", ("-i", host_if, *c, "-j", "DROP")),
        Rule(
            "iptables",
            "filter",
            "INPUT",
            ("-i", host_if, "-p", "tcp", "--dport", str(listen_port))
            + ("-m", "conntrack", "--ctstate", "DNAT", *c, "-j", "ACCEPT"),
        ),
        Rule("iptables", "filter", "FORWARD", ("-i", host_if, *c, "-j", "DROP")),
        Rule("iptables", "filter", "FORWARD", ("-o", host_if, *c, "-j", "DROP")),
        Rule("ip6tables", "filter", "INPUT", ("-i", host_if, *c, "-j", "DROP")),
        Rule("ip6tables", "filter", "FORWARD", ("-i", host_if, *c, "-j", "DROP")),
    ]


def add(rules: Sequence[Rule]) -> None:
    """Insert the rules; if one fails, the ones already inserted are deleted again."""
    done: list[Rule] = []
    try:
        for r in rules:
            p = Iptables(r.binary).table(r.table, "-I", r.chain, "1", *r.spec)
            if p.returncode != 0:
                raise FirewallError(f"{r.binary} -t {r.table} -I {r.chain}: {p.stderr.strip()}")
            done.append(r)
    except BaseException:
        delete(done)
        raise


def delete(rules: Sequence[Rule]) -> None:
    """Delete rules; ones already gone are fine."""
    for r in reversed(rules):
        p = Iptables(r.binary).table(r.table, "-D", r.chain, *r.spec)
        if p.returncode != 0:
            log.debug("%s -D %s: %s", r.binary, r.chain, p.stderr.strip())


def tagged_rules(binary: str = "iptables") -> list[tuple[int, Rule]]:
    """Every rule a sandbox left in the host's tables, with the index of that sandbox."""
    p = Iptables(binary).save()
    if p is None:
        return []
    if p.returncode != 0:
        raise FirewallError(f"{binary}-save: {p.stderr.strip()}")
    found: list[tuple[int, Rule]] = []
    table = ""
    for line in p.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line.startswith("-A ") or TAG_PREFIX not in line:
            continue
        words = shlex.split(line)
        chain, spec = words[1], tuple(words[2:])
        try:
            i = spec.index("--comment")
            index = int(spec[i + 1][len(TAG_PREFIX) :])
        except (ValueError, IndexError):
            continue
        found.append((index, Rule(binary, table, chain, spec)))
    return found


def delete_tagged(indexes: set[int] | None = None) -> int:
    """Delete the rules left by the given sandboxes (all if None); how many were deleted."""
    n = 0
    for binary in ("iptables", "ip6tables"):
        rules = [r for i, r in tagged_rules(binary) if indexes is None or i in indexes]
        delete(rules)
        n += len(rules)
    return n
