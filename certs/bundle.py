"""Trust bundle: the system's CA certificates plus Candela's, for programs run inside a sandbox."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

# Where distributions keep their bundle; the first that exists is used.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, BSD
)

# The variables the common runtimes read a CA bundle from (OpenSSL and httpx, requests, curl,
# Node, and botocore, which ignores SSL_CERT_FILE: boto3 in `candela run` failed TLS without it).
CA_ENV_VARS = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "AWS_CA_BUNDLE",
)


def system_bundle() -> Path | None:
    """The system's CA bundle file, if there is one."""
    default = ssl.get_default_verify_paths().cafile
    for candidate in (default, *SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    return None


def build_bundle(ca_pem: bytes, dest: str | os.PathLike[str], system: Path | None = None) -> Path:
    """Write system CAs + Candela's CA to dest (0644) and return its path."""
    system = system if system is not None else system_bundle()
    parts = []
    if system is not None:
        text = system.read_bytes()
        parts.append(text if text.endswith(b"\n") else text + b"\n")
    parts.append(ca_pem if ca_pem.endswith(b"\n") else ca_pem + b"\n")
    path = Path(dest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(parts))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def ca_env(bundle: str | os.PathLike[str]) -> dict[str, str]:
    """Environment variables that make the common HTTP stacks trust the bundle."""
    return {name: str(bundle) for name in CA_ENV_VARS}
