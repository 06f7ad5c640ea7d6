"""Interception: which TLS server names (SNI) are provider hosts, and what an intercepted request may name."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from candela_mitm import errors
from candela_mitm.config import host_pattern
from candela_mitm.providers.specs import SPECS, Upstream

# Every provider's public hosts, as families. `*` stands for one DNS label or part of one
# (never a dot), so `*-aiplatform.googleapis.com` is every Vertex region and nothing under
# another domain. Checked against the providers' published endpoints (December 2026).
DEFAULT_HOSTS: dict[str, str] = {
    "api.openai.com": "openai",
    # data residency: us., eu., au., in., jp., ae. and any region OpenAI adds
    "*.api.openai.com": "openai",
    "api.anthropic.com": "anthropic-direct",
    "generativelanguage.googleapis.com": "google",
    # Vertex AI: the global endpoint, every region, regional (REP) and mTLS endpoints; all go to
    # the Vertex route, whatever the publisher named in the path
    "aiplatform.googleapis.com": "anthropic-vertex",
    "*-aiplatform.googleapis.com": "anthropic-vertex",
    "aiplatform.*.rep.googleapis.com": "anthropic-vertex",
    "aiplatform.mtls.googleapis.com": "anthropic-vertex",
    "*-aiplatform.mtls.googleapis.com": "anthropic-vertex",
    # Bedrock: runtime and FIPS endpoints, IPv4 (amazonaws.com) and dual-stack (api.aws), and
    # bedrock-mantle (Bedrock's OpenAI-compatible endpoint, a route of its own) in every region
    "bedrock-runtime.*.amazonaws.com": "anthropic-bedrock",
    "bedrock-runtime-fips.*.amazonaws.com": "anthropic-bedrock",
    "bedrock-runtime.*.api.aws": "anthropic-bedrock",
    "bedrock-runtime-fips.*.api.aws": "anthropic-bedrock",
    "bedrock-mantle.*.api.aws": "bedrock-mantle",
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
    parts = (re.escape(p) for p in host_pattern(name).split("*"))
    return re.compile(_LABEL.join(parts) + r"\Z")


class HostSet:
    """A set of host names and families (patterns): which of them a server name is in."""

    def __init__(self, names: Iterable[str]) -> None:
        names = [host_pattern(n) for n in names]  # ValueError names the bad one
        self.exact = frozenset(n for n in names if "*" not in n)
        self.patterns = [_pattern(n) for n in names if "*" in n]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not name:
            return False
        host = normalize_host(name)
        return host in self.exact or any(rx.match(host) for rx in self.patterns)


@dataclass(frozen=True)
class Route:
    """Where an intercepted request goes: a provider route and the path it names there."""

    provider: str
    rest: str  # what /proxy/<provider> would be followed by: the path below the route's base


class HostMap:
    """SNI name -> provider route: the defaults, extended or overridden by `interception.hosts`."""

    def __init__(self, hosts: Mapping[str, str] | None = None, defaults: bool = True) -> None:
        merged = dict(DEFAULT_HOSTS) if defaults else {}
        configured = {host_pattern(k): v for k, v in (hosts or {}).items()}
        merged.update(configured)
        for route in merged.values():
            if route not in SPECS:
                raise ValueError(f"unknown provider route {route!r}")
        self.exact = {k: v for k, v in merged.items() if "*" not in k}
        # a configured family is tried before the built-in ones, so it can override them
        ordered = sorted(merged.items(), key=lambda kv: kv[0] not in configured)
        self.patterns = [(_pattern(k), v) for k, v in ordered if "*" in k]
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


class RequestStream:
    """The request heads of one HTTP/1 client connection, found as its bytes pass: what a
    connection to a shared edge forwarded as bytes is checked with, request by request
    (keep-alive and pipelining included), bodies skipped by Content-Length or chunked framing.

    `feed` returns a PlaintextHead for every head that completes. Once a head does not pass, or
    cannot be framed (unparseable, too long, two lengths, a body with no end), `refused` is set
    for good: nothing after it can be read as requests, so nothing more may be forwarded. After
    an Upgrade (WebSocket) the rest is the upgraded protocol's, not HTTP, and is not read.
    """

    def __init__(self, hosts: HostMap) -> None:
        self.hosts = hosts
        self._buf = bytearray()
        self._state = "head"  # head | body | size | data | crlf | trailer | opaque | broken
        self._left = 0

    @property
    def upgraded(self) -> bool:
        return self._state == "opaque"

    @property
    def refused(self) -> bool:
        return self._state == "broken"

    def feed(self, data: bytes) -> list[PlaintextHead]:
        if self._state in ("opaque", "broken"):
            return []
        self._buf += data
        out: list[PlaintextHead] = []
        while self._step(out):
            pass
        return out

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_PLAINTEXT_HEAD:
                self._state = "broken"
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def _step(self, out: list[PlaintextHead]) -> bool:
        state = self._state
        if state == "head":
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) >= MAX_PLAINTEXT_HEAD:
                    self._state = "broken"
                return False
            head = bytes(self._buf[: end + 4])
            del self._buf[: end + 4]
            decision = plaintext_decision(head, self.hosts) or PlaintextHead(False)
            out.append(decision)
            self._frame(head, decision)
            return self._state not in ("opaque", "broken")
        if state == "body":
            n = min(self._left, len(self._buf))
            del self._buf[:n]
            self._left -= n
            if self._left == 0:
                self._state = "head"
                return True
            return False
        if state == "size":
            line = self._line()
            if line is None:
                return False
            try:
                self._left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._state = "broken"
                return False
            self._state = "data" if self._left else "trailer"
            return True
        if state == "data":
            n = min(self._left, len(self._buf))
            del self._buf[:n]
            self._left -= n
            if self._left == 0:
                self._state = "crlf"
                return True
            return False
        if state == "crlf":
            if len(self._buf) < 2:
                return False
            del self._buf[:2]
            self._state = "size"
            return True
        if state == "trailer":
            line = self._line()
            if line is None:
                return False
            if line == b"":
                self._state = "head"
            return True
        return False

    def _frame(self, head: bytes, decision: PlaintextHead) -> None:
        """Where the next head starts: after the body this head announces."""
        if not decision.passthrough:
            self._state = "broken"  # refused: nothing after it is forwarded or read
            return
        fields: dict[str, list[str]] = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields.setdefault(name.strip().lower(), []).append(value.strip().lower())
        if "upgrade" in fields:
            self._state = "opaque"
            return
        if "transfer-encoding" in fields:
            if "content-length" in fields:
                self._state = "broken"  # smuggling-shaped: a server may frame by either
                return
            if fields["transfer-encoding"][-1].rsplit(",", 1)[-1].strip() != "chunked":
                self._state = "broken"  # a body with no end but the connection's
                return
            self._state = "size"
            return
        lengths = set(fields.get("content-length", ()))
        if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
            self._state = "broken"  # smuggling-shaped: two lengths, or not a number
            return
        self._left = int(lengths.pop()) if lengths else 0
        self._state = "body" if self._left else "head"


def host_mismatch(sni: str | None, host: str | None) -> bool:
    """True when the HTTP Host (or :authority) names another server than the TLS SNI did."""
    if not sni:
        return False
    return not host or normalize_host(host) != normalize_host(sni)


_BUILTIN = HostMap()  # the providers' own public families, whatever the config adds
_BEDROCK_REGION = re.compile(
    r"bedrock-(?:runtime|runtime-fips|mantle)\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\."
    r"(?:amazonaws\.com|api\.aws)\Z"
)


def upstream_at_host(up: Upstream, route_name: str, sni: str) -> Upstream | None:
    """Where an intercepted request for the provider host `sni` goes when its route has no
    configured base_url: that same host (a data-residency host such as eu.api.openai.com,
    another Vertex region, another Bedrock region, signed for that region), with the
    organisation's credential, so the app's traffic stays where it sent it; `up` itself when
    `sni` is the route's own host.

    None when Candela does not go there by itself: a name of the operator's own
    (interception.hosts, not a provider's public family: give the route a base_url), an mTLS
    endpoint (Candela has no client certificate), a Bedrock host whose region cannot be read.
    """
    host = normalize_host(sni)
    if host == up.host.lower():
        return up
    if _BUILTIN.route_for(host) != route_name or ".mtls." in f".{host}":
        return None
    region = up.region
    if up.spec.auth == "sigv4":
        m = _BEDROCK_REGION.match(host)
        if m is None:
            return None
        region = m["region"]
    return replace(up, scheme="https", host=host, port=443, region=region)


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
