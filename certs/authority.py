"""Candela's certificate authority: the CA mitmproxy signs intercepted hosts with, in its own file layout."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# mitmproxy reads `<confdir>/mitmproxy-ca.pem` (key, then certificate) when its `confdir` option
# names certs_dir; writing the same layout lets the CLI create the CA before the proxy ever ran.
BASENAME = "mitmproxy"
KEY_AND_CERT = f"{BASENAME}-ca.pem"
CERT = f"{BASENAME}-ca-cert.pem"
COMMON_NAME = "Candela CA"
ORGANIZATION = "Candela"
KEY_SIZE = 2048
VALIDITY = datetime.timedelta(days=3650)


def certs_path(certs_dir: str | os.PathLike[str]) -> Path:
    return Path(certs_dir).expanduser()


def _create(key_size: int) -> tuple[bytes, bytes]:
    """A new CA as (key PEM, certificate PEM), with the extensions strict X.509 checks want."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(private_key=key, algorithm=hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _publish(directory: Path, name: str, data: bytes, mode: int) -> bool:
    """Write a file under its final name only if none is there: False if another process won."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, directory / name)  # atomic, and refuses to replace
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def ensure_ca(certs_dir: str | os.PathLike[str], key_size: int = KEY_SIZE) -> Path:
    """The CA's key-and-certificate file in certs_dir, created (0600, directory 0700) if missing.

    Safe against a concurrent start: the first process to publish the file wins, the others
    use it.
    """
    directory = certs_path(certs_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    combined = directory / KEY_AND_CERT
    if not combined.exists():
        key_pem, cert_pem = _create(key_size)
        _publish(directory, KEY_AND_CERT, key_pem + cert_pem, 0o600)
    cert_file = directory / CERT
    if not cert_file.exists():
        _publish(directory, CERT, ca_certificate_pem(directory), 0o644)
    return combined


def ca_certificate_pem(certs_dir: str | os.PathLike[str]) -> bytes:
    """The CA certificate (never the key) as PEM, read from the key-and-certificate file."""
    raw = (certs_path(certs_dir) / KEY_AND_CERT).read_bytes()
    certs = x509.load_pem_x509_certificates(raw)
    return certs[0].public_bytes(serialization.Encoding.PEM)
