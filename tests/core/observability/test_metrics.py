import json
import re
import sqlite3
from pathlib import Path

import pytest

from candela_mitm.observability.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[3] / "grafana" / "candela-dashboard.json"


def series_names(m: Metrics) -> set[str]:
    text, _ = m.render()
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.decode().splitlines()
        if line and not line.startswith("#")
    } | {name for name in re.findall(r"^# TYPE (\S+)", text.decode(), re.M)}


def test_render_has_every_series_the_issue_names():
    m = Metrics()
    m.requests.labels("openai", "gpt-4o", "t", "200").inc()
    m.policy_denied.labels("o1-pro", "t", "allowlist").inc()
    m.cost.labels("openai", "gpt-4o", "t").inc(0.5)
    m.tokens.labels("openai", "gpt-4o", "t", "input").inc(10)
    m.duration.labels("openai").observe(0.2)
    m.ttft.labels("openai").observe(0.05)
    m.bypass_attempts.labels("connect4").inc()
    text, ctype = m.render()
    assert ctype.startswith("text/plain")
    body = text.decode()
    for name in (
        "candela_requests_total",
        "candela_policy_model_denied_total",
        "candela_cost_usd_total",
        "candela_tokens_total",
        "candela_request_duration_seconds_bucket",
        "candela_time_to_first_token_seconds_bucket",
        "candela_bypass_attempts_total",
        "candela_audit_backlog",
    ):
        assert name in body


def test_a_failing_scrape_refresher_is_counted_not_raised():
    m = Metrics()

    def boom():
        raise RuntimeError("x")

    m.on_scrape(boom)
    text, _ = m.render()
    assert 'candela_observability_errors_total{component="metrics"} 1.0' in text.decode()


def test_the_settings_watch_is_shown_at_each_scrape():
    from candela_mitm.governance.settings_watch import WatchState

    m = Metrics()
    states = [WatchState(False, None), WatchState(True, 7), RuntimeError("watch gone")]

    def state() -> WatchState:
        s = states.pop(0)
        if isinstance(s, Exception):
            raise s
        return s

    m.watch_settings(state)
    shown = []
    for _ in range(3):
        body = m.render()[0].decode()
        shown.append(
            tuple(
                re.search(rf"^{name} (\S+)$", body, re.M).group(1)
                for name in ("candela_settings_watch_current", "candela_settings_generation_seen")
            )
        )
    # the third read failed: the values shown last stay, the failure is counted
    assert shown == [("0.0", "-1.0"), ("1.0", "7.0"), ("1.0", "7.0")]
    assert 'candela_observability_errors_total{component="metrics"} 1.0' in body
    m.settings_polls.labels("failed").inc()
    m.settings_changes.inc()
    body = m.render()[0].decode()
    assert 'candela_settings_polls_total{outcome="failed"} 1.0' in body
    assert "candela_settings_changes_total 1.0" in body


def test_grafana_dashboard_uses_only_series_that_exist():
    m = Metrics()
    m.duration.labels("x").observe(1)
    m.ttft.labels("x").observe(1)
    known = series_names(m)
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"candela_[a-z_]+", e)}
    assert used, "the dashboard queries nothing"
    missing = {
        u for u in used if u not in known and u.removesuffix("_bucket") + "_bucket" not in known
    }
    assert not missing, missing


# -- candela_bypass_attempts_total, read from the audit ledger ---------------------------------


def bypass_counts(m: Metrics) -> dict[str, float]:
    text = m.render()[0].decode()
    pattern = r'^candela_bypass_attempts_total\{kind="([^"]+)"\} (\S+)$'
    return {kind: float(n) for kind, n in re.findall(pattern, text, re.M)}


def write_entries(db: Path, entries: list[tuple[str, dict[str, object]]]) -> None:
    from candela_mitm.audit import AuditWriter
    from candela_mitm.config import Audit

    w = AuditWriter(Audit(sqlite_path=str(db)))
    w.start()
    try:
        for action, fields in entries:
            assert w.record(action, **fields)
    finally:
        assert w.close()


def bypass(reason: str, **more: object) -> tuple[str, dict[str, object]]:
    return "bypass_attempt", {"reason": reason, "pid": 7, "comm": "curl", **more}


@pytest.mark.parametrize(
    "batches, expected",
    [
        ([[]], [{}]),
        ([[bypass("not_allowed")]], [{"not_allowed": 1}]),
        (
            # the proxy's host refusals and a sandbox's, between entries of other actions
            [
                [bypass("provider_port", enforcement="host"), ("request", {"reason": "x"})],
                [bypass("not_allowed", sandbox="candela-0"), bypass("provider_port")],
            ],
            [{"provider_port": 1}, {"provider_port": 2, "not_allowed": 1}],
        ),
        ([[("bypass_attempt", {"pid": 1})], []], [{"unknown": 1}, {"unknown": 1}]),
    ],
)
def test_bypass_attempts_are_counted_from_the_audit_ledger_once_each(
    tmp_path: Path,
    batches: list[list[tuple[str, dict[str, object]]]],
    expected: list[dict[str, float]],
) -> None:
    db = tmp_path / "audit.db"
    m = Metrics()
    follower = m.follow_audit(db)
    assert bypass_counts(m) == {}  # no ledger yet: nothing, and no error
    for batch, want in zip(batches, expected, strict=True):
        write_entries(db, batch)
        assert bypass_counts(m) == want
        assert bypass_counts(m) == want  # a second scrape adds nothing
    # a process started later (a worker, a restart) reports the same total
    later = Metrics()
    later.follow_audit(db)
    assert bypass_counts(later) == expected[-1]
    with sqlite3.connect(db) as conn:
        (newest,) = conn.execute(
            "SELECT coalesce(max(seq), 0) FROM audit_log WHERE action = 'bypass_attempt'"
        ).fetchone()
    assert follower.seq == newest
    assert "candela_observability_errors_total{" not in m.render()[0].decode()


def test_exposition_never_refreshes_and_refresh_runs_every_refresher():
    m = Metrics()
    calls = []
    m.on_scrape(lambda: calls.append("a"))
    m.on_scrape(lambda: calls.append("b"))
    m.exposition()
    assert calls == []  # in memory only: safe on the event loop
    m.refresh()
    assert calls == ["a", "b"]
    m.render()
    assert calls == ["a", "b", "a", "b"]


@pytest.mark.parametrize(
    "estimate, cost, counted",
    [
        (0.10, 0.05, 0),  # under the reservation
        (0.10, 0.10, 0),  # exactly at it
        (0.10, 0.1000000000001, 0),  # float noise is not an overrun
        (0.10, 0.11, 1),
        (0.0, 0.11, 0),  # nothing reserved (a local model, unknown_model_price: zero)
    ],
)
def test_estimate_exceeded_counts_a_cost_above_its_reservation(estimate, cost, counted):
    m = Metrics()
    m.note_cost("openai", "gpt-4o", estimate, cost)
    value = m.registry.get_sample_value(
        "candela_estimate_exceeded_total", {"provider": "openai", "model": "gpt-4o"}
    )
    assert (value or 0) == counted
