import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance.policy import ModelPolicy

CFG = {
    "governance": {
        "models": {
            "mode": "allowlist",
            "allowed": ["gpt-4o-mini", "gemini-2.5-flash"],
            "tenants": {
                "research-team": {"models": {"allowed": ["gpt-4o", "claude-sonnet-4-20250514"]}},
                "contractor-pool": {"models": {"allowed": ["gpt-4o-mini"]}},
                "red-team": {"models": {"mode": "blocklist", "blocked": ["o1-pro"]}},
            },
        }
    }
}


def policy(cfg=CFG):
    return ModelPolicy(parse_config(cfg).governance.models)


@pytest.mark.parametrize(
    "model, tenant, allowed, mode, scope",
    [
        ("gpt-4o-mini", None, True, "allowlist", "global"),
        ("GPT-4o-Mini", None, True, "allowlist", "global"),
        ("gpt-4o", None, False, "allowlist", "global"),
        ("gpt-4o", "research-team", True, "allowlist", "tenant"),
        # a tenant policy replaces the global one: the global allowlist does not add to it
        ("gpt-4o-mini", "research-team", False, "allowlist", "tenant"),
        ("anthropic.claude-sonnet-4-20250514-v1:0", "research-team", True, "allowlist", "tenant"),
        ("claude-sonnet-4@20250514", "research-team", True, "allowlist", "tenant"),
        ("o1-pro", "contractor-pool", False, "allowlist", "tenant"),
        ("o1-pro", "red-team", False, "blocklist", "tenant"),
        ("gpt-4o", "red-team", True, "blocklist", "tenant"),
        ("models/gemini-2.5-flash", "unknown-tenant", True, "allowlist", "global"),
    ],
)
def test_policy_table(model, tenant, allowed, mode, scope):
    d = policy().check(model, tenant)
    assert (d.allowed, d.policy_mode, d.scope) == (allowed, mode, scope)
    assert d.model == model and d.tenant == tenant


def test_no_policy_allows_everything():
    d = policy({}).check("anything", None)
    assert d.allowed and d.policy_mode == "none"


def test_global_blocklist():
    p = policy({"governance": {"models": {"mode": "blocklist", "blocked": ["o1-pro"]}}})
    assert not p.check("O1-PRO", None).allowed
    assert p.check("gpt-4o", None).allowed


def test_empty_allowlist_denies_all():
    p = policy({"governance": {"models": {"mode": "allowlist", "allowed": []}}})
    assert not p.check("gpt-4o-mini", None).allowed


def test_a_workloads_own_policy_restricts_the_users_and_is_named_in_the_decision():
    from candela_mitm.config import parse_config
    from candela_mitm.governance.policy import ModelPolicy as Policy

    cfg = parse_config(
        {
            "governance": {
                "models": {"mode": "allowlist", "allowed": ["gpt-4o-mini", "gpt-4o"]},
                "workloads": [
                    {
                        "exe": "/usr/bin/agent",
                        "models": {"mode": "allowlist", "allowed": ["gpt-4o"]},
                    },
                    {"exe": "/usr/bin/other", "user": "u"},  # no policy of its own
                ],
            }
        }
    ).governance
    policy = Policy(cfg.models, cfg.workloads)
    assert policy.check("gpt-4o-mini", None).allowed
    d = policy.check("gpt-4o-mini", None, 0)
    assert (d.allowed, d.scope, d.policy_mode) == (False, "workload", "allowlist")
    assert policy.check("gpt-4o", None, 0).allowed
    assert policy.check("gpt-4o-mini", None, 1).allowed
    # the user's policy still applies first: the workload cannot widen it
    assert policy.check("o3", None, 0).scope == "global"
