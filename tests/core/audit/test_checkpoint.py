"""Tests for signed audit checkpoints: truncation and rewrites of the whole log are detected."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from candela_mitm.audit.chain import fields_json, verify_chain
from candela_mitm.audit.checkpoint import (
    load_or_create_key,
    load_public_key,
    read_checkpoints,
    verify_with_checkpoints,
)
from candela_mitm.audit.sqlite_sink import append_batch, connect_writer
from candela_mitm.cli.audit import audit_main

N = 100


def append(db: Path, n: int, start: int = 0, tag: str = "real") -> None:
    conn, _ = connect_writer(db)
    try:
        for b in range(start, start + n, 25):
            append_batch(
                conn,
                [
                    ("request", "alice", None, fields_json({"i": i, "tag": tag}))
                    for i in range(b, min(start + n, b + 25))
                ],
            )
    finally:
        conn.close()


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, list[str]]:
    """A log of N entries with one checkpoint at N; returns (db, the CLI's common options)."""
    db = tmp_path / "audit.db"
    append(db, N)
    opts = [
        "--db",
        str(db),
        "--key",
        str(tmp_path / "keys" / "audit.key"),
        "--checkpoint",
        str(tmp_path / "cp.jsonl"),
    ]
    assert audit_main([*opts, "checkpoint"]) == 0
    return db, opts


def attacker(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")
    return conn


def test_checkpoint_writes_a_signed_head_and_a_private_key(
    signed: tuple[Path, list[str]], tmp_path: Path
) -> None:
    db, _ = signed
    key = tmp_path / "keys" / "audit.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "audit.key.pub").exists()
    [cp] = read_checkpoints(tmp_path / "cp.jsonl")
    assert cp.size == N
    assert cp.head_hash == verify_chain(db).head_hash
    assert cp.signature_ok(load_public_key(key))
    assert cp.signature_ok(load_public_key(tmp_path / "keys" / "audit.key.pub"))
    # the same key is reused, not regenerated
    assert (
        load_or_create_key(key).public_key().public_bytes_raw()
        == load_public_key(key).public_bytes_raw()
    )


def test_log_that_grew_still_verifies(
    signed: tuple[Path, list[str]], tmp_path: Path, capsys
) -> None:
    db, opts = signed
    append(db, 30, start=N)
    assert audit_main([*opts, "verify"]) == 0
    assert audit_main([*opts, "checkpoint"]) == 0
    assert [c.size for c in read_checkpoints(tmp_path / "cp.jsonl")] == [N, N + 30]
    assert audit_main([*opts, "verify"]) == 0
    assert f"ok: {N + 30} entries verified" in capsys.readouterr().out


def truncate_tail(db: Path) -> None:
    conn = attacker(db)
    conn.execute("DELETE FROM audit_log WHERE seq > 80")
    conn.close()


def truncate_all(db: Path) -> None:
    conn = attacker(db)
    conn.execute("DELETE FROM audit_log")
    conn.close()


def rewrite_with_fresh_chain(db: Path) -> None:
    truncate_all(db)
    append(db, N, tag="forged")


def rewrite_and_extend(db: Path) -> None:
    truncate_all(db)
    append(db, N + 50, tag="forged")


def replace_file(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    append(db, N, tag="forged")


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        (truncate_tail, 81, "log truncated"),
        (truncate_all, 1, "log truncated"),
        (rewrite_with_fresh_chain, N, "rewritten"),
        (rewrite_and_extend, N, "rewritten"),
        (replace_file, 1, "ledger was replaced"),
    ],
)
def test_checkpoint_detects_what_the_chain_alone_cannot(
    signed: tuple[Path, list[str]],
    tamper: Callable[[Path], None],
    first_bad: int,
    reason: str,
    capsys,
) -> None:
    db, opts = signed
    tamper(db)
    assert verify_chain(db).ok  # a consistent chain: only the signed head shows the damage
    assert audit_main(["--db", str(db), "verify"]) == 0
    capsys.readouterr()
    assert audit_main([*opts, "verify"]) == 1
    err = capsys.readouterr().err
    assert reason in err
    assert f"first bad seq: {first_bad}" in err


def test_verify_checkpoint_with_public_key_only(
    signed: tuple[Path, list[str]], tmp_path: Path
) -> None:
    db, _ = signed
    pub = tmp_path / "keys" / "audit.key.pub"
    args = [
        "--db",
        str(db),
        "verify",
        "--checkpoint",
        str(tmp_path / "cp.jsonl"),
        "--public-key",
        str(pub),
    ]
    assert audit_main(args) == 0
    truncate_tail(db)
    assert audit_main(args) == 1


def test_forged_or_foreign_checkpoint_is_rejected(
    signed: tuple[Path, list[str]], tmp_path: Path, capsys
) -> None:
    db, opts = signed
    cp_file = tmp_path / "cp.jsonl"
    # an attacker who truncated the log edits the checkpoint's size to match: the signature breaks
    truncate_tail(db)
    data = json.loads(cp_file.read_text())
    data["size"] = 80
    data["head_hash"] = verify_chain(db).head_hash
    cp_file.write_text(json.dumps(data) + "\n")
    assert audit_main([*opts, "verify", "--checkpoint", str(cp_file)]) == 1
    assert "signature invalid" in capsys.readouterr().err
    # a checkpoint signed with another key does not count either
    other = [
        "--db",
        str(db),
        "--key",
        str(tmp_path / "other.key"),
        "--checkpoint",
        str(tmp_path / "other.jsonl"),
    ]
    assert audit_main([*other, "checkpoint"]) == 0
    assert audit_main([*opts, "verify", "--checkpoint", str(tmp_path / "other.jsonl")]) == 1
    assert "signature invalid" in capsys.readouterr().err


def test_checkpoint_refuses_to_sign_a_broken_log(
    signed: tuple[Path, list[str]], tmp_path: Path, capsys
) -> None:
    db, opts = signed
    append(db, 10, start=N)
    conn = attacker(db)
    conn.execute("UPDATE audit_log SET user_id = 'mallory' WHERE seq = ?", (N + 5,))
    conn.close()
    assert audit_main([*opts, "checkpoint"]) == 1
    assert f"first bad seq: {N + 5}" in capsys.readouterr().err
    assert len(read_checkpoints(tmp_path / "cp.jsonl")) == 1


def test_checkpoint_refuses_a_log_that_lost_its_signed_head(
    signed: tuple[Path, list[str]], tmp_path: Path
) -> None:
    db, opts = signed
    rewrite_with_fresh_chain(db)
    assert audit_main([*opts, "checkpoint"]) == 1
    assert len(read_checkpoints(tmp_path / "cp.jsonl")) == 1


def test_verify_with_no_checkpoints_fails(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    append(db, 5)
    key = load_or_create_key(tmp_path / "k")
    result = verify_with_checkpoints(db, tmp_path / "missing.jsonl", key.public_key())
    assert not result.ok
    assert "no checkpoints" in result.reason


def test_verify_checkpoint_without_key_cannot_run(
    signed: tuple[Path, list[str]], tmp_path: Path
) -> None:
    db, _ = signed
    args = [
        "--db",
        str(db),
        "--key",
        str(tmp_path / "absent.key"),
        "verify",
        "--checkpoint",
        str(tmp_path / "cp.jsonl"),
    ]
    assert audit_main(args) == 2
    assert not (tmp_path / "absent.key").exists()  # verify never creates a key
