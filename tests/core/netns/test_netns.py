"""Sandbox network naming and firewall rules, as values (the kernel side: tests/privileged)."""

import ipaddress

import pytest

from candela_mitm.netns import firewall
from candela_mitm.netns.network import MAX_SANDBOXES, SANDBOX_BLOCK, SandboxNet


@pytest.mark.parametrize(
    "index, host, inside",
    [
        (0, "10.200.0.1", "10.200.0.2"),
        (1, "10.200.0.5", "10.200.0.6"),
        (64, "10.200.1.1", "10.200.1.2"),
        (MAX_SANDBOXES - 1, "10.200.255.253", "10.200.255.254"),
    ],
)
def test_each_index_owns_a_slash_30(index, host, inside):
    net = SandboxNet(index)
    assert (net.host_address, net.sandbox_address) == (host, inside)
    assert net.subnet.prefixlen == 30 and net.subnet.subnet_of(SANDBOX_BLOCK)
    assert ipaddress.ip_address(host) in net.subnet and ipaddress.ip_address(inside) in net.subnet


@pytest.mark.parametrize("index", [-1, MAX_SANDBOXES])
def test_indexes_outside_the_block_are_refused(index):
    with pytest.raises(ValueError):
        SandboxNet(index)


def test_interface_names_fit_the_kernels_limit():
    net = SandboxNet(MAX_SANDBOXES - 1)
    assert len(net.host_if) <= 15 and len(net._peer_tmp) <= 15
    assert net.netns == f"candela-{MAX_SANDBOXES - 1}"


def test_rules_redirect_web_traffic_and_drop_the_rest():
    rules = firewall.sandbox_rules(3, "cdl3h", 8443)
    assert all(firewall.tag(3) in r.spec for r in rules)
    redirect = [r for r in rules if r.table == "nat"]
    assert len(redirect) == 1 and redirect[0].chain == "PREROUTING"
    assert redirect[0].spec[-4:] == ("-j", "REDIRECT", "--to-ports", "8443")
    assert "80,443" in redirect[0].spec
    inputs = [r for r in rules if r.binary == "iptables" and r.chain == "INPUT"]
    # each is inserted at the top: the ACCEPT of redirected connections ends up above the DROP
    assert [r.spec[-1] for r in inputs] == ["DROP", "ACCEPT"]
    assert "DNAT" in inputs[1].spec and "8443" in inputs[1].spec
    assert {(r.binary, r.chain) for r in rules if r.spec[-1] == "DROP"} == {
        ("iptables", "INPUT"),
        ("iptables", "FORWARD"),
        ("ip6tables", "INPUT"),
        ("ip6tables", "FORWARD"),
    }
