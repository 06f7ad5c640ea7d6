"""Command line: `candela-server` and `candela` (local mode, plus audit, ca, run, enforce, doctor)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from candela_mitm.errors import ConfigError

if TYPE_CHECKING:  # the serving modules are imported after the re-run under -O, not before
    from candela_mitm.config import Config
    from candela_mitm.runtime import Command

DEFAULT_PORTS = {"server": 8181, "local": 1234}

# `candela-server` and `candela` serve under `python -O`. mitmproxy keeps debug-only checks
# behind `__debug__`: a type check of every field of every request and response it parses, an
# event-type check around each state-machine step, asserts. They cost about 7% of a proxied
# request's CPU (bench/README.md) and guard mitmproxy against its own bugs, not against traffic.
# Set CANDELA_PYTHON_DEBUG=1 to keep them (when debugging mitmproxy itself).
DEBUG_ENV = "CANDELA_PYTHON_DEBUG"


def rerun_optimized() -> None:
    """Replace this process (same pid) with the same command under `python -O`, once.

    Call it before the serving modules are imported. Nothing happens when already optimized,
    when CANDELA_PYTHON_DEBUG=1, or when the command line is unknown (embedded interpreters).
    """
    if sys.flags.optimize or os.environ.get(DEBUG_ENV) == "1":
        return
    orig = getattr(sys, "orig_argv", None)
    if not orig or not sys.executable:
        return
    try:
        os.execv(sys.executable, [sys.executable, "-O", *orig[1:]])
    except OSError as e:  # cannot re-run: serve as we are
        print(f"candela: serving without -O ({e})", file=sys.stderr)


def _subcommands_epilog() -> str:
    lines = [f"  {name:<9} {text}" for name, text in SUBCOMMAND_HELP.items()]
    return "subcommands (candela <subcommand> --help):\n" + "\n".join(lines)


def _serve_parser(prog: str, command: Command) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Candela: governance proxy for LLM traffic",
        epilog=_subcommands_epilog() if command == "local" else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="PATH", help="YAML config (see config.example.yaml)")
    p.add_argument("--host", help="listen address (default: listen.host, 127.0.0.1)")
    p.add_argument(
        "--port", type=int, help=f"listen port (default: listen.port, {DEFAULT_PORTS[command]})"
    )
    p.add_argument("--mode", choices=["reverse", "transparent"], help="override `mode:`")
    p.add_argument(
        "--enforce",
        choices=["none", "host"],
        help="host: redirect every process's provider traffic here (root, transparent mode; "
        "stays after stop until `candela enforce off`); overrides interception.enforce",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="proxy processes on one port (default: workers)"
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _serve(argv: Sequence[str], command: Command, prog: str) -> int:
    from candela_mitm.config import load_config

    args = _serve_parser(prog, command).parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if str(args.log_level).upper() != "DEBUG":
        # one line per client connection is noise at INFO; Candela's own loggers stay as asked
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"candela: config error:\n{e}", file=sys.stderr)
        return 2
    if command == "server":
        from candela_mitm.cli.keys import first_start_hint

        first_start_hint(config, args.config, sys.stderr)
    overrides = {"mode": args.mode} if args.mode else {}
    config = config.model_copy(update=overrides)
    host = args.host or config.listen.host
    port = args.port if args.port is not None else (config.listen.port or DEFAULT_PORTS[command])
    workers = args.workers if args.workers is not None else config.workers
    if (args.enforce or config.interception.enforce) == "host" and (code := _enforce_host(config)):
        return code
    if workers > 1 and command == "server":
        return _serve_workers(config, command, host, port, workers, (args.config, overrides))
    if workers > 1:
        logging.getLogger("candela").warning("workers: is for candela-server; running one process")
    return _serve_one(config, command, host, port, source=(args.config, overrides))


def _enforce_host(config: Config) -> int:
    """--enforce host, before any worker forks (they inherit Candela's cgroup); 0 when in place."""
    from candela_mitm.enforcement import host as enforce

    try:
        enforce.enable_for_proxy(config, out=sys.stderr)
    except ConfigError as e:
        print(f"candela: {e}", file=sys.stderr)
        return 2
    except (LookupError, OSError, ImportError) as e:
        print(f"candela: cannot enforce: {e} (see `candela doctor`)", file=sys.stderr)
        return 1
    return 0


Source = tuple[str | None, dict[str, object]]  # the config file and the command line's overrides


def _serve_one(
    config: Config,
    command: Command,
    host: str,
    port: int,
    reuse_port: bool = False,
    source: Source = (None, {}),
    reconcile: bool = True,
) -> int:
    import asyncio

    from candela_mitm.runtime import build_runtime

    try:
        rt = build_runtime(config, command, reconcile=reconcile)
    except (ConfigError, ValueError) as e:
        print(f"candela: cannot start: {e}", file=sys.stderr)
        return 2
    rt.config_path, rt.config_overrides = source
    from candela_mitm.addons.server import serve  # mitmproxy is imported only to serve

    asyncio.run(serve(rt, host, port, reuse_port=reuse_port))
    return 0


def prepare_stores(config: Config) -> None:
    """Create the SQLite state store and audit ledger before the workers start, then close them.

    Switching a new database file to WAL takes a lock that SQLite does not wait for: two workers
    creating the same file at once would see "database is locked" at start.
    """
    from candela_mitm.audit.sqlite_sink import connect_writer
    from candela_mitm.state import open_state_store

    open_state_store(config.state).close()
    conn, _ = connect_writer(config.audit.sqlite_path)
    conn.close()


def _serve_workers(
    config: Config, command: Command, host: str, port: int, workers: int, source: Source
) -> int:
    """`workers: N`: N processes share the port (SO_REUSEPORT) and the state store."""
    from candela_mitm.cli.workers import claim_port, run_workers

    try:
        port = claim_port(host, port)
    except OSError as e:
        print(f"candela: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        prepare_stores(config)
    except Exception as e:  # the workers would each fail the same way
        print(f"candela: cannot start: {e}", file=sys.stderr)
        return 2
    # the first worker alone settles what the last run left (runtime.reconcile_at_start): two
    # processes writing the same entries before their settles would audit a request twice
    return run_workers(
        workers, lambda i: _serve_one(config, command, host, port, True, source, i == 0)
    )


def server_main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the program itself, not a caller in this process
        rerun_optimized()
    return _serve(sys.argv[1:] if argv is None else argv, "server", "candela-server")


# `candela <subcommand> ...`: each lives in the module named after its concept, as `main(argv)`.
SUBCOMMANDS = {
    "audit": "candela_mitm.cli.audit:audit_main",
    "ca": "candela_mitm.cli.ca:main",
    "run": "candela_mitm.cli.run:main",
    "enforce": "candela_mitm.cli.enforce:main",
    "doctor": "candela_mitm.cli.doctor:main",
    "prices": "candela_mitm.cli.prices:main",
    "keys": "candela_mitm.cli.keys:main",
    "policy": "candela_mitm.cli.policy:main",
    "service": "candela_mitm.cli.service:main",
}
# `candela --help` lists each with this line (tests/core/cli/test_help.py: every one listed).
SUBCOMMAND_HELP = {
    "serve": "the local proxy on :1234 (the default when no subcommand is given)",
    "run": "run a command with all its LLM traffic governed by Candela (root)",
    "enforce": "host-wide enforcement: redirect every process's provider traffic (root)",
    "audit": "verify, checkpoint, query and export the hash-chained audit trail",
    "doctor": "what this host supports for enforcement, and the fix for each missing piece",
    "ca": "export the interception CA certificate for clients to trust",
    "keys": "API keys: into a config file (the first admin key), or minted and revoked live",
    "service": "write systemd units for candela-server, ready before network-online",
    "prices": "what a model costs per token kind, and where each price came from",
    "policy": "replay the audit log through a candidate configuration: what it would change",
}


def _dispatch(name: str, argv: list[str]) -> int:
    import importlib

    module, _, func = SUBCOMMANDS[name].partition(":")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"candela {name}: not available in this build ({e})", file=sys.stderr)
        return 2
    return int(fn(argv) or 0)


def local_main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return _dispatch(args[0], args[1:])
    if args and args[0] == "serve":
        args = args[1:]
    if argv is None:
        rerun_optimized()
    return _serve(args, "local", "candela")


if __name__ == "__main__":
    raise SystemExit(server_main())
