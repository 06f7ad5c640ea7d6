"""Model policy: which models a tenant may use (allowlist or blocklist), per spec 002.

An entry names a model (`gpt-4o`) or a family (`gpt-4o*`, `claude-opus-*`, `gemini-*-flash*`,
fnmatch patterns). Both match the model's canonical ids, so an entry also covers the model's
snapshots and aliases (`gpt-4o-2024-08-06`, `claude-sonnet-4-0`), its Bedrock ids and ARNs and
Vertex ids, and fine-tunes of it (`ft:gpt-4o-mini:org::id` is a gpt-4o-mini).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache

from candela_mitm.config import Models, TenantModels, WorkloadRule
from candela_mitm.providers.models import base_model, canonical_model
from candela_mitm.providers.pricing import maker_model_id

_GLOB = frozenset("*?[")
_MEMO_MAX = 4096


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    model: str  # as the client named it
    tenant: str | None
    policy_mode: str  # allowlist | blocklist | none
    scope: str  # "tenant" when a tenant's own list decided, else "global";
    # "workload" when the sending executable's own policy (governance.workloads) refused it,
    # "key" when the minted key's own model patterns did


@lru_cache(maxsize=4096)  # model names come from clients: bounded
def model_ids(model: str) -> frozenset[str]:
    """The canonical ids a model reference goes by: as named (canonical), the base model of a
    fine-tune, and the id its maker's price list gives it (which joins snapshots and aliases)."""
    ids = {canonical_model(model), base_model(model)}
    maker = maker_model_id(model)
    if maker is not None:
        ids.add(maker)
    return frozenset(ids)


@dataclass(frozen=True)
class _Rule:
    mode: str | None
    names: frozenset[str]  # the ids of the entries that name one model
    patterns: tuple[str, ...]  # the entries that name a family
    # what `_matches` said of each model name asked (the rule never changes, and model_ids is
    # cached for good): one dict read per request instead of an fnmatch per pattern and id
    memo: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def matches(self, model: str) -> bool:
        hit = self.memo.get(model)
        if hit is None:
            hit = self._matches(model)
            if len(self.memo) >= _MEMO_MAX:  # model names come from clients: bounded
                self.memo.clear()
            self.memo[model] = hit
        return hit

    def _matches(self, model: str) -> bool:
        ids = model_ids(model)
        if ids & self.names:
            return True
        return any(fnmatchcase(i, p) for p in self.patterns for i in ids)


    def allows(self, model: str) -> bool:
        if self.mode == "allowlist":
            return self.matches(model)
        if self.mode == "blocklist":
            return not self.matches(model)
        return True


def _rule(mode: str | None, allowed: list[str], blocked: list[str]) -> _Rule:
    if mode is None:
        mode = "allowlist" if allowed else ("blocklist" if blocked else None)
    entries = allowed if mode == "allowlist" else blocked
    names: set[str] = set()
    patterns: list[str] = []
    for entry in entries:
        low = entry.strip().lower()
        if _GLOB & set(low):
            patterns.append(low)
        else:
            names |= model_ids(entry)
    return _Rule(mode, frozenset(names), tuple(patterns))


def _has_list(t: TenantModels) -> bool:
    # an explicit empty list is a list (`allowed: []` denies everything), an absent one is not
    return bool({"allowed", "blocked"} & t.model_fields_set)


class ModelPolicy:
    """Global policy, replaced (not merged) by a tenant's own lists when the tenant has some.

    A tenant policy without a list inherits the global list (under its own mode if it names
    one), not only the global mode. An intercepted executable's own policy
    (governance.workloads) restricts it further, never widens it.
    """

    def __init__(self, cfg: Models, workloads: Sequence[WorkloadRule] = ()) -> None:
        self._workloads = [
            _rule(w.models.mode, w.models.allowed, w.models.blocked) if w.models else None
            for w in workloads
        ]
        self._global = _rule(cfg.mode, cfg.allowed, cfg.blocked)
        self._tenants: dict[str, tuple[_Rule, str]] = {}
        for name, t in cfg.tenants.items():
            if _has_list(t.models):
                self._tenants[name] = (
                    _rule(t.models.mode, t.models.allowed, t.models.blocked),
                    "tenant",
                )
            elif t.models.mode is not None and t.models.mode != self._global.mode:
                self._tenants[name] = (_rule(t.models.mode, cfg.allowed, cfg.blocked), "global")

    def check(
        self,
        model: str,
        tenant: str | None,
        workload: int | None = None,
        key_models: Sequence[str] = (),
    ) -> PolicyDecision:
        """`workload`: the index of the governance.workloads rule the sender matched;
        `key_models`: the patterns a minted key is narrowed to (scope `key` when they refuse)."""
        rule, scope = self._global, "global"
        if tenant is not None and tenant in self._tenants:
            rule, scope = self._tenants[tenant]
        ok = rule.allows(model)
        own = self._workloads[workload] if workload is not None else None
        if ok and own is not None and own.mode is not None and not own.allows(model):
            return PolicyDecision(False, model, tenant, own.mode, "workload")
        if ok and key_models and not key_rule(tuple(key_models)).allows(model):
            return PolicyDecision(False, model, tenant, "allowlist", "key")
        return PolicyDecision(ok, model, tenant, rule.mode or "none", scope)


@dataclass(frozen=True)
class EffectiveModels:
    """The model list that decides a tenant's requests, as configured (for people to read)."""

    mode: str  # allowlist | blocklist | none
    entries: tuple[str, ...]  # the allowed models (allowlist) or the blocked ones (blocklist)
    scope: str  # "tenant": the tenant's own lists; "global": the global ones


def effective_models(cfg: Models, tenant: str | None = None) -> EffectiveModels:
    """What ModelPolicy applies to `tenant` (None: a request without a tenant), by the same rule:
    a tenant's own lists replace the global ones; a tenant mode without lists applies that
    mode to the global lists."""
    mode, allowed, blocked, scope = cfg.mode, cfg.allowed, cfg.blocked, "global"
    t = cfg.tenants.get(tenant) if tenant is not None else None
    if t is not None and _has_list(t.models):
        mode, allowed, blocked, scope = t.models.mode, t.models.allowed, t.models.blocked, "tenant"
    elif t is not None and t.models.mode is not None:
        mode = t.models.mode
    if mode is None:
        mode = "allowlist" if allowed else ("blocklist" if blocked else None)
    if mode is None:
        return EffectiveModels("none", (), scope)
    return EffectiveModels(mode, tuple(allowed if mode == "allowlist" else blocked), scope)


@lru_cache(maxsize=1024)  # a key's patterns, read on each of its requests: bounded
def key_rule(patterns: tuple[str, ...]) -> _Rule:
    """A minted key's model patterns, an allowlist matched as the policy's own entries are."""
    return _rule("allowlist", list(patterns), [])
