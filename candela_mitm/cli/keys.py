"""`candela keys`: mint a Candela API key into a config file (only its sha256 is stored).

Until keys are minted through the admin API, a key lives in `auth.api_keys` as a digest. The
key itself is printed once, on standard output, and never logged or written anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from candela_mitm.config import Config, parse_config
from candela_mitm.errors import ConfigError

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
    p = argparse.ArgumentParser(prog="candela keys", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text, user in (
        ("create-admin", "mint an admin key into the config (first start)", "admin"),
        ("create", "mint a key for a user (developer unless --admin)", None),
    ):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--config", default=DEFAULT_CONFIG, help=f"(default: {DEFAULT_CONFIG})")
        c.add_argument("--user", default=user, required=user is None, help="the key's principal")
        c.add_argument(
            "--rewrite", action="store_true", help="rewrite an existing config (drops comments)"
        )
        if name == "create":
            c.add_argument("--admin", action="store_true", help="also list the user in admins")
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    admin = args.command == "create-admin" or bool(getattr(args, "admin", False))
    return create(args, admin, out or sys.stdout)
