"""`candela enforce host|off|status|exec`: the command line of host enforcement (every process's
provider traffic via the proxy); enforcement/host.py puts it in place and takes it away."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from candela_mitm.config import load_config
from candela_mitm.enforcement import cgroups, host, procnet
from candela_mitm.enforcement.addresses import parse_hosts, provider_names
from candela_mitm.enforcement.host_chain import CHAIN, HostChain
from candela_mitm.errors import ConfigError

DESCRIPTION = (
    "Host enforcement: `candela enforce host|off|status|exec`, every process's provider traffic "
    "via the proxy."
)


def host_on(args: argparse.Namespace, chain: HostChain, out: Any) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"candela enforce: config error:\n{e}", file=sys.stderr)
        return 2
    port = args.proxy_port if args.proxy_port is not None else config.interception.listen_port
    names = provider_names(
        config.interception.hosts, args.provider, defaults=not args.no_default_providers
    )
    hosts = parse_hosts(Path(args.hosts_file).read_text()) if args.hosts_file else None
    try:
        state = host.enable(
            names,
            port,
            hosts=hosts,
            cgroup=args.cgroup,
            proxy_pids=args.proxy_pid,
            scope=args.scope if args.scope is not None else config.interception.enforce_scope,
            state_path=args.state,
            chain=chain,
            out=out,
        )
    except (LookupError, ValueError) as e:
        print(f"candela enforce: {e}", file=sys.stderr)
        return 1
    cg = state.cgroup
    if not cgroups.pids(cg):
        print(
            f"  warning: no process in {cg}: start the proxy with `candela enforce exec -- "
            f"candela ...` or pass --proxy-pid, or its own upstream connections loop back to it",
            file=out,
        )
    if not procnet.listening(port):
        print(
            f"  warning: nothing listens on port {port}: provider traffic is refused until the "
            f"proxy runs (transparent mode)",
            file=out,
        )
    return 0


def host_off(args: argparse.Namespace, chain: HostChain, out: Any) -> int:
    done = host.disable(state_path=args.state, cgroup=args.cgroup, chain=chain)
    print(
        f"candela enforce: off ({done.programs} eBPF program(s) detached, "
        f"{'chain removed' if done.chain else 'no chain'}{', cgroup removed' if done.cgroup else ''})",
        file=out,
    )
    for f in done.failures:
        print(f"  error: {f}", file=sys.stderr)
    return 1 if done.failures else 0


def show_status(args: argparse.Namespace, chain: HostChain, out: Any) -> int:
    st = host.collect_status(state_path=args.state, chain=chain)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True), file=out)
    else:
        word = "on" if st["active"] else "PARTIAL" if st["partial"] else "off"
        print(f"candela enforce: {word}", file=out)
        state = st["state"]
        if state:
            print(f"  proxy port: {state['proxy_port']}", file=out)
            print(f"  scope: {state.get('scope') or 'every process of the host'}", file=out)
            print(
                f"  exempt cgroup: {state['cgroup']} pids {st['cgroup_pids'] or 'none'}", file=out
            )
            for name, addrs in state["providers"].items():
                print(f"  provider {name}: {', '.join(addrs) or 'unresolved'}", file=out)
        for p in st["programs"]:
            print(f"  ebpf {p['hook']}: program {p['id']} at the cgroup root", file=out)
        if st["chain"] is not None:
            print(
                f"  iptables nat {CHAIN} ({'jumped from OUTPUT' if st['jump'] else 'NO JUMP'}):",
                file=out,
            )
            for rule in st["chain"]:
                print(f"    {rule}", file=out)
        for reason, n in sorted(st["refusals"].items()):
            print(f"  refused ({reason}): {n}", file=out)
        if st["partial"]:
            print("  run `candela enforce host ...` again, or `candela enforce off`", file=out)
    return 0 if st["active"] else 1 if st["partial"] else 3


def exec_in_cgroup(args: argparse.Namespace, out: Any) -> int:
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print(
            "candela enforce exec: give a command: candela enforce exec -- candela ...",
            file=sys.stderr,
        )
        return 2
    cg = host.join(state_path=args.state)
    if cg is None:
        print("candela enforce exec: host enforcement is off; running unconfined", file=sys.stderr)
    os.execvp(cmd[0], cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="candela enforce", description=DESCRIPTION)
    p.add_argument("--state", default=host.STATE_PATH, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command_name", required=True)
    h = sub.add_parser(
        "host", help="redirect every process's HTTPS to the proxy, governed by server name"
    )
    h.add_argument(
        "--proxy-port", type=int, help="transparent listener (default: interception.listen_port)"
    )
    h.add_argument("--config", metavar="PATH", help="YAML config: interception.hosts are providers")
    h.add_argument(
        "--provider", action="append", default=[], metavar="HOST", help="one more provider host"
    )
    h.add_argument(
        "--hosts-file", metavar="PATH", help="hosts(5) file: addresses for provider names"
    )
    h.add_argument(
        "--no-default-providers", action="store_true", help="only config and --provider hosts"
    )
    h.add_argument(
        "--cgroup",
        default=host.DEFAULT_CGROUP,
        help="Candela's own cgroup (exempt), under the v2 root",
    )
    h.add_argument(
        "--scope",
        metavar="CGROUP",
        help="enforce only the processes of this existing cgroup (v2 path, e.g. /ci.slice) and "
        "its descendants (default: interception.enforce_scope, else every process)",
    )
    h.add_argument(
        "--proxy-pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="move into Candela's cgroup",
    )
    off = sub.add_parser("off", help="remove redirection, eBPF programs, pins and the cgroup")
    off.add_argument("--cgroup", default=host.DEFAULT_CGROUP, help=argparse.SUPPRESS)
    s = sub.add_parser("status", help="what is active (exit 0 on, 3 off, 1 partial)")
    s.add_argument("--json", action="store_true")
    e = sub.add_parser("exec", help="run a command (the proxy) inside Candela's exempt cgroup")
    e.add_argument("command", nargs=argparse.REMAINDER)
    return p


def main(
    argv: Sequence[str] | None = None, *, chain: HostChain | None = None, out: Any = None
) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    chain = chain or HostChain()
    out = out or sys.stdout
    if args.command_name != "status" and os.geteuid() != 0:
        print(
            f"candela enforce {args.command_name}: needs root (sudo candela enforce ...)",
            file=sys.stderr,
        )
        return 1
    try:
        if args.command_name == "host":
            return host_on(args, chain, out)
        if args.command_name == "off":
            return host_off(args, chain, out)
        if args.command_name == "status":
            return show_status(args, chain, out)
        return exec_in_cgroup(args, out)
    except (OSError, ImportError) as e:
        print(f"candela enforce {args.command_name}: {e}", file=sys.stderr)
        if args.command_name == "host":
            print(
                "  see `candela doctor`; `candela enforce status` shows what is in place",
                file=sys.stderr,
            )
        return 1
