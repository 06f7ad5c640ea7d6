"""Admin API: the audit log, read back (GET /audit)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, date, datetime
from typing import Any

from candela_mitm import errors
from candela_mitm.admin.base import AUDIT_FLUSH_TIMEOUT_S, AdminBase
from candela_mitm.admin.openapi import openapi_document
from candela_mitm.admin.params import (
    DEFAULT_AUDIT_LIMIT,
    MAX_AUDIT_LIMIT,
    MAX_SEQ,
)
from candela_mitm.admin.parsing import int_param, moment_param
from candela_mitm.admin.routes import AdminResponse, Handled
from candela_mitm.audit.query import AuditScope, query_entries
from candela_mitm.audit.writer import AuditWriter
from candela_mitm.errors import Refused


class AuditLog(AdminBase):
    """The /audit route."""

    def audit(self, _r: Any, _p: Any, q: dict[str, str], _b: Any) -> Handled:
        return audit_page(self.rt.audit, q)

    def openapi(self, _r: Any, _p: Any, _q: Any, _b: Any) -> Handled:
        return AdminResponse(200, openapi_document())


def audit_page(audit: AuditWriter, q: dict[str, str], scope: AuditScope | None = None) -> Handled:
    """One page of the audit log, newest first (`scope`: what a tenant admin may read)."""
    since = moment_param(q, "since")
    limit = int_param(q, "limit", 1, MAX_AUDIT_LIMIT)
    before_seq = int_param(q, "before_seq", 1, MAX_SEQ)
    if isinstance(since, date) and not isinstance(since, datetime):
        since = datetime(since.year, since.month, since.day, tzinfo=UTC)
    n = limit or DEFAULT_AUDIT_LIMIT
    # entries queued by this process (an admin change just made) are shown, not missed
    audit.flush(AUDIT_FLUSH_TIMEOUT_S)
    try:
        entries = query_entries(
            audit.db_path,
            action=q.get("action"),
            user=q.get("user"),
            since=since,
            limit=n,
            before_seq=before_seq,
            scope=scope,
        )
    except FileNotFoundError:
        entries = []
    except sqlite3.Error:
        raise Refused(errors.governance_unavailable("the audit log cannot be read")) from None
    return AdminResponse(
        200,
        {
            "count": len(entries),
            "next_before_seq": entries[-1]["seq"] if len(entries) == n else None,
            "entries": entries,
        },
    )
