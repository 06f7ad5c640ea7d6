"""Signed audit checkpoints: Ed25519 signatures over (size, head hash, time) kept outside the ledger."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from candela_mitm.audit.chain import (
    ProgressFn,
    VerifyResult,
    connect_readonly,
    fields_json,
    verify_chain,
)
from candela_mitm.audit.sqlite_sink import head, log_id, now_ts

CHECKPOINT_DOMAIN = b"candela.audit.checkpoint.v1\x00"


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The signing key at path (PEM, PKCS#8); created with mode 0600 if missing, with a .pub beside it."""
    p = Path(path).expanduser()
    if p.exists():
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{p}: not an Ed25519 private key")
        return key
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL: two concurrent first runs cannot overwrite each other's key.
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(f"{p}.pub").write_bytes(pub)
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """A public key from a PEM file holding either the public or the private key."""
    data = Path(path).expanduser().read_bytes()
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 key")
        return private.public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _signed_bytes(payload: dict[str, Any]) -> bytes:
    return CHECKPOINT_DOMAIN + fields_json(payload).encode("ascii")


@dataclass(frozen=True)
class Checkpoint:
    size: int  # entries covered: seq 1..size
    head_hash: str
    head_ts: str | None
    time: str
    log_id: str | None
    key_id: str
    signature: str  # base64

    def payload(self) -> dict[str, Any]:
        return {
            "v": 1,
            "size": self.size,
            "head_hash": self.head_hash,
            "head_ts": self.head_ts,
            "time": self.time,
            "log_id": self.log_id,
            "key_id": self.key_id,
        }

    def to_json(self) -> str:
        return json.dumps({**self.payload(), "signature": self.signature}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Checkpoint:
        d = json.loads(line)
        return cls(
            size=int(d["size"]),
            head_hash=str(d["head_hash"]),
            head_ts=d.get("head_ts"),
            time=str(d["time"]),
            log_id=d.get("log_id"),
            key_id=str(d["key_id"]),
            signature=str(d["signature"]),
        )

    def signature_ok(self, public: Ed25519PublicKey) -> bool:
        try:
            public.verify(base64.b64decode(self.signature), _signed_bytes(self.payload()))
        except (InvalidSignature, ValueError):
            return False
        return True


def read_checkpoints(path: str | Path) -> list[Checkpoint]:
    p = Path(path).expanduser()
    if not p.exists():
        return []
    return [
        Checkpoint.from_json(line)
        for line in p.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def make_checkpoint(db_path: str | Path, key: Ed25519PrivateKey) -> Checkpoint:
    """Sign the log's current head. The caller verifies the chain first: never sign a broken log."""
    conn = connect_readonly(db_path)
    try:
        size, digest, ts = head(conn)
        lid = log_id(conn)
    finally:
        conn.close()
    unsigned = Checkpoint(size, digest, ts, now_ts(), lid, key_id(key.public_key()), "")
    signature = base64.b64encode(key.sign(_signed_bytes(unsigned.payload()))).decode()
    return dataclasses.replace(unsigned, signature=signature)


def append_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(checkpoint.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoints(
    db_path: str | Path, checkpoints: list[Checkpoint], public: Ed25519PublicKey
) -> VerifyResult:
    """Check the log still holds every signed head: detects truncation and wholesale rewrites."""
    conn = connect_readonly(db_path)
    try:
        size, digest, _ = head(conn)
        lid = log_id(conn)
        matched = 0
        for cp in sorted(checkpoints, key=lambda c: c.size):
            if not cp.signature_ok(public):
                return VerifyResult(
                    False,
                    None,
                    f"checkpoint of {cp.time} (size {cp.size}): signature invalid",
                    matched,
                    digest,
                    size,
                )
            if cp.log_id is not None and lid is not None and cp.log_id != lid:
                return VerifyResult(
                    False,
                    1,
                    f"checkpoint of {cp.time} was signed for log {cp.log_id}, this file is log {lid} "
                    "(the ledger was replaced)",
                    matched,
                    digest,
                    size,
                )
            if cp.size > size:
                return VerifyResult(
                    False,
                    size + 1,
                    f"log truncated: the checkpoint of {cp.time} covers {cp.size} entries, "
                    f"the log holds {size}",
                    matched,
                    digest,
                    size,
                )
            if cp.size == 0:
                continue
            got = conn.execute("SELECT hash FROM audit_log WHERE seq = ?", (cp.size,)).fetchone()
            if got is None or got[0] != cp.head_hash:
                return VerifyResult(
                    False,
                    cp.size,
                    f"entry {cp.size} differs from the checkpoint of {cp.time}: the log was rewritten "
                    f"at or before entry {cp.size} (entries up to {matched} match earlier checkpoints)",
                    matched,
                    digest,
                    size,
                )
            matched = cp.size
        return VerifyResult(
            True, None, f"{len(checkpoints)} checkpoints match", matched, digest, size
        )
    finally:
        conn.close()


def verify_with_checkpoints(
    db_path: str | Path,
    checkpoint_path: str | Path,
    public: Ed25519PublicKey,
    from_seq: int | None = None,
    progress: ProgressFn | None = None,
) -> VerifyResult:
    """The chain first (an edit names its entry), then the signed heads (truncation, rewrite)."""
    chain = verify_chain(db_path, from_seq, progress)
    if not chain.ok:
        return chain
    checkpoints = read_checkpoints(checkpoint_path)
    if not checkpoints:
        return VerifyResult(
            False,
            None,
            f"no checkpoints in {checkpoint_path}",
            chain.count,
            chain.head_hash,
            chain.head_seq,
        )
    cps = verify_checkpoints(db_path, checkpoints, public)
    if not cps.ok:
        return cps
    return VerifyResult(
        True, None, f"chain ok; {cps.reason}", chain.count, chain.head_hash, chain.head_seq
    )
