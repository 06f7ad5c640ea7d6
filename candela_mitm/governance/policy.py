"""Model policy: which models a tenant may use (allowlist or blocklist), per spec 002."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from candela_mitm.config import Models, WorkloadRule
from candela_mitm.providers.models import canonical_model


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    model: str  # as the client named it
    tenant: str | None
    policy_mode: str  # allowlist | blocklist | none
    scope: str  # "tenant" when a tenant policy replaced the global one, else "global";
    # "workload" when the sending executable's own policy (governance.workloads) refused it


@dataclass(frozen=True)
class _Rule:
    mode: str | None
    names: frozenset[str]


def _rule(mode: str | None, allowed: list[str], blocked: list[str]) -> _Rule:
    if mode is None:
        mode = "allowlist" if allowed else ("blocklist" if blocked else None)
    names = allowed if mode == "allowlist" else blocked
    return _Rule(mode, frozenset(canonical_model(n) for n in names))


def _allows(rule: _Rule, name: str) -> bool:
    if rule.mode == "allowlist":
        return name in rule.names
    if rule.mode == "blocklist":
        return name not in rule.names
    return True


class ModelPolicy:
    """Global policy, replaced (not merged) by a tenant's own when the tenant has one; an
    intercepted executable's own policy (governance.workloads) restricts it further."""

    def __init__(self, cfg: Models, workloads: Sequence[WorkloadRule] = ()) -> None:
        self._workloads = [
            _rule(w.models.mode, w.models.allowed, w.models.blocked) if w.models else None
            for w in workloads
        ]
        self._global = _rule(cfg.mode, cfg.allowed, cfg.blocked)
        self._tenants = {
            name: _rule(
                t.models.mode or (None if (t.models.allowed or t.models.blocked) else cfg.mode),
                t.models.allowed,
                t.models.blocked,
            )
            for name, t in cfg.tenants.items()
        }

    def check(
        self, model: str, tenant: str | None, workload: int | None = None
    ) -> PolicyDecision:
        """`workload`: the index of the governance.workloads rule the sender matched."""
        rule, scope = self._global, "global"
        if tenant is not None and tenant in self._tenants:
            rule, scope = self._tenants[tenant], "tenant"
        name = canonical_model(model)
        ok = _allows(rule, name)
        own = self._workloads[workload] if workload is not None else None
        if ok and own is not None and own.mode is not None and not _allows(own, name):
            return PolicyDecision(False, model, tenant, own.mode, "workload")
        return PolicyDecision(ok, model, tenant, rule.mode or "none", scope)
