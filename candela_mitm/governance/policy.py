"""Model policy: which models a tenant may use (allowlist or blocklist), per spec 002."""

from __future__ import annotations

from dataclasses import dataclass

from candela_mitm.config import Models
from candela_mitm.providers.models import canonical_model


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    model: str  # as the client named it
    tenant: str | None
    policy_mode: str  # allowlist | blocklist | none
    scope: str  # "tenant" when a tenant policy replaced the global one, else "global"


@dataclass(frozen=True)
class _Rule:
    mode: str | None
    names: frozenset[str]


def _rule(mode: str | None, allowed: list[str], blocked: list[str]) -> _Rule:
    if mode is None:
        mode = "allowlist" if allowed else ("blocklist" if blocked else None)
    names = allowed if mode == "allowlist" else blocked
    return _Rule(mode, frozenset(canonical_model(n) for n in names))


class ModelPolicy:
    """Global policy, replaced (not merged) by a tenant's own when the tenant has one."""

    def __init__(self, cfg: Models) -> None:
        self._global = _rule(cfg.mode, cfg.allowed, cfg.blocked)
        self._tenants = {
            name: _rule(
                t.models.mode or (None if (t.models.allowed or t.models.blocked) else cfg.mode),
                t.models.allowed,
                t.models.blocked,
            )
            for name, t in cfg.tenants.items()
        }

    def check(self, model: str, tenant: str | None) -> PolicyDecision:
        rule, scope = self._global, "global"
        if tenant is not None and tenant in self._tenants:
            rule, scope = self._tenants[tenant], "tenant"
        name = canonical_model(model)
        if rule.mode == "allowlist":
            ok = name in rule.names
        elif rule.mode == "blocklist":
            ok = name not in rule.names
        else:
            ok = True
        return PolicyDecision(ok, model, tenant, rule.mode or "none", scope)
