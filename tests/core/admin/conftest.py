"""The admin API tests' Runtime: SQLite state and audit in a temporary directory, three keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from candela_mitm.config import parse_config
from candela_mitm.runtime import Runtime, build_runtime
from tests.core.admin.support import ADMIN, ALICE, BOB, sha


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    cfg = parse_config(
        {
            "state": {"sqlite_path": str(tmp_path / "state.db")},
            "audit": {"sqlite_path": str(tmp_path / "audit.db")},
            "auth": {
                "api_keys": [
                    {"sha256": sha("a"), "user": ALICE},
                    {"sha256": sha("b"), "user": BOB},
                    {"sha256": sha("c"), "user": ADMIN},
                ],
                "admins": [ADMIN],
            },
            "users": {
                ALICE: {
                    "tenants": ["research-team"],
                    "daily_budget_usd": 20.0,
                    "requests_per_minute": 120,
                }
            },
            "governance": {"budgets": {"default_daily_usd": 10.0}},
        }
    )
    runtime = build_runtime(cfg, "server")
    yield runtime
    runtime.close()
    runtime.store.close()


