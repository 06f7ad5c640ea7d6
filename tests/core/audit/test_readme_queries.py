"""The DuckDB queries the README shows run against a real audit log and answer what they claim."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from candela_mitm.audit import AuditWriter
from candela_mitm.config import Audit

README = Path(__file__).resolve().parents[3] / "README.md"
CANDELA = str(Path(sys.executable).parent / "candela")


def readme_queries() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README shows no SQL"
    out = []
    for block in blocks:
        for stmt in block.split(";"):
            lines = [ln for ln in stmt.strip().splitlines() if not ln.strip().startswith("--")]
            if lines:
                out.append("\n".join(lines))
    return out


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("readme") / "audit.db"
    w = AuditWriter(Audit(sqlite_path=str(path)))
    w.start()
    for tenant, model, cost, decision, reason in [
        ("research-team", "gpt-4o", 0.5, "allowed", None),
        ("research-team", "gpt-4o", 0.25, "allowed", None),
        ("contractor-pool", "gpt-4o-mini", 0.125, "allowed", None),
        ("contractor-pool", "o1-pro", 0.0, "denied", "model_not_allowed"),
        ("contractor-pool", "o1-pro", 0.0, "denied", "model_not_allowed"),
    ]:
        w.record("llm_request", user_id="bob@example.com", tenant_id=tenant, model=model, cost_usd=cost,
                 decision=decision, reason=reason)
    w.record("admin_action", actor="admin@example.com", action="user.delete", target="bob@example.com",
             before={"role": "developer"}, after=None)
    assert w.flush(10)
    w.close()
    return path


def run(db: Path, sql: str) -> list[dict]:
    p = subprocess.run([CANDELA, "audit", "--db", str(db), "query", sql, "--format", "json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_readme_queries_answer_what_they_claim(db):
    spend, denials, history = readme_queries()
    rows = run(db, spend)
    by_tenant = {r["tenant_id"]: r for r in rows}
    assert by_tenant["research-team"]["spend_usd"] == pytest.approx(0.75)
    assert by_tenant["research-team"]["requests"] == 2
    assert by_tenant["contractor-pool"]["spend_usd"] == pytest.approx(0.125)
    rows = run(db, denials)
    assert rows == [{"model": "o1-pro", "reason": "model_not_allowed", "denials": 2}]
    rows = run(db, history)
    assert len(rows) == 6 and rows[-1]["admin_action"] == "user.delete"
