import json
import re
from pathlib import Path

from candela_mitm.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "candela-dashboard.json"


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
