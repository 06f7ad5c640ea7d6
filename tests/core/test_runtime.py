import pytest

from candela_mitm.config import parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.runtime import build_runtime


def cfg(tmp_path, **extra):
    base = {
        "state": {"sqlite_path": str(tmp_path / "state.db")},
        "audit": {"sqlite_path": str(tmp_path / "audit.db")},
        "governance": {"models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]}},
    }
    base.update(extra)
    return parse_config(base)


@pytest.fixture
def rt(tmp_path):
    r = build_runtime(cfg(tmp_path), "server")
    yield r
    r.close()


def test_reload_swaps_policy_pricing_and_users(rt, tmp_path):
    assert not rt.policy.check("gpt-4o", None).allowed
    new = cfg(
        tmp_path,
        governance={"models": {"mode": "allowlist", "allowed": ["gpt-4o"]}},
        pricing={"my-model": {"input": 1.0, "output": 2.0}},
        users={"bob": {"tenants": ["t"], "daily_budget_usd": 3.0}},
    )
    changed = rt.reload(new)
    assert set(changed) == {"governance", "pricing", "users"}
    assert rt.policy.check("gpt-4o", None).allowed
    assert rt.pricing.get("my-model").input == 1.0
    assert rt.users.settings("bob").daily_budget_usd == 3.0
    assert rt.config is new


def test_reload_refuses_sections_that_need_a_restart(rt, tmp_path):
    before = rt.config
    with pytest.raises(ConfigError, match="state"):
        rt.reload(cfg(tmp_path, state={"sqlite_path": str(tmp_path / "other.db")},
                      governance={"models": {"mode": "allowlist", "allowed": ["gpt-4o"]}}))
    assert rt.config is before and not rt.policy.check("gpt-4o", None).allowed


def test_reload_applies_alert_thresholds_and_webhooks(rt, tmp_path):
    assert rt.alerts is not None and rt.alerts.config().webhooks == []
    alerts = {"thresholds": [75], "webhooks": [{"url": "https://hooks.example/c", "format": "slack"}]}
    assert rt.reload(cfg(tmp_path, alerts=alerts)) == ["alerts"]
    assert rt.alerts.config().thresholds == [75]
    assert rt.alerts.config().webhooks[0].format == "slack"


def test_the_utilisation_gauge_knows_only_keys_minted_into_the_store(rt):
    from candela_mitm.runtime import known_scope
    from candela_mitm.state.ports import KeyRecord

    known = known_scope(rt)
    assert not known("key", "k_minted")
    rt.store.put_api_key(KeyRecord("k_minted", "0" * 64, "alice", "laptop", "admin", 1,
                                   budget_usd=1.0))
    assert known("key", "k_minted") and not known("key", "k_other")


# issue 7: hot-path store calls run on the event loop when the store can answer at once
# (state/calls.py, tests/core/state/test_calls.py); the runtime counts where they ran
def test_store_call_runs_here_when_free_else_on_the_pool(rt):
    import asyncio
    import threading

    from candela_mitm.state.ports import WouldWait

    here = threading.get_ident()

    def where(tag):
        rt.store.rate_hit(tag, 5, 60_000_000, 1)
        return threading.get_ident()

    async def call(tag):
        return await rt.store_call(where, tag)

    assert asyncio.run(call("a")) == here  # SQLite with its lock free: no thread hop

    real = rt.store.call_without_waiting

    def busy(fn, *args):
        raise WouldWait("held")

    rt.store.call_without_waiting = busy
    try:
        assert asyncio.run(call("b")) != here  # refused: the pool runs it, once
    finally:
        rt.store.call_without_waiting = real
    assert rt.store.rate_hit("a", 5, 60_000_000, 1).count == 2
    assert rt.store.rate_hit("b", 5, 60_000_000, 1).count == 2
    text = rt.metrics.render()[0].decode()
    assert 'candela_state_store_calls_total{where="event_loop"} 1.0' in text
    assert 'candela_state_store_calls_total{where="pool"} 1.0' in text
