"""`candela policy replay` over a log written by the real audit writer."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from candela_mitm.audit import AuditWriter
from candela_mitm.audit.query import export
from candela_mitm.cli.main import local_main
from candela_mitm.cli.policy import EXIT_OK, EXIT_USAGE, parse_since
from candela_mitm.config import Audit

CANDIDATE = {
    "governance": {
        "models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]},
        "tenants": {"fin": {"budget_usd": 0.005, "period": "monthly"}},
    },
    "users": {"alice": {"daily_budget_usd": 0.01}, "dave": {"tenants": ["fin"]}},
}

# (user, tenant, model, decision, reason, cost, estimate): recorded under a policy that let
# every model and budget through, except carol's
REQUESTS = [
    ("alice", None, "gpt-4o-mini", "allowed", None, 0.004, 0.004),
    ("alice", None, "gpt-4o-mini", "allowed", None, 0.004, 0.004),
    ("alice", None, "gpt-4o-mini", "allowed", None, 0.004, 0.004),  # 0.012 > 0.01
    ("bob", None, "gpt-4o", "allowed", None, 0.003, 0.005),  # not on the allowlist
    ("carol", None, "gpt-4o-mini", "denied", "budget_exceeded", 0.0, 0.002),
    ("dave", "fin", "gpt-4o-mini", "allowed", None, 0.003, 0.003),
    ("dave", "fin", "gpt-4o-mini", "allowed", None, 0.003, 0.003),  # the tenant's 0.005
    (None, None, None, "denied", "unauthenticated", 0.0, 0.0),  # not judged
]


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, list[str]]:
    """A ledger written by the AuditWriter; the entries' times, in seq order."""
    cfg = Audit(sqlite_path=str(tmp_path / "audit.db"), batch_max_delay_ms=1)
    writer = AuditWriter(cfg)
    writer.start()
    try:
        writer.record_durable("proxy.start", pid=1).result(10)
        for user, tenant, model, decision, reason, cost, estimate in REQUESTS:
            writer.record_durable(
                "llm_request", user_id=user, tenant_id=tenant, provider="openai", model=model,
                decision=decision, reason=reason, input_tokens=100, output_tokens=20,
                cost_usd=cost, estimate_usd=estimate, duration_ms=0.0, usage_source="reported",
            ).result(10)
    finally:
        writer.close()
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        times = [r[0] for r in conn.execute(
            "SELECT ts FROM audit_log WHERE action = 'llm_request' ORDER BY seq"
        )]
    (tmp_path / "candidate.yaml").write_text(
        yaml.safe_dump({**CANDIDATE, "audit": {"sqlite_path": str(tmp_path / "audit.db")}})
    )
    return tmp_path / "candidate.yaml", [t[:23] + "Z" for t in times]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = local_main(["policy", "replay", *argv])
    out, err = capsys.readouterr()
    return code, out, err


EXPECTED_TABLE = """\
Policy replay of {candidate}: 7 requests judged ({t[0]} to {t[6]})

user   tenant  judged  newly_denied  newly_allowed  recorded_usd  avoided_usd  added_usd_est
-----  ------  ------  ------------  -------------  ------------  -----------  -------------
alice  -       3       1             0              0.012000      0.004000     0.000000
bob    -       1       1             0              0.003000      0.003000     0.000000
carol  -       1       0             1              0.000000      0.000000     0.002000
dave   fin     2       1             0              0.006000      0.003000     0.000000
total          7       3             1              0.021000      0.010000     0.002000
(5 rows)

Changed requests
seq  started_at                user   tenant  model        recorded                candidate                                cost_usd
---  ------------------------  -----  ------  -----------  ----------------------  ---------------------------------------  --------
4    {t[2]}  alice  -       gpt-4o-mini  allowed                 denied budget_exceeded (user,daily)      0.004000
5    {t[3]}  bob    -       gpt-4o       allowed                 denied model_not_allowed (allowlist)     0.003000
6    {t[4]}  carol  -       gpt-4o-mini  denied budget_exceeded  allowed                                  0.000000
8    {t[6]}  dave   fin     gpt-4o-mini  allowed                 denied budget_exceeded (tenant,monthly)  0.003000
(4 rows)
"""


