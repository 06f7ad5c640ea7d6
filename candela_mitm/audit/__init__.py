"""The audit trail: a hash-chained, append-only SQLite ledger with DuckDB and BigQuery mirrors."""

from __future__ import annotations

from candela_mitm.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    VerifyResult,
    canonical_encoding,
    entry_hash,
    verify_chain,
)
from candela_mitm.audit.checkpoint import verify_with_checkpoints
from candela_mitm.audit.cli import audit_main
from candela_mitm.audit.mirrors import MirrorStats
from candela_mitm.audit.query import export, query_entries, run_query
from candela_mitm.audit.writer import (
    BYPASS_ATTEMPT,
    CONFIG_RELOAD,
    MODEL_POLICY_CHECK,
    PROXY_START,
    PROXY_STOP,
    REQUEST,
    AuditStats,
    AuditWriter,
)

__all__ = [
    "BYPASS_ATTEMPT",
    "CONFIG_RELOAD",
    "GENESIS_HASH",
    "MODEL_POLICY_CHECK",
    "PROXY_START",
    "PROXY_STOP",
    "REQUEST",
    "AuditEntry",
    "AuditStats",
    "AuditWriter",
    "MirrorStats",
    "VerifyResult",
    "audit_main",
    "canonical_encoding",
    "entry_hash",
    "export",
    "query_entries",
    "run_query",
    "verify_chain",
    "verify_with_checkpoints",
]
