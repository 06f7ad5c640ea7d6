"""A sandbox's names: its hosts file (--add-host entries, then every provider host, resolved here or
sent to the sandbox's gateway) and its resolv.conf."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("candela.sandbox")

# Name lookups inside go to the sandbox's own loopback, where nothing answers: a name that is not
# in its hosts file fails at once instead of after resolver timeouts (UDP out is dropped).
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
RESOLVE_TIMEOUT_S = 3.0


def resolve_ipv4(names: Sequence[str], timeout: float = RESOLVE_TIMEOUT_S) -> dict[str, str]:
    """The first IPv4 address of each name that resolves within the timeout (in parallel)."""
    if not names:
        return {}

    def one(name: str) -> str | None:
        try:
            infos = socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            return None
        return str(infos[0][4][0]) if infos else None

    out: dict[str, str] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(names)))
    futures = {pool.submit(one, n): n for n in names}
    try:
        for fut in concurrent.futures.as_completed(futures, timeout=timeout):
            ip = fut.result()
            if ip:
                out[futures[fut]] = ip
    except concurrent.futures.TimeoutError:
        log.warning("name resolution did not finish in %.0fs; using the sandbox gateway", timeout)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def sandbox_hosts(
    add_hosts: Sequence[tuple[str, str]],
    provider_names: Sequence[str],
    gateway: str,
    resolve: Callable[[Sequence[str]], dict[str, str]] = resolve_ipv4,
) -> list[tuple[str, str]]:
    """The sandbox's name table: the given entries (--add-host) first, then every provider host.

    A provider host that does not resolve here maps to the sandbox's gateway: its port 443 is
    redirected to Candela like any other address, and Candela routes by SNI, so the app reaches
    its provider (through Candela) even where it could not resolve the name itself.
    """
    given = {name for name, _ in add_hosts}
    wanted = [n for n in provider_names if n not in given]
    resolved = resolve(wanted)
    return list(add_hosts) + [(n, resolved.get(n, gateway)) for n in wanted]


def hosts_file(entries: Sequence[tuple[str, str]], system: str = "/etc/hosts") -> str:
    lines = ["# written by candela run: the sandbox's names come first", "127.0.0.1\tlocalhost"]
    lines += [f"{ip}\t{name}" for name, ip in entries]
    with contextlib.suppress(OSError):  # a host without one
        lines += ["", "# the host's /etc/hosts", Path(system).read_text()]
    return "\n".join(lines) + "\n"
