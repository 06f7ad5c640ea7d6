"""The audit trail: a hash-chained, append-only SQLite ledger with DuckDB and BigQuery mirrors."""

from __future__ import annotations

from candela_mitm.audit.actions import (
    ADMIN_ACTION,
    BYPASS_ATTEMPT,
    CONFIG_RELOAD,
    LLM_REQUEST,
    MODEL_POLICY_CHECK,
    PROXY_START,
    PROXY_STOP,
)
from candela_mitm.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    VerifyResult,
    canonical_encoding,
    entry_hash,
    verify_chain,
)
from candela_mitm.audit.checkpoint import verify_with_checkpoints
from candela_mitm.audit.mirrors import MirrorStats
from candela_mitm.audit.query import export, query_entries, run_query
from candela_mitm.audit.writer import AuditStats, AuditWriter

__all__ = [
    "BYPASS_ATTEMPT",
    "CONFIG_RELOAD",
    "GENESIS_HASH",
    "MODEL_POLICY_CHECK",
    "PROXY_START",
    "PROXY_STOP",
    "LLM_REQUEST",
    "ADMIN_ACTION",
    "AuditEntry",
    "AuditStats",
    "AuditWriter",
    "MirrorStats",
    "VerifyResult",
    "canonical_encoding",
    "entry_hash",
    "export",
    "query_entries",
    "run_query",
    "verify_chain",
    "verify_with_checkpoints",
]