def test_replay_prints_the_expected_table(
    recorded: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    candidate, times = recorded
    code, out, err = run(capsys, "--config", str(candidate))
    assert code == EXIT_OK, err
    assert out == EXPECTED_TABLE.format(candidate=candidate, t=times)
    assert err == ""  # progress goes to a terminal only


def test_replay_json(recorded: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    candidate, times = recorded
    code, out, _ = run(capsys, "--config", str(candidate), "--format", "json", "--since", "1h")
    assert code == EXIT_OK
    report = json.loads(out)
    assert report["totals"] == {
        "judged": 7, "newly_denied": 3, "newly_allowed": 1, "recorded_spend_usd": 0.021,
        "spend_avoided_usd": 0.01, "estimated_spend_added_usd": 0.002,
    }
    assert [(c["seq"], c["change"], c["candidate"]) for c in report["changes"]] == [
        (4, "newly_denied", {"decision": "denied", "code": "budget_exceeded", "scope": "user",
                             "period": "daily"}),
        (5, "newly_denied", {"decision": "denied", "code": "model_not_allowed",
                             "policy": "allowlist"}),
        (6, "newly_allowed", {"decision": "allowed", "code": None}),
        (8, "newly_denied", {"decision": "denied", "code": "budget_exceeded", "scope": "tenant",
                             "period": "monthly"}),
    ]
    assert [c["started_at"] for c in report["changes"]] == [times[2], times[3], times[4], times[6]]
    assert report["scopes"][3] == {
        "user_id": "dave", "tenant_id": "fin", "judged": 2, "newly_denied": 1,
        "newly_allowed": 0, "recorded_spend_usd": 0.006, "spend_avoided_usd": 0.003,
        "estimated_spend_added_usd": 0.0,
    }


def test_replay_reads_a_parquet_export(
    recorded: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    candidate, _ = recorded
    export(tmp_path / "audit.db", "parquet", tmp_path / "audit.parquet")
    code, out, _ = run(
        capsys, "--config", str(candidate), "--audit", str(tmp_path / "audit.parquet"),
        "--format", "json",
    )
    assert code == EXIT_OK
    assert json.loads(out)["totals"]["newly_denied"] == 3


def test_a_later_since_reports_nothing_earlier(
    recorded: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    candidate, _ = recorded
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    code, out, _ = run(capsys, "--config", str(candidate), "--since", later, "--format", "json")
    assert code == EXIT_OK
    report: dict[str, Any] = json.loads(out)
    assert report["totals"]["judged"] == 0 and report["warmup_requests"] == 7


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({"governance": {"budgets": {"periodd": "weekly"}}}, "governance.budgets.periodd: unknown key"),
        ({"users": {"a": {"budget_period": "yearly"}}}, "users.a.budget_period"),
    ],
)
def test_an_invalid_candidate_is_refused_naming_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], candidate: dict[str, Any], message: str
) -> None:
    path = tmp_path / "candidate.yaml"
    path.write_text(yaml.safe_dump(candidate))
    code, out, err = run(capsys, "--config", str(path), "--audit", str(tmp_path / "none.db"))
    assert code == EXIT_USAGE and out == ""
    assert message in err


def test_a_missing_log_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "candidate.yaml"
    path.write_text("{}\n")
    code, _, err = run(capsys, "--config", str(path), "--audit", str(tmp_path / "none.db"))
    assert code == EXIT_USAGE and "no audit log" in err


def test_parse_since() -> None:
    now = datetime(2026, 11, 18, 12, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_since("last week", now)


class _Terminal:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_goes_to_a_terminal_only(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    from candela_mitm.cli.progress import Progress

    term = _Terminal(tty)
    monkeypatch.delenv("CANDELA_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    with Progress("replay", "requests", stream=term, interval_s=0) as p:  # type: ignore[arg-type]
        p.update(0, 20_000)
        p.update(20_000, 20_000)
        drawn = term.text
    assert ("replay: 20,000 of 20,000 requests (100%)" in drawn) is tty
    assert term.text == ("" if not tty else drawn + "\r\x1b[K")  # erased at the end


def test_state_judges_users_and_tenants_as_the_admin_api_set_them(
    recorded: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from candela_mitm.state.ports import TenantRecord, UserRecord
    from candela_mitm.state.sqlite import SqliteStateStore

    candidate, _ = recorded
    cfg = yaml.safe_load(candidate.read_text())
    cfg["state"] = {"sqlite_path": str(tmp_path / "state.db")}
    candidate.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "--config", str(candidate), "--state")
    assert code == EXIT_USAGE and "no state store" in err  # never created by a replay
    with SqliteStateStore(tmp_path / "state.db") as store:
        store.put_user(UserRecord("alice", daily_budget_usd=1.0))  # wins over the candidate's
        store.put_tenant(TenantRecord("fin", budget_usd=1.0))
    code, out, _ = run(capsys, "--config", str(candidate), "--state", "--format", "json")
    assert code == EXIT_OK
    assert [(c["seq"], c["candidate"]["code"]) for c in json.loads(out)["changes"]] == [
        (5, "model_not_allowed"),
        (6, None),
    ]
    code, out, _ = run(capsys, "--config", str(candidate), "--format", "json")  # config alone
    assert len(json.loads(out)["changes"]) == 4
