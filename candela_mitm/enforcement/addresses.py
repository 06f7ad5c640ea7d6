"""Provider addresses for host enforcement: the names resolved ahead (defaults, config, flags),
from a hosts(5) file or the system resolver, split by address family."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

# The providers' public API hosts that can be resolved ahead (providers.py base URLs, OpenAI's
# data-residency hosts, the regional Vertex and Bedrock endpoints of the default regions); the
# families (interception.py DEFAULT_HOSTS) are what the proxy intercepts by SNI. Config
# interception.hosts (its names, not its patterns) and --provider add more.
DEFAULT_PROVIDER_HOSTS = (
    "api.openai.com",
    *(f"{region}.api.openai.com" for region in ("us", "eu", "au", "in", "jp", "ae")),
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "us-east5-aiplatform.googleapis.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "bedrock-runtime-fips.us-east-1.amazonaws.com",
    "bedrock-mantle.us-east-1.api.aws",
)

Resolver = Callable[[str], list[str]]


def parse_hosts(text: str) -> dict[str, list[str]]:
    """A hosts(5) file as {name: [addresses]} (names lowercased, order kept)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            addrs = out.setdefault(name.lower().rstrip("."), [])
            if ip not in addrs:
                addrs.append(ip)
    return out


def system_resolver(name: str) -> list[str]:
    """Addresses from the system resolver (DNS and /etc/hosts); [] when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    seen: list[str] = []
    for info in infos:
        ip = str(info[4][0]).split("%", 1)[0]
        if ip not in seen:
            seen.append(ip)
    return seen


def provider_names(
    interception_hosts: Iterable[str], extra: Iterable[str], *, defaults: bool = True
) -> list[str]:
    names = list(DEFAULT_PROVIDER_HOSTS) if defaults else []
    for n in [*interception_hosts, *extra]:
        n = n.lower().rstrip(".")
        if n and "*" not in n and n not in names:  # a family has no addresses to resolve
            names.append(n)
    return names


def resolve_providers(
    names: Iterable[str],
    *,
    hosts: dict[str, list[str]] | None = None,
    resolver: Resolver = system_resolver,
) -> dict[str, list[str]]:
    """{name: [addresses]}; names in `hosts` take its entries, the rest go to the resolver."""
    return {n: list(hosts[n]) if hosts and n in hosts else resolver(n) for n in names}


def split_families(resolved: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    for addrs in resolved.values():
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if isinstance(ip, ipaddress.IPv4Address):
                v4.add(ip)
            else:
                v6.add(ip)
    return [str(a) for a in sorted(v4)], [str(a) for a in sorted(v6)]
