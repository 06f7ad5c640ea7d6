import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance import policy as policy_mod
from candela_mitm.governance.policy import EffectiveModels, ModelPolicy, effective_models, key_rule

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


FAMILIES = {
    "governance": {
        "models": {
            "mode": "blocklist",
            "blocked": ["gpt-4o", "claude-opus-*", "gemini-*-flash*", "o1-pro"],
            "allowed": ["claude-opus-4-8"],  # not used globally (blocklist); mode-only uses it
            "tenants": {
                "inherits": {"models": {}},
                "own-allowlist": {"models": {"allowed": ["gpt-4o-mini*", "claude-sonnet-4-0"]}},
                "mode-only": {"models": {"mode": "allowlist"}},
                "nothing": {"models": {"mode": "allowlist", "allowed": []}},
            },
        }
    }
}


@pytest.mark.parametrize(
    "model, tenant, allowed, scope",
    [
        # an exact entry covers the model's snapshots and aliases, not its siblings
        ("gpt-4o", None, False, "global"),
        ("gpt-4o-2024-08-06", None, False, "global"),
        ("GPT-4o-2024-11-20", None, False, "global"),
        ("gpt-4o-mini", None, True, "global"),
        ("gpt-4o-2024-05-13", None, True, "global"),  # a model of its own, priced apart
        # a family pattern covers every member, however it is spelled on the route
        ("claude-opus-4-8", None, False, "global"),
        ("claude-opus-4-20250514", None, False, "global"),
        ("us.anthropic.claude-opus-4-8-v1:0", None, False, "global"),
        ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
         "global.anthropic.claude-opus-4-8-v1:0", None, False, "global"),
        ("claude-opus-4-1@20250805", None, False, "global"),
        ("publishers/anthropic/models/claude-opus-4-5", None, False, "global"),
        ("claude-sonnet-4-5", None, True, "global"),
        ("gemini-2.5-flash", None, False, "global"),
        ("models/gemini-2.5-flash-lite", None, False, "global"),
        ("gemini-2.5-pro", None, True, "global"),
        # fine-tunes are their base model
        ("ft:gpt-4o:acme:custom:abc123", None, False, "global"),
        ("ft:gpt-4o-mini:acme::abc123", None, True, "global"),
        # a tenant without a list inherits the global list
        ("gpt-4o-2024-08-06", "inherits", False, "global"),
        ("gpt-4o-mini", "inherits", True, "global"),
        # a tenant's own list replaces it: a pattern and an alias
        ("gpt-4o-mini-2024-07-18", "own-allowlist", True, "tenant"),
        ("ft:gpt-4o-mini:acme::abc123", "own-allowlist", True, "tenant"),
        ("claude-sonnet-4-20250514", "own-allowlist", True, "tenant"),
        ("anthropic.claude-sonnet-4-20250514-v1:0", "own-allowlist", True, "tenant"),
        ("gpt-4o", "own-allowlist", False, "tenant"),
        # a mode without a list: the global list of that mode
        ("claude-opus-4-8", "mode-only", True, "global"),
        ("claude-sonnet-4-5", "mode-only", False, "global"),
        # an explicit empty allowlist is a list: nothing allowed
        ("gpt-4o-mini", "nothing", False, "tenant"),
    ],
)
def test_families_and_inheritance(model, tenant, allowed, scope):
    d = policy(FAMILIES).check(model, tenant)
    assert (d.allowed, d.scope) == (allowed, scope), d
    assert d.model == model and d.tenant == tenant


def test_denial_body_is_unchanged_for_a_family_match():
    from candela_mitm import errors

    d = policy(FAMILIES).check("us.anthropic.claude-opus-4-8-v1:0", "inherits")
    denial = errors.model_not_allowed(d.model, d.tenant, d.policy_mode)
    assert denial.status == 403
    assert denial.payload() == {
        "error": "model_not_allowed",
        "message": "Model 'us.anthropic.claude-opus-4-8-v1:0' is blocked by the model policy "
        "for tenant 'inherits'",
        "model": "us.anthropic.claude-opus-4-8-v1:0",
        "tenant_id": "inherits",
        "policy": "blocklist",
    }
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


# -- the effective policy, as the admin API's policy view shows it ---------------------------------

