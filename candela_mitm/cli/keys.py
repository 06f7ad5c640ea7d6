"""`candela keys`: Candela API keys.

Two ways to make one. Into a config file, before anything runs (`create-admin`, `add`): only its
sha256 is stored in `auth.api_keys`, which is how the first admin key is made on a new install.
Through a running Candela's admin API (`create`, `list`, `rotate`, `revoke`): the store keeps the
digest, revocation holds at once in every process. The key itself is printed once, on standard
output, and never logged or written anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import yaml

from candela_mitm.config import Config, parse_config
from candela_mitm.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8181"
KEY_ENV = "CANDELA_ADMIN_KEY"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
KEY_PREFIX = "cdl_"
DEFAULT_CONFIG = "~/.candela/config.yaml"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def with_key(data: dict[str, Any], user: str, sha256: str, admin: bool) -> dict[str, Any]:
    """A copy of parsed config data with one more api_keys entry (and the user among admins)."""
    out = dict(data)
    auth = dict(out.get("auth") or {})
    auth["api_keys"] = [*(auth.get("api_keys") or []), {"sha256": sha256, "user": user}]
    if admin and user not in (auth.get("admins") or []):
        auth["admins"] = [*(auth.get("admins") or []), user]
    out["auth"] = auth
    return out


def _executable(name: str) -> str:
    """This environment's `name` script, by absolute path (the venv is seldom on PATH)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def governed(config: Config) -> bool:
    """True when some caller can be authenticated: a key, or an identity provider."""
    auth = config.auth
    return bool(auth.api_keys or auth.oidc or auth.access_tokens)


def first_start_hint(config: Config, config_path: str | None, out: TextIO) -> None:
    """`candela-server` with no way in for anyone: the one command that mints an admin key."""
    if governed(config) or config.auth.required is False:
        return
    path = config_path or DEFAULT_CONFIG
    print(
        "candela-server: no API keys and no admins are configured: every request is refused (401).\n"
        "  Mint an admin key (printed once; only its sha256 goes into the config):\n"
        f"    {_executable('candela')} keys create-admin --config {path}\n"
        + (
            f"  then reload this server: kill -HUP {os.getpid()}"
            if config_path
            else f"  then restart with it: {_executable('candela-server')} --config {path}"
            f"   (make run CONFIG={path})"
        ),
        file=out,
        flush=True,
    )


def create(args: argparse.Namespace, admin: bool, out: TextIO) -> int:
    """Missing file: written. A file without `auth:`: the section appended (comments stay).
    A file with `auth:`: left alone and the lines to add printed, unless --rewrite."""
    path = Path(os.path.expanduser(args.config))
    key = new_key()
    sha = digest(key)
    try:
        text = path.read_text() if path.exists() else ""
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: (top level): expected a mapping")
        new = with_key(data, args.user, sha, admin)
        parse_config(new, str(path))  # never write a file the server would refuse
    except (OSError, yaml.YAMLError, ConfigError) as e:
        print(f"candela keys: {e}", file=sys.stderr)
        return 2
    who = f"{'an admin' if admin else 'a'} key for {args.user}"
    if "auth" in data and not args.rewrite:
        block = yaml.safe_dump({"auth": new["auth"]}, sort_keys=False)
        print(
            f"{path} has an `auth:` section: it is left as it is (a rewrite would drop its\n"
            f"comments). Make its `auth:` read as follows for {who}, then reload Candela:\n\n"
            f"{block}\n(or run again with --rewrite to let Candela rewrite the file)",
            file=out,
        )
    else:
        if "auth" in data or not text.strip():
            body = yaml.safe_dump(new, sort_keys=False)
        else:  # appended: the rest of the file, comments included, stays as it was
            sep = "" if text.endswith("\n") else "\n"
            body = text + sep + yaml.safe_dump({"auth": new["auth"]}, sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, path)
        print(f"Wrote {who} to {path} (its sha256 only).", file=out)
    print(
        "\nThe key (shown once, stored nowhere: keep it in a secret manager):\n\n"
        f"    {key}\n\n"
        "Use it as the api_key of an SDK whose base_url is Candela's, e.g.\n"
        '    OpenAI(base_url="http://127.0.0.1:8181/proxy/openai/v1", api_key="<key>")\n'
        'Check it: curl -H "Authorization: Bearer <key>" http://127.0.0.1:8181/admin/v1/me',
        file=out,
        flush=True,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="candela keys",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    for name, help_text, user in (
        ("create-admin", "mint an admin key into the config file (first start)", "admin"),
        ("add", "mint a key for a user into the config file (developer unless --admin)", None),
    ):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--config", default=DEFAULT_CONFIG, help=f"(default: {DEFAULT_CONFIG})")
        c.add_argument("--user", default=user, required=user is None, help="the key's principal")
        c.add_argument(
            "--rewrite", action="store_true", help="rewrite an existing config (drops comments)"
        )
        if name == "add":
            c.add_argument("--admin", action="store_true", help="also list the user in admins")
    create = sub.add_parser("create", help="mint a key through the admin API (shown once)")
    create.add_argument("--user", help="whose key (default: yours; admins may name anyone)")
    create.add_argument("--name", default="", help="what the key is for")
    create.add_argument("--expires-at", help="RFC 3339, e.g. 2030-01-31T00:00:00Z")
    create.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="narrow the key to these models (names or patterns: gpt-4o-mini 'claude-sonnet-*')",
    )
    create.add_argument(
        "--budget-usd",
        type=float,
        metavar="USD",
        help="a budget of the key's own, a part of its user's, per the user's period",
    )
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
    budget = "" if k.get("budget_usd") is None else f"  budget ${k['budget_usd']:g}"
    return (
        f"{k['id']}  {k['user_id']}  {k['state']}  expires {expires}{budget}  {k.get('name') or ''}"
    )


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout  # looked up per call: a caller may have replaced them since import
    err = err or sys.stderr
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command in ("create-admin", "add"):  # into a config file, no proxy needed
        admin = args.command == "create-admin" or bool(getattr(args, "admin", False))
        return create(args, admin, out)
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
            if args.models:
                body["models"] = args.models
            if args.budget_usd is not None:
                body["budget_usd"] = args.budget_usd
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
