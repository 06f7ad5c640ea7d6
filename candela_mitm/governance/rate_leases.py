"""Rate leases: a process takes a block of a user's requests-per-minute window in one store call
and admits requests from it in memory until the block's stamp, giving the unused part back.

Why: the rate check is the one store transaction a request carved from a budget slice still
makes (governance/slices.py; 28 µs warm on SQLite, 60 on Redis: bench/README.md, issue 21).

Exact across processes: a block's entries go in the store's sliding log stamped `lifetime_s`
ahead (`rate_take`: up to `n` while the window holds fewer than the limit, in one atomic step),
and the process admits from it only until that stamp. A request admitted at t from a block
stamped s >= t is represented by an entry counted from the take (before t) until s + 60 s
(after t + 60 s): the log over-counts, never under-counts, so no 60-second span admits more
than the limit, whatever the processes do together. The unused part is removed
(`rate_return`) once the stamp has passed; a process that dies holding a block leaves its
entries to age out (at most `requests` of them, a minute past the stamp: under-admission,
never over-admission). `lifetime_s` is at most 1 s: the Redis window's key lives a second past
the window after each plain check.

A block is taken only while the window has room for `headroom` of them: near the limit every
request is checked in the store, as before. Answers from a block carry IETF headers computed
here (remaining: the window's count at the take, less this block's unused part: other
processes' requests since are not seen until the next check in the store).

Not thread-safe on its own: `use` runs on the event loop, `flush` on a pool thread; every
method takes the lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from candela_mitm.governance.ratelimit import WINDOW_S, RateDecision
from candela_mitm.state.ports import US_PER_S, RateStore, RateTake, to_us, utc_now

if TYPE_CHECKING:
    from candela_mitm.config import RateLimitLeases

log = logging.getLogger("candela.rate_leases")


@dataclass(frozen=True)
class LeaseRules:
    """governance.rate_limits.leases, as the manager reads it."""

    requests: int = 32  # a block holds at most this many requests
    headroom: int = 4  # never more than the window's room / headroom
    lifetime_s: float = 1.0
    enabled: bool = True

    @classmethod
    def of(cls, cfg: RateLimitLeases) -> LeaseRules:
        return cls(cfg.requests, cfg.headroom, cfg.lifetime_ms / 1000, cfg.enabled)


@dataclass
class Block:
    user: str
    limit: int
    stamp_us: int  # its entries' stamp: requests are admitted from it until then
    granted: int
    count: int  # the window's entries after the take
    used: int = 0


@dataclass(frozen=True)
class TakeAsk:
    user: str
    limit: int
    take: Callable[[], tuple[RateTake, int]]  # the store call: (its answer, the stamp)


def block_size(rules: LeaseRules, room: int) -> int:
    """How many requests to ask for with `room` left in the window; 0: none (near the limit)."""
    n = min(rules.requests, room // rules.headroom)
    return n if n >= 2 else 0


class RateLeases:
    """This process's rate blocks, one per user (see the module docstring)."""

    def __init__(
        self,
        store: RateStore,
        rules: LeaseRules,
        clock: Callable[[], datetime] = utc_now,
        window_s: int = WINDOW_S,
    ) -> None:
        self.store = store
        self.rules = rules
        self.clock = clock
        self.window_us = window_s * US_PER_S
        self._lock = threading.Lock()
        self._blocks: dict[str, Block] = {}
        self._done: list[Block] = []  # past their stamp or dropped: unused part to give back
        self._taking: set[str] = set()

    def use(self, user: str, limit: int, now_us: int) -> RateDecision | None:
        """One request of `user` admitted from its block (no store call), or None: there is
        none usable (the request is checked in the store)."""
        with self._lock:
            b = self._blocks.get(user)
            if b is None:
                return None
            if not self.rules.enabled or b.limit != limit or now_us > b.stamp_us or (
                b.used >= b.granted
            ):
                self._drop(b)
                return None
            b.used += 1
            remaining = max(0, limit - b.count + (b.granted - b.used))
            return RateDecision(True, limit, remaining, 0, now_us + self.window_us)

    def _drop(self, b: Block) -> None:
        if self._blocks.get(b.user) is b:
            del self._blocks[b.user]
            self._done.append(b)

    def ask(self, user: str, limit: int, decision: RateDecision) -> TakeAsk | None:
        """After a request was checked in the store and admitted: a block to take for the
        next ones, if the window has room for `headroom` of them and none is held or asked."""
        if not self.rules.enabled or not decision.allowed or decision.kind != "requests":
            return None
        n = block_size(self.rules, decision.remaining)
        if not n:
            return None
        with self._lock:
            if user in self._blocks or user in self._taking:
                return None
            self._taking.add(user)
        lifetime_us = round(self.rules.lifetime_s * US_PER_S)

        def take() -> tuple[RateTake, int]:
            now_us = to_us(self.clock())
            stamp = now_us + lifetime_us
            return self.store.rate_take(user, limit, n, self.window_us, now_us, stamp), stamp

        return TakeAsk(user, limit, take)

    def took(self, ask: TakeAsk, got: tuple[RateTake, int] | None) -> bool:
        """The outcome of a TakeAsk's store call (None: it failed)."""
        with self._lock:
            self._taking.discard(ask.user)
            if got is None or got[0].granted <= 0:
                return False
            taken, stamp = got
            b = Block(ask.user, ask.limit, stamp, taken.granted, taken.count)
            old = self._blocks.get(ask.user)
            if old is not None:
                self._drop(old)
            self._blocks[ask.user] = b
            return True

    def retire_all(self) -> None:
        """Every block is given back at the next flush (a reload: limits may have changed)."""
        with self._lock:
            for b in list(self._blocks.values()):
                self._drop(b)

    def due(self) -> bool:
        with self._lock:
            return bool(self._blocks or self._done)

    def held(self) -> int:
        with self._lock:
            return len(self._blocks) + len(self._done)

    def flush(self, everything: bool = False) -> int:
        """Blocking (store calls): give back the unused part of every block past its stamp (all
        of them with `everything`, at shutdown). Returns the entries removed. A return that
        fails leaves its entries to age out of the window (never over-admission)."""
        now_us = to_us(self.clock())
        with self._lock:
            for b in list(self._blocks.values()):
                if everything or now_us > b.stamp_us:
                    self._drop(b)
            done, self._done = self._done, []
        removed = 0
        for b in done:
            unused = b.granted - b.used
            if unused <= 0:
                continue
            try:
                removed += self.store.rate_return(b.user, b.stamp_us, unused)
            except Exception:
                log.exception("could not give back %d requests of %s's rate block", unused, b.user)
        return removed
