"""Tests for the audit hash chain: encoding, hashes, append-only guards and tamper detection."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from candela_mitm.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    canonical_encoding,
    entry_hash,
    fields_json,
    fields_json_acyclic,
    row_hash,
    verify_chain,
    verify_rows,
)
from candela_mitm.audit.sqlite_sink import append_batch, connect_writer, now_ts
from candela_mitm.cli.audit import audit_main

N = 20


def build_log(path: Path, n: int = N, batch: int = 7) -> None:
    conn, _ = connect_writer(path)
    try:
        for start in range(0, n, batch):
            append_batch(
                conn,
                [
                    (
                        "request",
                        f"user{i % 3}",
                        "t1" if i % 2 else None,
                        fields_json({"i": i + 1, "model": "gpt-4o"}),
                    )
                    for i in range(start, min(n, start + batch))
                ],
            )
    finally:
        conn.close()


def attacker(path: Path) -> sqlite3.Connection:
    """A raw connection with the append-only triggers dropped, as someone with file access would."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")
    return conn


def row(conn: sqlite3.Connection, seq: int) -> tuple:
    return conn.execute(
        "SELECT seq, ts, action, user_id, tenant_id, fields, prev_hash, hash FROM audit_log WHERE seq = ?",
        (seq,),
    ).fetchone()


# -- encoding and hashes ------------------------------------------------------------------------

ENTRY = AuditEntry(
    1,
    "2026-05-17T00:00:00.000000Z",
    "model_policy_check",
    "alice@example.com",
    "contractor-pool",
    {"result": "denied", "model": "o1-pro", "policy_mode": "allowlist"},
)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            ENTRY,
            b'[1,"2026-05-17T00:00:00.000000Z","model_policy_check","alice@example.com",'
            b'"contractor-pool",{"model":"o1-pro","policy_mode":"allowlist","result":"denied"}]',
        ),
        (
            AuditEntry(7, "2026-05-17T00:00:00.000001Z", "proxy_start", None, None, {}),
            b'[7,"2026-05-17T00:00:00.000001Z","proxy_start",null,null,{}]',
        ),
        (
            AuditEntry(
                2, "t", "a", "\u00e9", None, {"b": [1, 2.5, None], "a": {"z": True, "y": "\u2603"}}
            ),
            b'[2,"t","a","\\u00e9",null,{"a":{"y":"\\u2603","z":true},"b":[1,2.5,null]}]',
        ),
    ],
)
def test_canonical_encoding(entry: AuditEntry, expected: bytes) -> None:
    assert canonical_encoding(entry) == expected


def test_key_order_does_not_change_the_encoding() -> None:
    a = AuditEntry(1, "t", "x", None, None, {"a": 1, "b": {"c": 2, "d": 3}})
    b = AuditEntry(1, "t", "x", None, None, {"b": {"d": 3, "c": 2}, "a": 1})
    assert canonical_encoding(a) == canonical_encoding(b)


def test_entry_hash_is_domain_separated_sha256_over_prev_and_encoding() -> None:
    prev = "ab" * 32
    want = hashlib.sha256(
        b"candela.audit.entry.v1\x00" + bytes.fromhex(prev) + canonical_encoding(ENTRY)
    ).hexdigest()
    assert entry_hash(prev, ENTRY) == want
    assert (
        entry_hash(prev, ENTRY)
        != hashlib.sha256(bytes.fromhex(prev) + canonical_encoding(ENTRY)).hexdigest()
    )
    assert (
        row_hash(
            prev,
            1,
            ENTRY.ts,
            ENTRY.action,
            ENTRY.user_id,
            ENTRY.tenant_id,
            fields_json(ENTRY.fields),
        )
        == want
    )


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 2},
        {"ts": "2026-05-17T00:00:00.000001Z"},
        {"action": "request"},
        {"user_id": "mallory@example.com"},
        {"user_id": None},
        {"tenant_id": "research-team"},
        {"fields": {**ENTRY.fields, "result": "allowed"}},
        {"fields": {**ENTRY.fields, "extra": None}},
    ],
)
def test_every_part_of_an_entry_is_covered(change: dict) -> None:
    changed = AuditEntry(**{**ENTRY.__dict__, **change})
    assert entry_hash(GENESIS_HASH, changed) != entry_hash(GENESIS_HASH, ENTRY)


