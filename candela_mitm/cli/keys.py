"""`candela keys`: mint, list, rotate and revoke API keys through a running Candela's admin API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO
from urllib.parse import quote

DEFAULT_URL = "http://127.0.0.1:8181"
KEY_ENV = "CANDELA_ADMIN_KEY"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="candela keys", description=__doc__)
    p.add_argument("--url", default=DEFAULT_URL, help=f"Candela's listener (default {DEFAULT_URL})")
    p.add_argument(
        "--key-env",
        default=KEY_ENV,
        metavar="NAME",
        help=f"environment variable holding your Candela key (default {KEY_ENV}); "
        "a key on the command line would be in the shell history and the process list",
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")
    sub = p.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="mint a key (shown once)")
    create.add_argument("--user", help="whose key (default: yours; admins may name anyone)")
    create.add_argument("--name", default="", help="what the key is for")
    create.add_argument("--expires-at", help="RFC 3339, e.g. 2030-01-31T00:00:00Z")
    ls = sub.add_parser("list", help="keys minted through the API (their ids, never the keys)")
    ls.add_argument("--user", help="only this user's (default for developers: yours)")
    rotate = sub.add_parser("rotate", help="a new key; the old one works for --grace-s more")
    rotate.add_argument("key_id", help="the key's id (k_...), as `list` shows it")
    rotate.add_argument("--grace-s", type=int, default=3600, help="default 3600")
    revoke = sub.add_parser("revoke", help="revoke a key at once, in every process")
    revoke.add_argument("key_id", help="the key's id (k_...), as `list` shows it")
    return p


def _call(url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, {"error": "http_error", "message": str(e)}


def _row(k: dict[str, Any]) -> str:
    expires = k.get("expires_at") or "never"
    return f"{k['id']}  {k['user_id']}  {k['state']}  expires {expires}  {k.get('name') or ''}"


def main(argv: list[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call: a caller may have replaced them since import
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    token = os.environ.get(args.key_env, "")
    if not token:
        print(f"candela keys: set {args.key_env} to your Candela key", file=err)
        return EXIT_USAGE
    try:
        if args.command == "create":
            body: dict[str, Any] = {"name": args.name}
            if args.user:
                body["user_id"] = args.user
            if args.expires_at:
                body["expires_at"] = args.expires_at
            status, answer = _call(args.url, token, "POST", "/admin/v1/keys", body)
        elif args.command == "list":
            query = f"?user={quote(args.user)}" if args.user else ""
            status, answer = _call(args.url, token, "GET", "/admin/v1/keys" + query)
        elif args.command == "rotate":
            status, answer = _call(
                args.url,
                token,
                "POST",
                f"/admin/v1/keys/{quote(args.key_id, safe='')}/rotate",
                {"grace_s": args.grace_s},
            )
        else:
            status, answer = _call(
                args.url, token, "DELETE", f"/admin/v1/keys/{quote(args.key_id, safe='')}"
            )
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"candela keys: cannot reach {args.url}: {e}", file=err)
        return EXIT_FAILED
    if status >= 400 or not isinstance(answer, dict):
        error = answer.get("error") if isinstance(answer, dict) else None
        message = answer.get("message") if isinstance(answer, dict) else answer
        print(f"candela keys: {status} {error}: {message}", file=err)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer, indent=2), file=out)
    elif args.command in ("create", "rotate"):
        print(answer["key"], file=out)
        print(f"# {_row(answer)}: shown once, store it now", file=err)
        if "replaces" in answer:
            print(f"# replaces {_row(answer['replaces'])}", file=err)
    elif args.command == "list":
        for k in answer["keys"]:
            print(_row(k), file=out)
    else:
        print(_row(answer), file=out)
    return EXIT_OK
