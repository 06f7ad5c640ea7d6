"""Users: a principal's effective settings, from the state store first, then config, then defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from candela_mitm.config import Config
from candela_mitm.state import StateStore, UserRecord

Role = Literal["admin", "developer"]


@dataclass(frozen=True)
class UserSettings:
    user_id: str
    role: Role
    tenants: tuple[str, ...]
    daily_budget_usd: float
    requests_per_minute: int
    source: Literal["store", "config", "default"]
    deleted: bool = False


class UserDirectory:
    """Admin API changes live in the store; config `users:` are defaults; governance defaults last."""

    def __init__(self, config: Config, store: StateStore) -> None:
        self.config = config
        self.store = store
        self.admins = frozenset(config.auth.admins)

    def _role(self, user: str, stored: str | None, configured: str | None) -> Role:
        if user in self.admins:
            return "admin"
        role = stored or configured
        return "admin" if role == "admin" else "developer"

    def settings(self, user: str) -> UserSettings:
        """Blocking (a store read): call from a worker thread."""
        g = self.config.governance
        rec = self.store.get_user(user, include_deleted=True)
        cfg = self.config.users.get(user)
        if rec is not None:
            return UserSettings(
                user_id=user,
                role=self._role(user, rec.role, cfg.role if cfg else None),
                tenants=tuple(rec.tenants),
                daily_budget_usd=(
                    rec.daily_budget_usd
                    if rec.daily_budget_usd is not None
                    else (cfg.daily_budget_usd if cfg and cfg.daily_budget_usd is not None
                          else g.budgets.default_daily_usd)
                ),
                requests_per_minute=(
                    rec.requests_per_minute
                    if rec.requests_per_minute is not None
                    else (cfg.requests_per_minute if cfg and cfg.requests_per_minute is not None
                          else g.rate_limits.default_requests_per_minute)
                ),
                source="store",
                deleted=rec.deleted,
            )
        if cfg is not None:
            return UserSettings(
                user_id=user,
                role=self._role(user, None, cfg.role),
                tenants=tuple(cfg.tenants),
                daily_budget_usd=(
                    cfg.daily_budget_usd if cfg.daily_budget_usd is not None else g.budgets.default_daily_usd
                ),
                requests_per_minute=(
                    cfg.requests_per_minute
                    if cfg.requests_per_minute is not None
                    else g.rate_limits.default_requests_per_minute
                ),
                source="config",
            )
        return UserSettings(
            user_id=user,
            role=self._role(user, None, None),
            tenants=(),
            daily_budget_usd=g.budgets.default_daily_usd,
            requests_per_minute=g.rate_limits.default_requests_per_minute,
            source="default",
        )

    def record_of(self, user: str) -> UserRecord | None:
        return self.store.get_user(user, include_deleted=True)