def test_previous_hash_is_covered() -> None:
    assert entry_hash(GENESIS_HASH, ENTRY) != entry_hash("11" * 32, ENTRY)


def test_equal_but_reformatted_fields_still_verify() -> None:
    digest = entry_hash(GENESIS_HASH, ENTRY)
    spaced = '{ "result": "denied", "policy_mode": "allowlist", "model": "o1-pro" }'
    rows = [
        (1, ENTRY.ts, ENTRY.action, ENTRY.user_id, ENTRY.tenant_id, spaced, GENESIS_HASH, digest)
    ]
    assert verify_rows(rows).ok


# -- the ledger file ---------------------------------------------------------------------------


def test_fresh_log_verifies(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    build_log(db)
    result = verify_chain(db)
    assert (result.ok, result.count, result.head_seq, result.first_bad_seq) == (True, N, N, None)
    conn = sqlite3.connect(db)
    assert result.head_hash == row(conn, N)[7]
    assert row(conn, 1)[6] == GENESIS_HASH
    # timestamps never go backwards along the chain
    ts = [r[0] for r in conn.execute("SELECT ts FROM audit_log ORDER BY seq")]
    assert ts == sorted(ts)


def test_empty_log_verifies(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    connect_writer(db)[0].close()
    result = verify_chain(db)
    assert (result.ok, result.count, result.head_seq, result.head_hash) == (
        True,
        0,
        0,
        GENESIS_HASH,
    )


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_log SET action = 'nothing' WHERE seq = 3",
        "DELETE FROM audit_log WHERE seq = 3",
        "DELETE FROM audit_log",
        "UPDATE audit_meta SET value = 'x' WHERE key = 'log_id'",
        "DELETE FROM audit_meta",
    ],
)
def test_triggers_reject_update_and_delete(tmp_path: Path, sql: str) -> None:
    db = tmp_path / "audit.db"
    build_log(db)
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(sql)
    assert verify_chain(db).ok


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_log SET action = 'x' WHERE seq = 3",
        "DELETE FROM audit_log WHERE seq = 3",
        "DROP TRIGGER audit_log_no_update",
        "DROP TABLE audit_log",
        "ALTER TABLE audit_log RENAME TO old",
    ],
)
def test_writer_connection_refuses_rewrites_even_without_triggers(tmp_path: Path, sql: str) -> None:
    db = tmp_path / "audit.db"
    build_log(db)
    conn, _ = connect_writer(db)
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        conn.execute(sql)
    conn.close()