VIEW_CFGS = [
    CFG,
    {},
    {"governance": {"models": {"blocked": ["o1-pro"]}}},
    {"governance": {"models": {"mode": "allowlist", "allowed": []}}},
    {
        "governance": {
            "models": {
                "allowed": ["gpt-4o-mini"],
                "blocked": ["gpt-4o"],
                "tenants": {"flip": {"models": {"mode": "blocklist"}}},
            }
        }
    },
]
MODELS = ["gpt-4o-mini", "gpt-4o", "o1-pro", "gemini-2.5-flash", "claude-sonnet-4-20250514"]


@pytest.mark.parametrize("cfg", VIEW_CFGS)
@pytest.mark.parametrize("tenant", [None, "research-team", "contractor-pool", "red-team", "flip"])
def test_the_effective_view_agrees_with_the_decision(cfg, tenant):
    models = parse_config(cfg).governance.models
    view = effective_models(models, tenant)
    for model in MODELS:
        d = ModelPolicy(models).check(model, tenant)
        assert (view.mode, view.scope) == (d.policy_mode, d.scope)
        listed = model in view.entries
        expected = {"allowlist": listed, "blocklist": not listed, "none": True}[view.mode]
        assert d.allowed == expected, (model, view)


def test_the_effective_view_names_the_lists():
    models = parse_config(CFG).governance.models
    assert effective_models(models, "red-team") == EffectiveModels(
        "blocklist", ("o1-pro",), "tenant"
    )
    assert effective_models(models, None) == EffectiveModels(
        "allowlist", ("gpt-4o-mini", "gemini-2.5-flash"), "global"
    )
    assert effective_models(parse_config({}).governance.models) == EffectiveModels(
        "none", (), "global"
    )


@pytest.mark.parametrize(
    "model, tenant, key, allowed, scope",
    [
        # a key narrows what its user may use ...
        ("gpt-4o-mini", None, ("gpt-4o-mini",), True, "global"),
        ("gemini-2.5-flash", None, ("gpt-4o-mini",), False, "key"),
        ("gemini-2.5-flash", None, ("gemini-*",), True, "global"),
        ("models/Gemini-2.5-Flash", None, ("gemini-*-flash",), True, "global"),
        # ... never widens it: the policy refuses first, and says so
        ("gpt-4o", None, ("gpt-4o*",), False, "global"),
        ("gpt-4o", "research-team", ("gpt-4o*",), True, "tenant"),
        ("gpt-4o-2024-08-06", "research-team", ("gpt-4o",), True, "tenant"),  # its snapshots
        ("gpt-4o-mini", None, (), True, "global"),  # no patterns: whatever the user may use
    ],
)
def test_a_keys_own_models(model, tenant, key, allowed, scope):
    d = policy().check(model, tenant, None, key)
    assert (d.allowed, d.scope) == (allowed, scope)


def test_a_keys_refusal_names_the_key():
    from candela_mitm import errors

    d = policy().check("gemini-2.5-flash", None, None, ("gpt-4o-mini",))
    denial = errors.model_not_allowed(d.model, d.tenant, d.policy_mode, "k_0123456789abcdef")
    assert (denial.status, denial.payload()) == (403, {
        "error": "model_not_allowed",
        "message": "Model 'gemini-2.5-flash' is not among the models API key "
        "'k_0123456789abcdef' may use",
        "model": "gemini-2.5-flash",
        "tenant_id": None,
        "policy": "allowlist",
        "key_id": "k_0123456789abcdef",
    })


_MODELS = [
    "gpt-4o-mini",
    "gpt-4o-mini-2024-07-18",
    "GPT-4o",
    "ft:gpt-4o-mini:org::abc",
    "claude-sonnet-4-0",
    "anthropic.claude-3-5-sonnet-20240620-v1:0",
    "gemini-2.5-flash",
    "o3",
    "unknown-model",
    "",
]


@pytest.mark.parametrize(
    "entries",
    [
        ["gpt-4o-mini"],
        ["gpt-4o*", "claude-*"],
        ["gemini-*-flash*", "o3", "claude-3-5-sonnet"],
        [],
    ],
)
def test_rule_memo_answers_as_the_match_itself(entries: list[str], monkeypatch) -> None:
    # a rule remembers what it said of each model name: the same answer as matching anew, also
    # once the memo is full and starts over
    monkeypatch.setattr(policy_mod, "_MEMO_MAX", 3)
    rule = key_rule(tuple(entries))
    rule.memo.clear()  # (key_rule's rules are shared)
    for _ in range(3):
        for model in _MODELS:
            assert rule.matches(model) is rule._matches(model)
            assert len(rule.memo) <= 3
    assert any(rule._matches(m) for m in _MODELS) == bool(entries)
