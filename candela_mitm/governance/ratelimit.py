"""Rate limiter: requests per user per minute over a sliding window kept in the state store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from candela_mitm.errors import Denial, rate_limited
from candela_mitm.state.ports import US_PER_S, StateStore, from_us, rfc3339, to_us, utc_now

WINDOW_S = 60


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int  # requests still allowed in the window after this one
    retry_after_s: int  # 0 when allowed; whole seconds until a slot frees otherwise
    frees_at_us: int  # when the oldest counted request leaves the window

    @property
    def window_resets_at(self) -> str:
        """RFC 3339, whole seconds rounded up: formatted only when asked (a denial), not on
        every admitted request."""
        return rfc3339(from_us(-(-self.frees_at_us // US_PER_S) * US_PER_S))

    def denial(self) -> Denial:
        return rate_limited(self.limit, self.window_resets_at, self.retry_after_s)


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
        store: StateStore,
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
        frees_at = (hit.oldest_us if hit.oldest_us is not None else now_us) + self.window_us
        if hit.allowed:
            return RateDecision(True, limit_per_minute, limit_per_minute - hit.count, 0, frees_at)
        # round up: a client that waits this long finds the slot free
        retry_after = max(1, -(-(frees_at - now_us) // US_PER_S))
        return RateDecision(False, limit_per_minute, 0, retry_after, frees_at)
