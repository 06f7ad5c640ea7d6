"""Interception: which TLS server names (SNI) are provider hosts, and what an intercepted request may name."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from candela_mitm import errors
from candela_mitm.providers.specs import SPECS, Upstream

# Every provider's public hosts. `*` stands for one DNS label or part of one (never a dot), so
# `*-aiplatform.googleapis.com` is every Vertex region and nothing under another domain.
DEFAULT_HOSTS: dict[str, str] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic-direct",
    "generativelanguage.googleapis.com": "google",
    "aiplatform.googleapis.com": "anthropic-vertex",
    "*-aiplatform.googleapis.com": "anthropic-vertex",
    "bedrock-runtime.*.amazonaws.com": "anthropic-bedrock",
    "bedrock-runtime-fips.*.amazonaws.com": "anthropic-bedrock",
}

# One host serves two of Candela's routes: Gemini's own API and its OpenAI-compatible endpoint.
_PATH_ROUTES: dict[str, tuple[tuple[str, str], ...]] = {
    "google": (("/v1beta/openai/", "gemini-oai"),),
}

_LABEL = r"[a-z0-9-]+"


def normalize_host(value: str) -> str:
    """A Host header, :authority or SNI as a bare lower-case name: no port, no trailing dot."""
    host = value.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _pattern(name: str) -> re.Pattern[str]:
    parts = (re.escape(p) for p in normalize_host(name).split("*"))
    return re.compile(_LABEL.join(parts) + r"\Z")


@dataclass(frozen=True)
class Route:
    """Where an intercepted request goes: a provider route and the path it names there."""

    provider: str
    rest: str  # what /proxy/<provider> would be followed by: the path below the route's base


class HostMap:
    """SNI name -> provider route: the defaults, extended or overridden by `interception.hosts`."""

    def __init__(self, hosts: Mapping[str, str] | None = None, defaults: bool = True) -> None:
        merged = dict(DEFAULT_HOSTS) if defaults else {}
        merged.update({normalize_host(k): v for k, v in (hosts or {}).items()})
        for route in merged.values():
            if route not in SPECS:
                raise ValueError(f"unknown provider route {route!r}")
        self.exact = {k: v for k, v in merged.items() if "*" not in k}
        self.patterns = [(_pattern(k), v) for k, v in merged.items() if "*" in k]
        self.names = tuple(merged)

    def route_for(self, name: str | None) -> str | None:
        """The provider route of a server name; None: not a provider host (tunnel it)."""
        if not name:
            return None
        host = normalize_host(name)
        if host in self.exact:
            return self.exact[host]
        for rx, route in self.patterns:
            if rx.match(host):
                return route
        return None

    def exact_names(self) -> list[str]:
        """The names without wildcards: those a sandbox can resolve ahead of time."""
        return sorted(self.exact)


def _default_base_path(route: str) -> str:
    url = SPECS[route].default_base_url
    return urlsplit(url).path.rstrip("/") if url else ""


def request_route(provider: str, path: str) -> Route:
    """The route and rest of an intercepted request, whose path is the one the app sent to the
    provider's own host: the route's default base path (e.g. /v1beta/openai) is taken off, as the
    configured upstream joins its own."""
    for prefix, sub in _PATH_ROUTES.get(provider, ()):
        if path.startswith(prefix):
            provider = sub
            break
    base = _default_base_path(provider)
    rest = path
    if base and (path == base or path.startswith(base + "/") or path.startswith(base + "?")):
        rest = path[len(base) :]
    if not rest.startswith("/"):
        rest = "/" + rest
    return Route(provider, rest)


# A request head longer than this without its end is not one a passthrough decision waits for.
MAX_PLAINTEXT_HEAD = 16 * 1024


@dataclass(frozen=True)
class PlaintextHead:
    """What the first bytes of a plain-HTTP connection say about where it may go."""

    passthrough: bool  # an ordinary request to a host that is not a provider: leave it alone
    proxy_request: bool = False  # CONNECT or an absolute URL: meant for some other proxy
    method: str = ""
    host: str | None = None


def plaintext_decision(head: bytes, hosts: HostMap) -> PlaintextHead | None:
    """Decide from a plain-HTTP request head; None while it is incomplete.

    Only an origin-form request (`GET /path`) with exactly one Host header naming a host that is
    not a provider passes through untouched; anything else is left to Candela, which governs a
    provider request and refuses the rest.
    """
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None if len(head) < MAX_PLAINTEXT_HEAD else PlaintextHead(False)
    lines = head[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return PlaintextHead(False)
    method, target = parts[0].upper(), parts[1]
    host_values = [
        value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
        if name.strip().lower() == "host"
    ]
    host = host_values[0] if len(host_values) == 1 else None
    if method == "CONNECT" or not target.startswith("/"):
        return PlaintextHead(False, True, method, host or target)
    if host is None:
        return PlaintextHead(False, method=method)
    return PlaintextHead(hosts.route_for(host) is None, method=method, host=host)


def host_mismatch(sni: str | None, host: str | None) -> bool:
    """True when the HTTP Host (or :authority) names another server than the TLS SNI did."""
    if not sni:
        return False
    return not host or normalize_host(host) != normalize_host(sni)


def upstream_host_mismatch(up: Upstream, sni: str, base_url_configured: bool) -> bool:
    """An intercepted request for a host the route's upstream is not (another Vertex or Bedrock
    region): without a configured base_url Candela would send it somewhere the app did not ask."""
    return not base_url_configured and normalize_host(sni) != up.host.lower()


def provider_addresses(hosts: Iterable[tuple[str, str]], host_map: HostMap) -> set[str]:
    """The addresses of (name, address) pairs whose name is a provider host."""
    out = set()
    for name, addr in hosts:
        if host_map.route_for(name) is not None:
            try:
                out.add(str(ipaddress.ip_address(addr)))
            except ValueError:
                continue
    return out


# The denials of intercepted requests are built in errors.py, with every other one.
misdirected = errors.misdirected
region_not_configured = errors.region_not_configured
proxy_request_denied = errors.proxy_request_denied
host_not_intercepted = errors.host_not_intercepted