def test_writer_connection_is_in_defensive_mode(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    conn, defensive = connect_writer(db)
    assert defensive
    conn.execute("PRAGMA writable_schema = ON")
    with pytest.raises(sqlite3.DatabaseError, match="may not be modified"):
        conn.execute("UPDATE sqlite_master SET sql = sql WHERE name = 'audit_log'")
    conn.close()
    # the same statement works on a plain connection: the refusal above is defensive mode's
    plain = sqlite3.connect(db)
    plain.execute("PRAGMA writable_schema = ON")
    plain.execute("UPDATE sqlite_master SET sql = sql WHERE name = 'audit_log'")
    plain.close()


# -- tampering, each detected at the right entry ---------------------------------------------------


def _renumber_from(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("UPDATE audit_log SET seq = seq + 100000 WHERE seq >= ?", (seq,))
    conn.execute("UPDATE audit_log SET seq = seq - 99999 WHERE seq >= 100000")


def edit_field(conn: sqlite3.Connection) -> None:
    conn.execute(
        """UPDATE audit_log SET fields = replace(fields, '"i":8', '"i":80') WHERE seq = 8"""
    )


def edit_action(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET action = 'proxy_start' WHERE seq = 5")


def edit_user(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET user_id = 'someone-else' WHERE seq = 3")


def edit_ts(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET ts = '2020-01-01T00:00:00.000000Z' WHERE seq = 12")


def delete_middle(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 10")


def delete_first(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 1")


def delete_and_close_gap(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 10")
    conn.execute("UPDATE audit_log SET seq = seq + 100000 WHERE seq > 10")
    conn.execute("UPDATE audit_log SET seq = seq - 100001 WHERE seq > 100000")


def _swap(conn: sqlite3.Connection, a: int, b: int) -> None:
    conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = ?", (a,))
    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (a, b))
    conn.execute("UPDATE audit_log SET seq = ? WHERE seq = -1", (b,))


def swap_rows(conn: sqlite3.Connection) -> None:
    _swap(conn, 5, 9)


def swap_adjacent(conn: sqlite3.Connection) -> None:
    _swap(conn, 14, 15)


def insert_naive(conn: sqlite3.Connection) -> None:
    prev = row(conn, 9)[7]
    _renumber_from(conn, 10)
    conn.execute(
        "INSERT INTO audit_log VALUES (10, ?, 'request', 'ghost', NULL, '{}', ?, ?)",
        (row(conn, 9)[1], prev, "ee" * 32),
    )


def insert_forged(conn: sqlite3.Connection) -> None:
    # a perfectly hashed entry: on its own it is indistinguishable, so the break shows right after
    prev_row = row(conn, 9)
    _renumber_from(conn, 10)
    digest = row_hash(prev_row[7], 10, prev_row[1], "request", "ghost", None, "{}")
    conn.execute(
        "INSERT INTO audit_log VALUES (10, ?, 'request', 'ghost', NULL, '{}', ?, ?)",
        (prev_row[1], prev_row[7], digest),
    )


def rehash_one(conn: sqlite3.Connection) -> None:
    r = row(conn, 7)
    digest = row_hash(r[6], 7, r[1], "request", "mallory", r[4], r[5])
    conn.execute("UPDATE audit_log SET user_id = 'mallory', hash = ? WHERE seq = 7", (digest,))


def append_bad(conn: sqlite3.Connection) -> None:
    last = row(conn, N)
    conn.execute(
        "INSERT INTO audit_log VALUES (?, ?, 'request', 'ghost', NULL, '{}', ?, ?)",
        (N + 1, last[1], last[7], "00" * 32),
    )


def negative_seq(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO audit_log VALUES (0, 'x', 'request', 'ghost', NULL, '{}', ?, ?)",
        (GENESIS_HASH, "00" * 32),
    )


def bad_json(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE audit_log SET fields = '{not json' WHERE seq = 4")


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        (edit_field, 8, "hash does not match"),
        (edit_action, 5, "hash does not match"),
        (edit_user, 3, "hash does not match"),
        (edit_ts, 12, "hash does not match"),
        (bad_json, 4, "hash does not match"),
        (delete_middle, 10, "entry 10 is missing"),
        (delete_first, 1, "entry 1 is missing"),
        (delete_and_close_gap, 10, "prev_hash does not match"),
        (swap_rows, 5, "prev_hash does not match"),
        (swap_adjacent, 14, "prev_hash does not match"),
        (insert_naive, 10, "hash does not match"),
        (insert_forged, 11, "prev_hash does not match"),
        (rehash_one, 8, "prev_hash does not match"),
        (append_bad, N + 1, "hash does not match"),
        (negative_seq, 0, "unexpected entry 0"),
    ],
)
def test_tampering_is_detected_at_the_first_bad_entry(
    tmp_path: Path,
    tamper: Callable[[sqlite3.Connection], None],
    first_bad: int,
    reason: str,
    capsys,
) -> None:
    db = tmp_path / "audit.db"
    build_log(db)
    conn = attacker(db)
    tamper(conn)
    conn.close()
    result = verify_chain(db)
    assert not result.ok
    assert result.first_bad_seq == first_bad
    assert reason in result.reason
    assert audit_main(["--db", str(db), "verify"]) == 1
    err = capsys.readouterr().err
    assert f"first bad seq: {first_bad}" in err


def test_truncation_and_rewrite_leave_a_valid_chain_so_checkpoints_are_needed(
    tmp_path: Path,
) -> None:
    db = tmp_path / "audit.db"
    build_log(db)
    conn = attacker(db)
    conn.execute("DELETE FROM audit_log WHERE seq > 15")
    conn.close()
    result = verify_chain(db)
    assert (result.ok, result.count) == (True, 15)  # see test_audit_checkpoint for the detection


@pytest.mark.parametrize(("from_seq", "count"), [(1, N), (5, N - 4), (N, 1), (N + 1, 0)])
def test_verify_from(tmp_path: Path, from_seq: int, count: int) -> None:
    db = tmp_path / "audit.db"
    build_log(db)
    result = verify_chain(db, from_seq)
    assert (result.ok, result.count, result.head_seq) == (True, count, N)


def test_verify_from_skips_damage_before_the_start(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    build_log(db)
    conn = attacker(db)
    edit_field(conn)
    conn.close()
    assert verify_chain(db, 9).ok
    assert verify_chain(db, 8).first_bad_seq == 8
    assert verify_chain(db, 3).first_bad_seq == 8


def test_verify_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        verify_chain(tmp_path / "nope.db")
    assert audit_main(["--db", str(tmp_path / "nope.db"), "verify"]) == 2
    assert not (tmp_path / "nope.db").exists()


_FIELD_TABLE: list[dict] = [
    {},
    {"result": "allowed", "model": "gpt-4o-mini", "tenant_id": None, "user_id": "alice"},
    {"z": 1, "a": -2, "m": 1.5, "b": True, "n": None, "f": 0.1 + 0.2, "big": 10**30},
    {"text": "caf\u00e9 \u2603 \U0001f600 \"q\" \\ \n\t\x00", "\u00e9key": "v"},
    {"nested": {"b": [1, {"y": 2, "x": [None, "s"]}], "a": ()}, "list": [3, 2, 1]},
    {"tier": "priority", "cost_usd": 1e-9, "tokens": 0, "neg": -0.0},
]


@pytest.mark.parametrize("fields", _FIELD_TABLE)
def test_fields_json_acyclic_is_fields_json(fields: dict) -> None:
    assert fields_json_acyclic(fields) == fields_json(fields)


@pytest.mark.parametrize(
    "fields", [{"x": float("nan")}, {"x": float("inf")}, {"x": object()}, {"s": {1, 2}}]
)
def test_fields_json_acyclic_refuses_what_fields_json_refuses(fields: dict) -> None:
    with pytest.raises((TypeError, ValueError)) as plain:
        fields_json(fields)
    with pytest.raises(type(plain.value)) as fast:
        fields_json_acyclic(fields)
    assert str(fast.value) == str(plain.value)


@pytest.mark.parametrize(
    "head",
    [
        (1, "2026-05-17T00:00:00.000000Z", "llm_request", "alice@example.com", "research-team"),
        (2**63, "t", "x", None, None),
        (0, "caf\u00e9 \u2603 \U0001f600", '"q" \\ \n\t\x00', "\u00e9", "\x7f</script>"),
    ],
)
def test_a_rows_hash_covers_its_head_as_json_dumps_writes_it(head: tuple) -> None:
    # the writer encodes the head with a C encoder made once: the bytes json.dumps would write
    seq, ts, action, user_id, tenant_id = head
    text = fields_json({"a": 1})
    plain = json.dumps([seq, ts, action, user_id, tenant_id], separators=(",", ":"))
    want = hashlib.sha256(
        b"candela.audit.entry.v1\x00"
        + bytes.fromhex(GENESIS_HASH)
        + (plain[:-1] + "," + text + "]").encode()
    ).hexdigest()
    assert row_hash(GENESIS_HASH, seq, ts, action, user_id, tenant_id, text) == want


def _iso_of(ns: int) -> str:
    at = datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=ns // 1000 % 10**6)
    return at.isoformat(timespec="microseconds")[:-6] + "Z"


def test_now_ts_is_isoformat_to_the_microsecond_truncated() -> None:
    # the second's text is kept between calls: each call, and each change of second, checked
    base = 1_780_000_000 * 10**9
    for ns in [base, base + 999_999_999, base + 10**9, base + 10**9 + 1_999, base - 1,
               base + 86_400 * 10**9 + 5_000, 0, base + 10**9 + 7_000]:  # fmt: skip
        assert now_ts(ns) == _iso_of(ns)
    before = datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    now = now_ts()
    after = datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    assert before <= now <= after and len(now) == len("2026-05-17T00:00:00.000000Z")
