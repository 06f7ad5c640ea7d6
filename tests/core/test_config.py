from pathlib import Path

import pytest
from pydantic import ValidationError

from candela_mitm.config import load_config, parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.governance.rate_leases import LeaseRules

EXAMPLE = Path(__file__).resolve().parents[3] / "shared" / "spec" / "config.example.yaml"


def test_example_loads_as_written():
    cfg = load_config(EXAMPLE)
    assert cfg.listen.port == 8181
    assert cfg.providers["anthropic"].project == "my-gcp-project"
    assert cfg.auth.api_keys[0].user == "alice@example.com"
    assert cfg.governance.models.tenants["research-team"].models.allowed[0] == "gpt-4o"
    assert cfg.pricing["gpt-4o-mini"].input == 0.15
    assert cfg.interception.hosts["api.openai.com"] == "openai"


def test_empty_file_is_valid(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("")
    cfg = load_config(p)
    assert cfg.mode == "reverse" and cfg.governance.budgets.default_daily_usd == 10.0


@pytest.mark.parametrize(
    "yaml_text, key_path, reason",
    [
        ("listen: {hots: 1.2.3.4}\n", "listen.hots", "unknown key"),
        (
            "governance: {budgets: {default_daily_usd: lots}}\n",
            "governance.budgets.default_daily_usd",
            "number",
        ),
        ("mode: sideways\n", "mode", "reverse"),
        ("providers: {openia: {base_url: x}}\n", "providers", "openia"),
        (
            "users: {bob: {tenants: [a], daily_budget: 3}}\n",
            "users.bob.daily_budget",
            "unknown key",
        ),
        ("auth: {api_keys: [{sha256: nothex, user: a}]}\n", "auth.api_keys.0.sha256", "pattern"),
        ("state: {backend: redis}\n", "state", "redis_url"),
        ("interception: {hosts: {api.x.com: nowhere}}\n", "interception.hosts", "nowhere"),
        (
            "governance: {budgets: {time_zone: Mars/Olympus}}\n",
            "governance.budgets.time_zone",
            "unknown time zone",
        ),
        ("governance: {budgets: {period: yearly}}\n", "governance.budgets.period", "daily"),
        (
            "governance: {tenants: {t: {budget_usd: -1}}}\n",
            "governance.tenants.t.budget_usd",
            "greater than or equal",
        ),
        ("governance: {tenants: {t: {period: hourly}}}\n", "governance.tenants.t.period", "monthly"),
        ("users: {bob: {budget_period: fortnightly}}\n", "users.bob.budget_period", "weekly"),
        ("interception: {hosts: {'*.com': openai}}\n", "interception.hosts[*.com]", "wildcard"),
        (
            "interception: {hosts: {'https://x.example/v1': openai}}\n",
            "interception.hosts[https://x.example/v1]",
            "no scheme, port or path",
        ),
        ("interception: {shared_edges: ['*']}\n", "interception.shared_edges.0", "wildcard"),
        (
            "governance: {budgets: {slices: {requests: 1}}}\n",
            "governance.budgets.slices.requests",
            "greater than or equal to 2",
        ),
        (
            "governance: {budgets: {slices: {enabled: true, headroom: 0}}}\n",
            "governance.budgets.slices.headroom",
            "greater than or equal to 2",
        ),
        ("governance: {budgets: {slices: {slice: 3}}}\n", "governance.budgets.slices.slice", "unknown key"),
        (
            "governance: {rate_limits: {leases: {idle_lifetime_ms: 60001}}}\n",
            "governance.rate_limits.leases.idle_lifetime_ms",
            "less than or equal to 60000",
        ),
        (
            "governance: {rate_limits: {leases: {lifetime_ms: 800, idle_lifetime_ms: 500}}}\n",
            "governance.rate_limits.leases",
            "at least lifetime_ms",
        ),
        (
            "governance: {budgets: {slices: {max_held: 0}}}\n",
            "governance.budgets.slices.max_held",
            "greater than or equal to 1",
        ),
        ("interception: {replace_provider_keys: [nowhere]}\n", "interception", "nowhere"),
        (
            "interception: {organisation_keys: [sk-raw]}\n",
            "interception.organisation_keys.0",
            "pattern",
        ),
    ],
)
def test_bad_key_names_file_path_and_reason(tmp_path, yaml_text, key_path, reason):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert key_path in msg
    assert reason in msg


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("listen: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config([1, 2], "x.yaml")


def test_config_is_frozen():
    cfg = parse_config({})
    with pytest.raises(ValidationError):
        cfg.mode = "transparent"  # type: ignore[misc]


def test_idle_rate_blocks_default_and_can_be_turned_off(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("")
    assert LeaseRules.of(load_config(p).governance.rate_limits.leases).idle_lifetime_s == 30.0
    p.write_text("governance: {rate_limits: {leases: {idle_lifetime_ms: 0}}}\n")
    assert LeaseRules.of(load_config(p).governance.rate_limits.leases).idle_lifetime_s == 0
