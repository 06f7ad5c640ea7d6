"""`candela audit`: verify, checkpoint, query and export the audit log."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

import duckdb

from candela_mitm.audit.chain import VerifyResult, verify_chain
from candela_mitm.audit.checkpoint import (
    append_checkpoint,
    load_or_create_key,
    load_public_key,
    make_checkpoint,
    read_checkpoints,
    verify_checkpoints,
    verify_with_checkpoints,
)
from candela_mitm.audit.journal import replay_dead_journals, wait_for_journals
from candela_mitm.audit.query import JOURNALS_WAIT_S, export, render, run_query
from candela_mitm.cli.progress import Progress
from candela_mitm.config import load_config
from candela_mitm.errors import ConfigError

DEFAULT_KEY = "~/.candela/audit-signing.key"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _common(suppress: bool) -> argparse.ArgumentParser:
    # The same options are accepted before and after the subcommand; after it, SUPPRESS keeps a
    # missing option from overwriting one given before it.
    default = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--config", metavar="PATH", default=default, help="config file (audit.sqlite_path)"
    )
    p.add_argument(
        "--db", metavar="PATH", default=default, help="audit SQLite file (overrides the config)"
    )
    p.add_argument(
        "--key",
        metavar="PATH",
        default=default,
        help=f"Ed25519 signing key (default {DEFAULT_KEY})",
    )
    p.add_argument(
        "--checkpoint",
        metavar="FILE",
        default=default,
        help="checkpoint file (default: <db>.checkpoints.jsonl)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="candela audit", parents=[_common(False)], description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common(True)

    v = sub.add_parser(
        "verify", parents=[common], help="recompute the hash chain (and check checkpoints)"
    )
    v.add_argument("--from", dest="from_seq", type=int, metavar="SEQ", help="start at entry SEQ")
    v.add_argument("--public-key", metavar="PATH", help="verify checkpoints with this public key")

    sub.add_parser(
        "checkpoint",
        parents=[common],
        help="sign the current head and append it to the checkpoint file",
    )

    q = sub.add_parser("query", parents=[common], help="DuckDB SQL over table `audit`")
    q.add_argument("sql")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")

    e = sub.add_parser("export", parents=[common], help="write entries to a file")
    e.add_argument("--format", choices=["parquet", "csv", "jsonl"], required=True)
    e.add_argument("--since", metavar="TIME", help="ISO 8601 (UTC if no offset), inclusive")
    e.add_argument("--until", metavar="TIME", help="ISO 8601 (UTC if no offset), exclusive")
    e.add_argument("--out", metavar="PATH", required=True)
    return parser


def _report(result: VerifyResult) -> int:
    if result.ok:
        print(f"ok: {result.count} entries verified, head {result.head_seq} {result.head_hash}")
        return EXIT_OK
    where = f" at entry {result.first_bad_seq}" if result.first_bad_seq is not None else ""
    print(f"FAILED{where}: {result.reason}", file=sys.stderr)
    if result.first_bad_seq is not None:
        print(f"first bad seq: {result.first_bad_seq}", file=sys.stderr)
    return EXIT_FAILED


def ledger_caught_up(db: Path, tool: str) -> bool:
    """Before the ledger is read: the entries of proxies that died, only journaled, appended
    (as their next start would), and those of running proxies waited for (they reach the
    ledger within `audit.journal_chain_delay_ms`); False (said on stderr) if it cannot be written."""
    try:
        replayed = replay_dead_journals(db)
        behind = wait_for_journals(db, JOURNALS_WAIT_S)
    except (OSError, sqlite3.Error) as e:
        print(f"{tool}: the entry journals beside {db} cannot be read: {e}", file=sys.stderr)
        return False
    if replayed:
        print(
            f"audit: {replayed} entries of a proxy that died appended from its journal",
            file=sys.stderr,
        )
    if behind:
        print(
            f"audit: {behind} entries of a running proxy are not in the ledger yet", file=sys.stderr
        )
    return True


def audit_main(argv: list[str]) -> int:
    """Run `candela audit <argv>`; 0 ok, 1 verification failed or query rejected, 2 cannot run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    db = Path(args.db or cfg.audit.sqlite_path).expanduser()
    if not db.exists():
        print(f"no audit log at {db}", file=sys.stderr)
        return EXIT_USAGE
    if not ledger_caught_up(db, "candela audit"):
        return EXIT_USAGE
    key_path = Path(args.key or DEFAULT_KEY).expanduser()
    checkpoint_path = Path(args.checkpoint or f"{db}.checkpoints.jsonl").expanduser()
    try:
        if args.command == "verify":
            public = None
            if args.checkpoint is not None:
                public = load_public_key(args.public_key or key_path)
            with Progress("verify", "entries") as p:
                if public is None:
                    verified = verify_chain(db, args.from_seq, p.update)
                else:
                    verified = verify_with_checkpoints(
                        db, checkpoint_path, public, args.from_seq, p.update
                    )
            return _report(verified)
        if args.command == "checkpoint":
            key = load_or_create_key(key_path)
            # Never sign a broken log. Entries up to the last checkpoint are pinned by its hash,
            # so only the entries after it are walked again.
            previous = read_checkpoints(checkpoint_path)
            start = None
            if previous:
                last = max(previous, key=lambda c: c.size)
                pinned = verify_checkpoints(db, [last], key.public_key())
                if not pinned.ok:
                    return _report(pinned)
                start = last.size + 1
            chain = verify_chain(db, start)
            if not chain.ok:
                return _report(chain)
            cp = make_checkpoint(db, key)
            append_checkpoint(checkpoint_path, cp)
            print(
                f"checkpoint: {cp.size} entries, head {cp.head_hash}, {cp.time} -> {checkpoint_path}"
            )
            return EXIT_OK
        if args.command == "query":
            try:
                result = run_query(db, args.sql)
            except duckdb.Error as e:
                print(f"query failed: {e}", file=sys.stderr)
                return EXIT_FAILED
            sys.stdout.write(render(result, args.format))
            return EXIT_OK
        if args.command == "export":
            with Progress("export", "entries written") as p:
                count = export(db, args.format, args.out, args.since, args.until, p.update)
            print(f"exported {count} entries to {args.out}", file=sys.stderr)
            return EXIT_OK
    except (OSError, ValueError) as e:
        print(f"candela audit {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE
