"""Rate limiter: requests and tokens per user per minute over sliding windows, and requests in
flight at once, kept in the state store."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from candela_mitm.errors import Denial, rate_limited
from candela_mitm.state.ports import (
    US_PER_S,
    RateHit,
    RateStore,
    from_us,
    rfc3339,
    to_us,
    utc_now,
)

WINDOW_S = 60
TOKEN_KINDS = ("input_tokens", "output_tokens", "total_tokens")
# A lease outlives any request (streams included); one a dead process never gave back is freed
# at the next start (reconcile_leases) or when it expires, whichever comes first.
LEASE_TTL_S = 3600


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int  # requests still allowed in the window after this one
    retry_after_s: int  # 0 when allowed; whole seconds until a slot frees otherwise
    frees_at_us: int  # when the oldest counted request leaves the window
    kind: str = "requests"  # requests, input_tokens, output_tokens, total_tokens, concurrency
    scope: str = "user"  # whose limit: the user's, or (tokens, concurrency) the tenant's

    @property
    def window_resets_at(self) -> str:
        """RFC 3339, whole seconds rounded up: formatted only when asked (a denial), not on
        every admitted request."""
        return rfc3339(from_us(-(-self.frees_at_us // US_PER_S) * US_PER_S))

    def denial(self, headers: Mapping[str, str] | None = None) -> Denial:
        return rate_limited(
            self.limit,
            self.window_resets_at,
            self.retry_after_s,
            self.kind,
            dict(headers or {}),
            scope=self.scope,
        )

    @property
    def name(self) -> str:
        """The limit's name in the IETF headers: its kind, `tenant_`-prefixed for a tenant's."""
        return self.kind if self.scope == "user" else f"{self.scope}_{self.kind}"

    def reset_s(self, now_us: int) -> int:
        """Seconds until more capacity frees (the IETF RateLimit header's `t`)."""
        return max(0, -(-(self.frees_at_us - now_us) // US_PER_S))


@dataclass(frozen=True)
class TokenLimits:
    """Tokens per minute a user may use, by kind; None: no limit of that kind."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None

    def active(self) -> dict[str, int]:
        return {
            kind: limit
            for kind in TOKEN_KINDS
            if (limit := getattr(self, kind)) is not None
        }


def token_amounts(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


@dataclass
class Admission:
    """What admitting one request holds beyond its request count, given back when it ends."""

    user: str
    lease_id: str | None = None  # a concurrency lease
    tenant_lease: tuple[str, str] | None = None  # (store key, lease id) on the tenant's limit
    token_entry: str | None = None  # the token windows' entry, holding the estimate
    token_keys: dict[str, str] = field(default_factory=dict)  # store key -> kind
    estimated: dict[str, int] = field(default_factory=dict)  # kind -> tokens held


class RateLimiter:
    """At most `limit` requests in any 60-second span, per user, across every process.

    A sliding log, not a two-bucket weighted estimate: the store keeps the time of each counted
    request of the last window, forgets the older ones, and admits a request only while fewer
    than `limit` remain. It is exact (no burst of 2x the limit across a minute boundary, as fixed
    windows allow, and no over- or under-admission from the estimate's assumption that the
    previous minute's requests were spread evenly) at the cost of O(limit) entries per user,
    which at per-minute limits is small. The forget-count-add step is one transaction (SQLite)
    or one Lua script (Redis), so processes sharing the store cannot overshoot together.
    A denied request is not recorded, so it consumes no quota.
    """

    def __init__(
        self,
        store: RateStore,
        clock: Callable[[], datetime] = utc_now,
        window_s: int = WINDOW_S,
    ):
        self.store = store
        self.clock = clock
        self.window_us = window_s * US_PER_S

    def check(self, user: str, limit_per_minute: int, now: datetime | None = None) -> RateDecision:
        """Count one request of `user` if it fits; a limit of 0 admits nothing."""
        if limit_per_minute < 0:
            raise ValueError(f"limit_per_minute must be >= 0, got {limit_per_minute}")
        now_us = to_us(now or self.clock())
        if limit_per_minute == 0:
            # nothing will ever be admitted; point at the end of a window all the same
            window_end = now_us + self.window_us
            return RateDecision(False, 0, 0, self.window_us // US_PER_S, window_end)
        hit = self.store.rate_hit(user, limit_per_minute, self.window_us, now_us)
        return self.decision(hit, limit_per_minute, now_us)

    def decision(self, hit: RateHit, limit_per_minute: int, now_us: int) -> RateDecision:
        """What the store's rate step answered (rate_hit, or rate_hit_reserve's first part)."""
        frees_at = (hit.oldest_us if hit.oldest_us is not None else now_us) + self.window_us
        if hit.allowed:
            return RateDecision(True, limit_per_minute, limit_per_minute - hit.count, 0, frees_at)
        # round up: a client that waits this long finds the slot free
        retry_after = max(1, -(-(frees_at - now_us) // US_PER_S))
        return RateDecision(False, limit_per_minute, 0, retry_after, frees_at)

    # -- tokens per minute ---------------------------------------------------------------------
    @staticmethod
    def token_key(user: str, kind: str) -> str:
        return f"{user}\x1f{kind}"

    @staticmethod
    def tenant_token_key(tenant: str, kind: str) -> str:
        return f"\x1etenant\x1f{tenant}\x1f{kind}"  # never a user's key

    def admit_tokens(
        self,
        admission: Admission,
        limits: TokenLimits,
        input_tokens: int,
        output_tokens: int,
        now: datetime | None = None,
        tenant: str | None = None,
        tenant_limits: TokenLimits | None = None,
    ) -> list[RateDecision]:
        """Hold the estimated tokens of a request in every limited window (the user's, and the
        tenant's when it has limits), all or none, in one store step.

        Returns one decision per limit (all allowed), or the single refusing one.
        """
        # (scope, kind, limit, store key)
        windows = [
            ("user", kind, limit, self.token_key(admission.user, kind))
            for kind, limit in limits.active().items()
        ]
        if tenant is not None and tenant_limits is not None:
            windows += [
                ("tenant", kind, limit, self.tenant_token_key(tenant, kind))
                for kind, limit in tenant_limits.active().items()
            ]
        if not windows:
            return []
        now_us = to_us(now or self.clock())
        amounts = token_amounts(input_tokens, output_tokens)
        entry = "t_" + uuid.uuid4().hex
        checks = [(key, limit, amounts[kind]) for _, kind, limit, key in windows]
        result = self.store.token_admit(entry, checks, self.window_us, now_us)
        if not result.allowed:
            scope, kind, limit, _ = next(w for w in windows if w[3] == result.refused_key)
            fits = result.fits_at_us
            # an estimate above the limit never fits: come back after a whole window (a
            # smaller max_tokens would fit sooner)
            frees_at = fits if fits is not None else now_us + self.window_us
            retry = max(1, -(-(frees_at - now_us) // US_PER_S))
            return [RateDecision(False, limit, 0, retry, frees_at, kind, scope)]
        admission.token_entry = entry
        admission.token_keys = {key: kind for _, kind, _, key in windows}
        admission.estimated = {kind: amounts[kind] for _, kind, _, _ in windows}
        return [
            RateDecision(
                True,
                limit,
                max(0, limit - result.used[key] - amounts[kind]),
                0,
                now_us + self.window_us,  # every token counted now has left by then
                kind,
                scope,
            )
            for scope, kind, limit, key in windows
        ]

    def correct_tokens(
        self, admission: Admission, input_tokens: int, output_tokens: int
    ) -> None:
        """Settlement: the request's entry counts what it really used, not the estimate."""
        if admission.token_entry is None:
            return
        amounts = token_amounts(input_tokens, output_tokens)
        self.store.token_correct(
            admission.token_entry,
            {key: amounts[kind] for key, kind in admission.token_keys.items()},
        )

    # -- requests in flight --------------------------------------------------------------------
    @staticmethod
    def tenant_lease_key(tenant: str) -> str:
        return f"\x1etenant\x1f{tenant}"  # never a user's key (a user id holds no \x1e)

    def _lease(
        self, key: str, limit: int, owner: str, now: datetime | None, scope: str
    ) -> tuple[str | None, RateDecision]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        now_us = to_us(now or self.clock())
        lease = "l_" + uuid.uuid4().hex
        taken, held = (
            self.store.lease_acquire(key, lease, limit, owner, now_us, LEASE_TTL_S * US_PER_S)
            if limit > 0
            else (False, 0)
        )
        if not taken:
            # no time is known at which one ends: ask the client to come back in a second
            return None, RateDecision(
                False, limit, 0, 1, now_us + US_PER_S, "concurrency", scope
            )
        return lease, RateDecision(True, limit, limit - held, 0, now_us, "concurrency", scope)

    def acquire(
        self, admission: Admission, limit: int, owner: str, now: datetime | None = None
    ) -> RateDecision:
        """Count one more request of the user in flight, if fewer than `limit` are."""
        lease, decision = self._lease(admission.user, limit, owner, now, "user")
        if lease is not None:
            admission.lease_id = lease
        return decision

    def acquire_tenant(
        self,
        admission: Admission,
        tenant: str,
        limit: int,
        owner: str,
        now: datetime | None = None,
    ) -> RateDecision:
        """Count one more request of the tenant's users in flight, if fewer than `limit` are.

        A step of its own after the user's: each is atomic in the store, so neither limit is
        ever passed; a refusal here leaves the caller to give the user's lease back."""
        key = self.tenant_lease_key(tenant)
        lease, decision = self._lease(key, limit, owner, now, "tenant")
        if lease is not None:
            admission.tenant_lease = (key, lease)
        return decision

    def release(self, admission: Admission) -> None:
        if admission.lease_id is not None:
            self.store.lease_release(admission.user, admission.lease_id)
            admission.lease_id = None
        if admission.tenant_lease is not None:
            self.store.lease_release(*admission.tenant_lease)
            admission.tenant_lease = None

    def finish(self, admission: Admission, usage: tuple[int, int] | None) -> None:
        """A request ended: give its lease back and correct its tokens to `usage` (input,
        output); None keeps the estimate (what it used is not known)."""
        self.release(admission)
        if usage is not None:
            self.correct_tokens(admission, *usage)

    def reconcile_leases(self, owner_alive: Callable[[str], bool]) -> int:
        """At start: free the leases of processes that are gone; returns how many."""
        verdicts: dict[str, bool] = {}
        freed = 0
        for lease in self.store.leases():
            if lease.owner not in verdicts:
                try:
                    verdicts[lease.owner] = owner_alive(lease.owner)
                except Exception:
                    verdicts[lease.owner] = True  # unsure: its expiry frees it
            if not verdicts[lease.owner] and self.store.lease_release(lease.key, lease.lease_id):
                freed += 1
        return freed


def policy_headers(decisions: list[RateDecision], now_us: int) -> dict[str, str]:
    """IETF RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers) for the
    decisions made on one request: one item per limit, named by its kind."""
    policy, state = [], []
    for d in decisions:
        if d.kind == "concurrency":
            policy.append(f'"{d.name}";q={d.limit}')
            state.append(f'"{d.name}";r={d.remaining}')
        else:
            policy.append(f'"{d.name}";q={d.limit};w={WINDOW_S}')
            state.append(f'"{d.name}";r={d.remaining};t={d.reset_s(now_us)}')
    if not policy:
        return {}
    return {"RateLimit-Policy": ", ".join(policy), "RateLimit": ", ".join(state)}
