"""Local guard: in `candela` (a laptop), only this machine's own clients, speaking JSON, get in.

A web page in the user's browser can reach 127.0.0.1:1234. Three rules keep it out:
- the Host header must name a loopback address (or the configured listen host) and the port
  Candela listens on: DNS rebinding makes a hostile page same-origin with Candela, but its
  requests still carry the hostile name;
- a request body on a JSON endpoint must be declared JSON: `text/plain`, form and multipart
  bodies are what a page can POST cross-site without a CORS preflight;
- the management API's writes carry a per-install token that only a same-origin page can read
  (the UI page embeds it).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

TOKEN_HEADER = "x-candela-local-token"
TOKEN_META = "candela-local-token"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1", "[::1]"})


def allowed_host_names(listen_host: str) -> frozenset[str]:
    """Loopback names, plus the configured listen host when it is a specific one."""
    extra = {listen_host.lower()} if listen_host not in ("", "0.0.0.0", "::") else set()
    return LOOPBACK_NAMES | extra


def host_allowed(host_header: str | None, names: frozenset[str], port: int | None) -> bool:
    """Whether a request's Host (or :authority) names this machine's Candela."""
    if not host_header or len(host_header) > 300:
        return False
    host, sep, port_text = host_header.rpartition(":")
    if not sep or host.endswith(":") or (host.startswith("[") is not host.endswith("]")):
        host, port_text = host_header, ""  # no port, or a bare IPv6 address
    if port_text and not port_text.isdigit():
        return False
    if port is not None and int(port_text or 80) != port:
        return False
    name = host.lower()
    if name in names:
        return True
    try:  # any 127.0.0.0/8 address is this machine too
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def is_json_content_type(value: str | None) -> bool:
    """application/json or a +json type, parameters ignored."""
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def ui_token(path: Path) -> str:
    """The per-install token of the management API, created (mode 0600) on first use."""
    token = path.read_text().strip() if path.exists() else ""
    if len(token) >= 32:
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def token_path(audit_sqlite_path: str) -> Path:
    """Beside the audit ledger, in Candela's own directory (~/.candela by default)."""
    return Path(audit_sqlite_path).expanduser().parent / "local-ui.token"


def with_token(page: bytes, token: str) -> bytes:
    """The UI page with the token in a meta tag the page's script reads."""
    meta = f'<meta name="{TOKEN_META}" content="{token}">'.encode()
    return page.replace(b"<head>", b"<head>\n" + meta, 1)
