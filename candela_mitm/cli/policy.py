"""`candela policy replay`: a candidate configuration judged against the recorded audit log."""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from candela_mitm.audit.query import QueryResult, parse_time, render, request_entries
from candela_mitm.cli.audit import ledger_caught_up
from candela_mitm.cli.progress import Progress
from candela_mitm.config import Config, load_config
from candela_mitm.errors import ConfigError, StoreUnavailable
from candela_mitm.governance.replay import Candidate, ReplayReport, Verdict, replay
from candela_mitm.state import open_state_store
from candela_mitm.state.ports import TenantRecord, UserRecord

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: datetime) -> datetime:
    """`7d`, `12h`, `30m`, `2w` before `now`, or an ISO 8601 date or time (UTC if no offset)."""
    m = _RELATIVE.match(value.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    return datetime.strptime(parse_time(value), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="candela policy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "replay",
        help="judge a candidate configuration against the recorded requests",
        description="Replay the audit log's requests through a candidate configuration's model "
        "policy, budgets (users and tenants, with their periods), rate and token limits; print, "
        "per user and tenant, the requests it would newly deny or allow and the spend avoided.",
    )
    r.add_argument("--config", required=True, metavar="PATH", help="the candidate configuration")
    r.add_argument(
        "--since",
        metavar="WHEN",
        help="report requests from then on: 7d, 12h, 30m, 2w, or an ISO 8601 time (default: "
        "the whole log); spend earlier in the budget periods still counts",
    )
    r.add_argument(
        "--audit",
        metavar="PATH",
        help="the audit log: its SQLite ledger, a Parquet export or the mirror's Parquet folder "
        "(default: the candidate's audit.sqlite_path)",
    )
    r.add_argument(
        "--state",
        action="store_true",
        help="judge users and tenants as the admin API set them in the candidate's state store "
        "(their records win over the configuration, as they do live)",
    )
    r.add_argument("--format", choices=["table", "json"], default="table")
    return parser


def _usd(usd: float) -> str:
    return f"{usd:.6f}"


def render_table(report: ReplayReport) -> str:
    data = report.to_json()
    head = (
        f"Policy replay of {report.candidate or 'the candidate'}: "
        f"{data['totals']['judged']} requests judged"
    )
    if data["first_request_at"]:
        head += f" ({data['first_request_at']} to {data['last_request_at']})"
    if report.warmup:
        head += f"; {report.warmup} earlier in the budget periods counted, not reported"
    scopes = [
        (
            s["user_id"], s["tenant_id"] or "-", s["judged"], s["newly_denied"],
            s["newly_allowed"], _usd(s["recorded_spend_usd"]), _usd(s["spend_avoided_usd"]),
            _usd(s["estimated_spend_added_usd"]),
        )
        for s in data["scopes"]
    ]
    t = data["totals"]
    scopes.append((
        "total", "", t["judged"], t["newly_denied"], t["newly_allowed"],
        _usd(t["recorded_spend_usd"]), _usd(t["spend_avoided_usd"]),
        _usd(t["estimated_spend_added_usd"]),
    ))
    columns = [
        "user", "tenant", "judged", "newly_denied", "newly_allowed", "recorded_usd",
        "avoided_usd", "added_usd_est",
    ]
    out = [head, "", render(QueryResult(columns, [], scopes), "table", max_width=120)]
    changes = [
        (
            c["seq"], c["started_at"], c["user_id"], c["tenant_id"] or "-", c["model"] or "-",
            _describe(c["recorded"]), _describe(c["candidate"]), _usd(c["cost_usd"]),
        )
        for c in data["changes"]
    ]
    if changes:
        out += [
            "Changed requests",
            render(
                QueryResult(
                    ["seq", "started_at", "user", "tenant", "model", "recorded", "candidate",
                     "cost_usd"],
                    [],
                    changes,
                ),
                "table",
                max_width=120,
            ),
        ]
    else:
        out.append("No request would be decided differently.\n")
    return "\n".join(out)


def _describe(v: dict[str, Any]) -> str:
    detail = {k: x for k, x in v.items() if k not in ("decision", "code")}
    return Verdict(v["decision"], v["code"], detail).describe()


def _records(cfg: Config) -> tuple[list[UserRecord], list[TenantRecord]]:
    """The users and tenants the admin API set, from the candidate's state store (read only)."""
    if cfg.state.backend == "sqlite" and not Path(cfg.state.sqlite_path).expanduser().exists():
        raise FileNotFoundError(f"no state store at {cfg.state.sqlite_path}")
    store = open_state_store(cfg.state)
    try:
        return store.list_users(), store.list_tenants()
    finally:
        store.close()


def _replay(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    try:
        users, tenants = _records(cfg) if args.state else ([], [])
    except (StoreUnavailable, FileNotFoundError) as e:
        print(f"candela policy replay: --state: {e}", file=sys.stderr)
        return EXIT_USAGE
    candidate = Candidate(cfg, str(args.config), users, tenants)
    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    except ValueError as e:
        print(f"candela policy replay: --since: {e}", file=sys.stderr)
        return EXIT_USAGE
    audit = Path(args.audit or cfg.audit.sqlite_path).expanduser()
    if not audit.exists():
        print(f"candela policy replay: no audit log at {audit}", file=sys.stderr)
        return EXIT_USAGE
    if not ledger_caught_up(audit, "candela policy replay"):
        return EXIT_USAGE
    start = candidate.warmup_start(since) if since is not None else None
    try:
        with Progress("replay", "requests") as progress:  # a terminal only (cli/progress.py)
            report = replay(candidate, request_entries(audit, start), since, progress.update)
    except (OSError, ValueError, KeyError, sqlite3.Error, duckdb.Error) as e:
        # an unreadable or foreign file: say which, not a traceback
        print(f"candela policy replay: cannot read {audit}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.format == "json":
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(render_table(report))
    return EXIT_OK


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "replay":
        return _replay(args)
    return EXIT_USAGE
