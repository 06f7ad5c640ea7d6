"""`candela ca`: the interception CA's certificate, for clients that must trust Candela."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from candela_mitm.certs.authority import ca_certificate_pem, ensure_ca
from candela_mitm.config import load_config
from candela_mitm.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="candela ca", description="Candela's interception CA")
    sub = p.add_subparsers(dest="command", required=True)
    export = sub.add_parser(
        "export", help="print the CA certificate (PEM); create the CA if needed"
    )
    export.add_argument("--config", metavar="PATH", help="YAML config (interception.certs_dir)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"candela ca: config error:\n{e}", file=sys.stderr)
        return 2
    certs_dir = config.interception.certs_dir
    try:
        ensure_ca(certs_dir)
        pem = ca_certificate_pem(certs_dir)
    except OSError as e:
        print(f"candela ca: cannot read or create the CA in {certs_dir}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(pem.decode("ascii"))
    return 0
