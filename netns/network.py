"""Sandbox network: a network namespace joined to the host by one veth pair, IPv4 only."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("candela.netns")

# Sandboxes take /30s from this block: index i owns 10.200.(4i/256).(4i%256)/30, the host end
# being .1 and the sandbox end .2 of it.
SANDBOX_BLOCK = ipaddress.IPv4Network("10.200.0.0/16")
MAX_SANDBOXES = SANDBOX_BLOCK.num_addresses // 4
NS_PREFIX = "candela-"
IF_PREFIX = "cdl"
SANDBOX_IFNAME = "eth0"  # what the program inside sees


@dataclass(frozen=True)
class SandboxNet:
    """The names and addresses of one sandbox's network; everything derives from its index."""

    index: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_SANDBOXES:
            raise ValueError(f"sandbox index {self.index} is outside 0..{MAX_SANDBOXES - 1}")

    @property
    def netns(self) -> str:
        return f"{NS_PREFIX}{self.index}"

    @property
    def host_if(self) -> str:
        return f"{IF_PREFIX}{self.index}h"

    @property
    def _peer_tmp(self) -> str:
        # the sandbox end's name while it is still in the host namespace (IFNAMSIZ is 16)
        return f"{IF_PREFIX}{self.index}s"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        base = int(SANDBOX_BLOCK.network_address) + 4 * self.index
        return ipaddress.IPv4Network((base, 30))

    @property
    def host_address(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def sandbox_address(self) -> str:
        return str(self.subnet.network_address + 2)


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:  # a kernel without IPv6 has nothing to turn off
        log.debug("sysctl %s: %s", path, e)


def _disable_ipv6_inside(name: str) -> None:
    """IPv6 off in the namespace (no link-local either), so only the IPv4 path exists."""
    netns.pushns(name)
    try:
        for key in ("all", "default", SANDBOX_IFNAME, "lo"):
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6", "1")
    finally:
        netns.popns()


def create(net: SandboxNet) -> None:
    """Namespace, veth pair, addresses and default route; undone by `remove` if any step fails."""
    netns.create(net.netns)
    try:
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=net.host_if,
                kind="veth",
                peer={"ifname": net._peer_tmp, "net_ns_fd": net.netns},
            )
            (idx,) = ipr.link_lookup(ifname=net.host_if)
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{net.host_if}/disable_ipv6", "1")
            ipr.addr("add", index=idx, address=net.host_address, prefixlen=30)
            ipr.link("set", index=idx, state="up")
        with NetNS(net.netns) as ns:
            (peer,) = ns.link_lookup(ifname=net._peer_tmp)
            ns.link("set", index=peer, ifname=SANDBOX_IFNAME)
            (lo,) = ns.link_lookup(ifname="lo")
            ns.link("set", index=lo, state="up")
        _disable_ipv6_inside(net.netns)
        with NetNS(net.netns) as ns:
            ns.addr("add", index=peer, address=net.sandbox_address, prefixlen=30)
            ns.link("set", index=peer, state="up")
            ns.route("add", dst="default", gateway=net.host_address)
    except BaseException:
        remove(net)
        raise


def remove(net: SandboxNet) -> None:
    """Delete the veth pair and the namespace; whatever is already gone is fine."""
    with IPRoute() as ipr:
        for ifname in (net.host_if, net._peer_tmp):
            for idx in ipr.link_lookup(ifname=ifname):
                try:
                    ipr.link("del", index=idx)
                except NetlinkError as e:
                    if e.code != 19:  # ENODEV: the peer went first
                        raise
    if net.netns in netns.listnetns():
        netns.remove(net.netns)


def exists(net: SandboxNet) -> bool:
    return net.netns in netns.listnetns()


def sandbox_indexes_present() -> set[int]:
    """Indexes of Candela namespaces and host-side veths that exist now (for leftover cleanup)."""
    found: set[int] = set()
    for name in netns.listnetns():
        if name.startswith(NS_PREFIX) and name[len(NS_PREFIX) :].isdigit():
            found.add(int(name[len(NS_PREFIX) :]))
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get("ifname") or ""
            body = ifname[len(IF_PREFIX) : -1]
            if ifname.startswith(IF_PREFIX) and ifname[-1:] in ("h", "s") and body.isdigit():
                found.add(int(body))
    return found


def netns_path(net: SandboxNet) -> str:
    """The namespace's file (/var/run/netns/<name>), for setns and the kernel's netns cookie."""
    return os.path.join(netns.NETNS_RUN_DIR, net.netns)


def netns_inode(net: SandboxNet) -> int | None:
    """The namespace's inode: what /proc/<pid>/ns/net of a process inside it points at."""
    try:
        return os.stat(netns_path(net)).st_ino
    except OSError:
        return None
