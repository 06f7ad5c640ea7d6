"""Users: a principal's effective settings, from the state store first, then config, then defaults."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from candela_mitm.config import Config
from candela_mitm.errors import Denial, user_not_enrolled
from candela_mitm.governance.periods import DAILY_UTC, BudgetPeriod
from candela_mitm.governance.ratelimit import TokenLimits
from candela_mitm.governance.settings_watch import SettingsWatch
from candela_mitm.state.ports import LIMIT_FIELDS, TenantStore, UserRecord, UserStore

Role = Literal["admin", "tenant_admin", "developer"]
T = TypeVar("T")

_CACHE_PRUNE_AT = 4096  # remembered users before expired entries are swept out
# A remembered read used once more than this share of its TTL has passed is read again in the
# background (`ahead`, `tenant_ahead`): an idle user sending a request at least every half TTL
# (30 s with a current settings watch) finds its settings and its tenant's at hand at every
# request, never read on its path once it has made one (issue 21: before, each request 60 s
# after the read made the exact admission call, and broke the user's chain of rate blocks).
READ_AHEAD_AT = 0.5
# ... after this long at most (or a quarter of what is left, if less): not beside the request
# that asked, whose upstream request is being sent
READ_AHEAD_DELAY_S = 0.5


@dataclass(frozen=True)
class UserSettings:
    user_id: str
    role: Role
    tenants: tuple[str, ...]
    daily_budget_usd: float
    requests_per_minute: int
    source: Literal["store", "config", "default"]
    deleted: bool = False
    budget_period: BudgetPeriod = DAILY_UTC  # what daily_budget_usd is per
    # None: no limit (state/ports.py LIMIT_FIELDS)
    max_concurrent_requests: int | None = None
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None
    total_tokens_per_minute: int | None = None

    @property
    def token_limits(self) -> TokenLimits:
        return TokenLimits(
            self.input_tokens_per_minute, self.output_tokens_per_minute, self.total_tokens_per_minute
        )


@dataclass(frozen=True)
class TenantSettings:
    tenant_id: str
    budget_usd: float | None  # None: the tenant has no budget of its own
    period: BudgetPeriod
    source: Literal["store", "config", "default"]
    token_limits: TokenLimits = TokenLimits()  # what its users use together, per minute
    max_concurrent_requests: int | None = None  # its users' requests in flight; None: no limit


class DirectoryStore(UserStore, TenantStore, Protocol):
    """What the directory reads: users and tenants as the admin API set them."""


class UserDirectory:
    """Admin API changes live in the store; config `users:` are defaults; governance defaults last."""

    def __init__(
        self,
        config: Config,
        store: DirectoryStore,
        cache_ttl_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        watch: SettingsWatch | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.admins = frozenset(config.auth.admins)
        # Only `recent` reads the cache; `settings` always reads the store. 0 disables it.
        # cache_ttl_s is how long a read is used; up to the watch's long_ttl_s while the watch
        # of the store's settings generation is current (SettingsWatch).
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self.watch = watch
        # user or tenant -> (when its read began, what it read)
        self._cache: dict[str, tuple[float, UserSettings]] = {}
        self._tenant_cache: dict[str, tuple[float, TenantSettings]] = {}
        # sizes at which expired entries are swept out: doubled past what a sweep left, so
        # that more users live within the long TTL than _CACHE_PRUNE_AT are not swept for
        # each new one (amortised: one sweep per as many insertions as entries it kept)
        self._prune_at = self._tenant_prune_at = _CACHE_PRUNE_AT
        self._lock = threading.Lock()
        self._generation = 0  # bumped by forget(): a read begun before it is not cached

    def _role(self, user: str, stored: str | None, configured: str | None) -> Role:
        if user in self.admins:
            return "admin"
        role = stored or configured
        if role in ("admin", "tenant_admin"):
            return "admin" if role == "admin" else "tenant_admin"
        return "developer"

    def settings(self, user: str) -> UserSettings:
        """Blocking (a store read): call from a worker thread."""
        rec = self.store.get_user(user, include_deleted=True)
        s = self._settings(user, rec)
        limits: dict[str, Any] = {}
        cfg = self.config.users.get(user)
        defaults = self.config.governance.rate_limits
        for name in LIMIT_FIELDS:
            value = getattr(rec, name) if rec is not None else None
            if value is None and cfg is not None:
                value = getattr(cfg, name)
            if value is None:
                value = getattr(defaults, "default_" + name)
            limits[name] = value
        return dataclasses.replace(s, **limits)

    def _settings(self, user: str, rec: UserRecord | None) -> UserSettings:
        g = self.config.governance
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
                budget_period=self.period(
                    rec.budget_period or (cfg.budget_period if cfg else None)
                ),
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
                budget_period=self.period(cfg.budget_period),
            )
        return UserSettings(
            user_id=user,
            role=self._role(user, None, None),
            tenants=(),
            daily_budget_usd=g.budgets.default_daily_usd,
            requests_per_minute=g.rate_limits.default_requests_per_minute,
            source="default",
            budget_period=self.period(),
        )

    def recent(self, user: str) -> UserSettings | None:
        """Settings read from the store less than cache_ttl_s ago by `settings_cached`, or None.

        Non-blocking: the proxy's hot path asks here first and skips a trip to the thread pool.
        """
        hit = self._cache.get(user)
        if hit is None or self._expiry(hit[0], now := self.clock()) <= now:
            return None
        return hit[1]

    def _pruned(self, cache: dict[str, tuple[float, T]], now: float) -> dict[str, tuple[float, T]]:
        """`cache` without the entries expired at `now`."""
        return {k: h for k, h in cache.items() if self._expiry(h[0], now) > now}

    def _expiry(self, started: float, now: float) -> float:
        """Until when a read begun at `started` may be used, as seen at `now`."""
        w = self.watch
        if w is not None and w.current(now):
            return started + max(self.cache_ttl_s, w.long_ttl_s)
        return started + self.cache_ttl_s

    def settings_cached(self, user: str) -> UserSettings:
        """Blocking: `settings`, remembered for cache_ttl_s for `recent`."""
        generation, started = self._generation, self.clock()
        s = self.settings(user)
        if self.cache_ttl_s > 0:
            with self._lock:
                if generation == self._generation:  # no change was made while we read
                    if len(self._cache) >= self._prune_at:  # many users: drop expired ones
                        self._cache = self._pruned(self._cache, started)
                        self._prune_at = max(_CACHE_PRUNE_AT, 2 * len(self._cache))
                    # aged from before the read: never older than its TTL when used
                    self._cache[user] = (started, s)
        return s

    def forget(self) -> None:
        """Drop every remembered setting: called after each admin change in this process."""
        with self._lock:
            self._generation += 1
            self._cache.clear()
            self._tenant_cache.clear()

    def period(self, kind: str | None = None) -> BudgetPeriod:
        """A budget period of `kind` (None: the configured default) in the configured zone."""
        b = self.config.governance.budgets
        return BudgetPeriod(kind or b.period, b.time_zone)  # type: ignore[arg-type]

    def tenant_settings(self, tenant: str) -> TenantSettings:
        """Blocking (a store read). A stored record (admin API) wins over the config."""
        rec = self.store.get_tenant(tenant)
        cfg = self.config.governance.tenants.get(tenant)
        if rec is not None:
            kind = rec.budget_period or (cfg.period if cfg else None)
            limits = TokenLimits(
                rec.input_tokens_per_minute,
                rec.output_tokens_per_minute,
                rec.total_tokens_per_minute,
            )
            return TenantSettings(
                tenant, rec.budget_usd, self.period(kind), "store", limits,
                rec.max_concurrent_requests,
            )
        if cfg is not None:
            limits = TokenLimits(
                cfg.input_tokens_per_minute,
                cfg.output_tokens_per_minute,
                cfg.total_tokens_per_minute,
            )
            return TenantSettings(
                tenant, cfg.budget_usd, self.period(cfg.period), "config", limits,
                cfg.max_concurrent_requests,
            )
        return TenantSettings(tenant, None, self.period(), "default")

    def recent_tenant(self, tenant: str) -> TenantSettings | None:
        """`tenant_settings` read less than cache_ttl_s ago, or None (non-blocking, as `recent`)."""
        hit = self._tenant_cache.get(tenant)
        if hit is None or self._expiry(hit[0], now := self.clock()) <= now:
            return None
        return hit[1]

    def tenant_settings_cached(self, tenant: str) -> TenantSettings:
        """`tenant_settings`, remembered for cache_ttl_s (as settings_cached)."""
        hit = self.recent_tenant(tenant)
        return hit if hit is not None else self.refresh_tenant(tenant)

    def refresh_tenant(self, tenant: str) -> TenantSettings:
        """Blocking: `tenant_settings` read afresh and remembered for cache_ttl_s (also ahead of
        the remembered one's expiry, so that `recent_tenant` keeps answering under load)."""
        now, generation = self.clock(), self._generation
        t = self.tenant_settings(tenant)
        if self.cache_ttl_s > 0:
            with self._lock:
                if generation == self._generation:
                    if len(self._tenant_cache) >= self._tenant_prune_at:
                        self._tenant_cache = self._pruned(self._tenant_cache, now)
                        self._tenant_prune_at = max(_CACHE_PRUNE_AT, 2 * len(self._tenant_cache))
                    self._tenant_cache[tenant] = (now, t)
        return t

    def ahead(self, user: str) -> float | None:
        """When to read `user`'s remembered settings again in the background (the delay, in
        seconds), or None: none are remembered, they are not past READ_AHEAD_AT of their TTL,
        or they have expired (the request that finds them so reads them on its path)."""
        return self._ahead(self._cache.get(user))

    def tenant_ahead(self, tenant: str) -> float | None:
        """`ahead` for a tenant's settings."""
        return self._ahead(self._tenant_cache.get(tenant))

    def _ahead(self, hit: tuple[float, object] | None) -> float | None:
        if hit is None or self.cache_ttl_s <= 0:
            return None
        now = self.clock()
        expiry = self._expiry(hit[0], now)
        if now - hit[0] < READ_AHEAD_AT * (expiry - hit[0]) or now >= expiry:
            return None  # not due yet, or expired: the request reads it on its path
        return min(READ_AHEAD_DELAY_S, (expiry - now) / 4)

    def record_of(self, user: str) -> UserRecord | None:
        return self.store.get_user(user, include_deleted=True)


# Identities an issuer vouches for, as opposed to keys the deployment itself handed out.
_ISSUED = frozenset({"oidc", "access_token"})


def enrollment_denial(settings: UserSettings, via: str, allow_unknown: bool) -> Denial | None:
    """403 user_not_enrolled for a verified OIDC/access-token identity that is not a user here.

    A user is enrolled when the config names it (`users:`, `auth.admins`) or the admin API
    created it. Without this, any identity a trusted issuer signs (any Google account or service
    account, for Google) would get the default budget: every new identity a new budget.
    """
    if allow_unknown or via not in _ISSUED or settings.source != "default":
        return None
    if settings.role == "admin":  # auth.admins is configuration too
        return None
    return user_not_enrolled(settings.user_id)
