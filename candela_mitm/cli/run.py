"""`candela run [--user U] [--tenant T] [--add-host NAME:IP] -- CMD ARGS...`: the command line of
a governed sandbox (enforcement/sandbox.py builds it)."""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence


def parse_add_host(value: str) -> tuple[str, str]:
    """NAME:IP (IPv4; IPv6 is dropped in a sandbox anyway, so it is refused here)."""
    name, sep, ip = value.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--add-host wants NAME:IP, got {value!r}")
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--add-host {value!r}: {ip!r} is not an IPv4 address"
        ) from None
    return name.strip().lower().rstrip("."), str(addr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="candela run",
        description="Run a command with all its LLM traffic governed by Candela (needs root).",
    )
    p.add_argument("--config", metavar="PATH", help="YAML config (interception, audit)")
    p.add_argument(
        "--user", help="whom its requests are attributed to (default: the invoking user)"
    )
    p.add_argument("--tenant", help="the tenant its requests act for (default: the user's first)")
    p.add_argument(
        "--add-host",
        metavar="NAME:IP",
        action="append",
        default=[],
        type=parse_add_host,
        help="resolve NAME to IP inside the sandbox (repeatable)",
    )
    p.add_argument(
        "--no-ebpf",
        action="store_true",
        help="run without the eBPF guard (namespace and firewall only; refusals not audited)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return p


def default_user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command: candela run [options] -- CMD ARGS...")
    if os.geteuid() != 0:
        print("candela run: needs root (network namespaces, iptables, cgroups)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="candela run: %(message)s")
    if os.environ.get("CANDELA_DEBUG"):
        logging.getLogger("candela.sandbox").setLevel(logging.DEBUG)
    from candela_mitm.config import load_config
    from candela_mitm.enforcement import procnet, sandbox
    from candela_mitm.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"candela run: config error:\n{e}", file=sys.stderr)
        return 2
    port = config.interception.listen_port
    if not procnet.listening(port):
        print(
            f"candela run: nothing listens on port {port}: start Candela with "
            "`mode: transparent` (its traffic will fail until then)",
            file=sys.stderr,
        )
    return sandbox.run(
        config,
        command,
        user=args.user or default_user(),
        tenant=args.tenant,
        add_hosts=args.add_host,
        ebpf=not args.no_ebpf,
    )
