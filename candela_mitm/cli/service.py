"""`candela service`: systemd units for candela-server, ready before the network is "online".

`install` writes `candela-server.service`, ordered after network.target (interfaces up) and
before network-online.target: every unit that waits for the network (After= and Wants=
network-online.target, as most network clients do) starts only once Candela answers its health
check and, when host enforcement is configured, has redirected provider traffic to itself.
Readiness is `candela service wait-ready` in ExecStartPost: systemd counts the unit as started
only when it returns.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from candela_mitm.config import Config, load_config
from candela_mitm.errors import ConfigError

UNIT = "candela-server.service"
DEFAULT_DIR = "/etc/systemd/system"
SERVER_PORT = 8181


def health_url(config: Config, port: int | None = None) -> str:
    host = config.listen.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port or config.listen.port or SERVER_PORT}/healthz"


def unit_text(
    config: Config,
    config_path: Path,
    bin_dir: Path,
    enforce: bool,
    user: str | None = None,
    env_file: str = "/etc/candela/candela.env",
    wait_s: int = 90,
) -> str:
    """candela-server.service for this config (enforce: `--enforce host`, as root)."""
    server = [str(bin_dir / "candela-server"), "--config", str(config_path)]
    if enforce:
        server += ["--enforce", "host"]
    ready = [str(bin_dir / "candela"), "service", "wait-ready", "--url", health_url(config)]
    ready += ["--timeout", str(wait_s)]
    lines = [
        "# Written by `candela service install`.",
        "[Unit]",
        "Description=Candela governance proxy for LLM traffic",
        # interfaces are configured (network.target), the network is not yet "online": units
        # that wait for network-online.target start only once Candela serves
        "After=network.target",
        "Wants=network.target",
        "Before=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={shlex.join(server)}",
        f"ExecStartPost={shlex.join(ready)}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        # provider keys (OPENAI_API_KEY=...) and OTEL_* variables, readable by root only
        f"EnvironmentFile=-{env_file}",
        "Restart=on-failure",
        "RestartSec=2",
        f"TimeoutStartSec={wait_s + 30}",
        "TimeoutStopSec=30",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
    ]
    if enforce:
        # root for iptables, eBPF and cgroups; the redirect stays when the proxy stops (fail
        # closed) until `candela enforce off`
        lines.append("# host enforcement: runs as root")
    elif user:
        lines.append(f"User={user}")
    lines += [
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "WantedBy=network-online.target",
        "",
    ]
    return "\n".join(lines)


def install(args: argparse.Namespace, out: TextIO) -> int:
    config_path = Path(args.config).expanduser().resolve()
    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"candela service: config error:\n{e}", file=sys.stderr)
        return 2
    enforce = args.enforce == "host" or (
        args.enforce is None and config.interception.enforce == "host"
    )
    if enforce and config.mode != "transparent":
        print(
            "candela service: host enforcement needs `mode: transparent` in the config",
            file=sys.stderr,
        )
        return 2
    if enforce and args.user:
        print("candela service: host enforcement runs as root: drop --user", file=sys.stderr)
        return 2
    bin_dir = (
        Path(args.bin_dir).expanduser().resolve() if args.bin_dir else Path(sys.executable).parent
    )
    for exe in ("candela-server", "candela"):
        if not (bin_dir / exe).exists():
            print(f"candela service: {bin_dir / exe} does not exist (--bin-dir)", file=sys.stderr)
            return 2
    target = Path(args.dir).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    unit = target / UNIT
    unit.write_text(unit_text(config, config_path, bin_dir, enforce, args.user, args.env_file))
    print(f"wrote {unit}" + (" (with host enforcement)" if enforce else ""), file=out)
    if target == Path(DEFAULT_DIR):
        print("next: systemctl daemon-reload && systemctl enable --now candela-server", file=out)
    return 0


def wait_ready(url: str, timeout_s: float, out: TextIO) -> int:
    """Poll the health check until it answers 200; 1 after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return 0
        except OSError:
            pass
        if time.monotonic() >= deadline:
            print(f"candela service: {url} did not answer in {timeout_s:g} s", file=out)
            return 1
        time.sleep(0.2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="candela service", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install", help="write candela-server.service")
    i.add_argument("--config", required=True, metavar="PATH", help="the server's YAML config")
    i.add_argument("--dir", default=DEFAULT_DIR, help=f"where to write it (default: {DEFAULT_DIR})")
    i.add_argument(
        "--enforce",
        choices=["none", "host"],
        help="host enforcement (default: interception.enforce of the config)",
    )
    i.add_argument("--user", help="run as this user (not with host enforcement)")
    i.add_argument("--bin-dir", help="where candela-server lives (default: this environment's)")
    i.add_argument("--env-file", default="/etc/candela/candela.env", help="provider keys, OTEL_*")
    w = sub.add_parser(
        "wait-ready", help="wait until the server's /healthz answers (ExecStartPost)"
    )
    w.add_argument("--url", default=f"http://127.0.0.1:{SERVER_PORT}/healthz")
    w.add_argument("--timeout", type=float, default=90.0)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out = out or sys.stdout
    if args.command == "install":
        return install(args, out)
    return wait_ready(args.url, args.timeout, out)
