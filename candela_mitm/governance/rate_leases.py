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
never over-admission). `lifetime_s` is at most 1 s (a one-second block); the store keeps an
entry until its stamp + the window however far ahead it is stamped (the Redis window key's TTL
is set from its newest entry by every rate script, never cut to the window + 1 s).

A block is taken only while the window has room for `headroom` of them: near the limit every
request is checked in the store, as before; and only for a user checked in the store twice
within a block's lifetime (as a slice is taken only for budgets reserved twice within its
`idle_s`), or within an idle block's.

Idle blocks (`idle_lifetime_s`, 30 s by default; 0: none): a user checked in the store twice
within `idle_lifetime_s` but not within `lifetime_s` (one request every few seconds, the common
LLM pattern: too slow for a one-second block, which would be taken and given back for each
request) gets a small block stamped `idle_lifetime_s` ahead, sized to the pace of its last
checks (up to 8) within that lifetime: nine tenths of what that pace asks over the lifetime,
at least 1, at most `requests`, never more than the room / `headroom` (`idle_block_size`). Its
requests are admitted from it until its stamp or until spent; the unused part is given back
after the stamp (`flush`, as any block's). So from a user's second check on, its requests are
admitted in memory: the next idle block is asked ahead of the one in use's end, as below.

How they coexist: a user has one block in use and at most one waiting, whatever their kind.
The next block's kind follows the pace seen on the one in use (`LeaseRules.idle`): an idle
block while one of at most `requests` covers its lifetime's demand (0.9 x pace x
idle_lifetime_s <= requests: up to about 1.2 requests a second at the defaults), else a
one-second block sized as below. It is asked within an eighth of *its own* lifetime (an idle
one: or a gap and a half at the pace) of the one in use's end, and waits until that one is spent or past its stamp: a user getting busy spends
its idle block and goes on with one-second blocks (none wasted: a one-second block is asked
only within 1/8 s of the idle one's end), and one slowing down on one-second blocks goes on
with an idle one.

Exactness with idle blocks, and the over-count: a request admitted at t from an idle block
stamped s counts until s + 60 s, up to `idle_lifetime_s` longer than its own minute: the log
over-counts, never under-counts, so no 60-second span admits more than the limit across
processes. The over-count at any moment is at most (a) the unused part of the blocks held
(one in use, one waiting: each at most min(`requests`, room / `headroom`)) plus (b) the
requests admitted from idle blocks in the `idle_lifetime_s` before the counted minute (their
stamps still inside it); idle blocks are taken only while one covers a lifetime's demand, so
(b) is about `requests` at most too. At the defaults: under 3 x 32 entries, no block ever more
than a quarter of the room; a user at one request every 5 s over-counts by at most 10 (tests).
Near the limit (room for fewer than `headroom` blocks of two) no block of either kind: every
request is checked in the store, exactly.

The next block is asked before the one in use runs out (`ask_next`, after a request admitted
from it, in the background as any block is taken): when, at the pace seen on it (and on the
block before it), it will be spent or past its stamp within an eighth of the next one's
lifetime (the margin for the ask: far more than a store call takes), or for an idle one
within a gap and a half between requests at that pace if that is longer (an idle user's next
request may come seconds after the end). At most one ask is in
flight per user and one block waits: it is used once the one in use is spent or past its
stamp (no switch wastes a block's rest). It is sized for nine tenths of what that pace admits
from then until its own stamp (spent just before its stamp: a bigger one would leave a rest to
give back, a store call): a one-second block at least `requests`, at most `max_requests`, an
idle one as above, never more than the window's room at the last take / headroom; `rate_take` grants only what the window holds below the limit,
as for any block. Two blocks of one user are both in the window from their takes: the log
over-counts, never under-counts. A block asked before a `retire_all` (a reload) is given
back unused when it comes.

Answers from a block carry IETF headers computed here (remaining: the window's count at the
take, less this block's unused part: other processes' requests since are not seen until the
next check in the store).

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

from candela_mitm.governance.ahead import ask_after
from candela_mitm.governance.ratelimit import WINDOW_S, RateDecision
from candela_mitm.state.ports import US_PER_S, RateStore, RateTake, to_us, utc_now

if TYPE_CHECKING:
    from candela_mitm.config import RateLimitLeases

log = logging.getLogger("candela.rate_leases")


CHECKED_MAX = 10_000  # users remembered as checked in the store (the least recent forgotten)


@dataclass(frozen=True)
class LeaseRules:
    """governance.rate_limits.leases, as the manager reads it."""

    requests: int = 32  # a first block holds at most this many (one taken ahead, at least)
    headroom: int = 4  # never more than the window's room / headroom
    lifetime_s: float = 1.0
    enabled: bool = True
    max_requests: int = 1024  # a block asked ahead covers its lifetime's demand, up to this
    # a block is taken for a user checked in the store this many times within a lifetime (1:
    # at the first check; tests of a block's own life use that)
    checks: int = 2
    # an idle block (a user checked twice within this, not within `lifetime_s`) is stamped this
    # far ahead; 0: none (an idle user is checked in the store each time)
    idle_lifetime_s: float = 30.0

    @classmethod
    def of(cls, cfg: RateLimitLeases) -> LeaseRules:
        return cls(cfg.requests, cfg.headroom, cfg.lifetime_ms / 1000, cfg.enabled,
                   cfg.max_requests, idle_lifetime_s=cfg.idle_lifetime_ms / 1000)

    def idle(self, per_s: float) -> bool:
        """At `per_s` requests a second, an idle block (at most `requests`) covers its
        lifetime's demand: the next block is an idle one, else a one-second one."""
        return self.idle_lifetime_s > 0 and 0.9 * per_s * self.idle_lifetime_s <= self.requests


@dataclass
class Block:
    user: str
    limit: int
    stamp_us: int  # its entries' stamp: requests are admitted from it until then
    granted: int
    count: int  # the window's entries after the take
    used: int = 0
    taken_us: int = 0  # when it was taken
    # its pace: base + used requests since since_us (the block before it counts too, once this
    # one follows it: a pace measured on a few requests would be noise)
    since_us: int = 0
    base: int = 0
    start_us: int = 0  # when it came into use


@dataclass(frozen=True)
class TakeAsk:
    user: str
    limit: int
    take: Callable[[], tuple[RateTake, int]]  # the store call: (its answer, the stamp)
    epoch: int = 0  # retire_all's count when asked: a block asked before one is given back
    lifetime_us: int = 0  # its stamp is this far past its take (a one-second or an idle block)
    after_s: float = 0.0  # the take may wait this long (governance/ahead.py)


def block_size(rules: LeaseRules, room: int) -> int:
    """How many requests to ask for with `room` left in the window; 0: none (near the limit)."""
    n = min(rules.requests, room // rules.headroom)
    return n if n >= 2 else 0


def idle_block_size(rules: LeaseRules, want: float, room: int) -> int:
    """An idle block for `want` requests over its lifetime with `room` left in the window: at
    least 1, at most `requests`, never more than room / headroom; 0: none (near the limit,
    where room / headroom is under 2, as for any block). A block of one: a user whose next
    request is all its lifetime holds (one every 17 s, blocks of 30 s) takes one a request, off
    its path, and gives none back (a block of 2 gave one back each time: a second store write
    a request)."""
    cap = min(rules.requests, room // rules.headroom)
    return min(max(int(want), 1), cap) if cap >= 2 else 0


def next_block_size(rules: LeaseRules, per_s: float, room: int) -> int:
    """The block asked ahead of the one in use at `per_s` requests a second over a lifetime
    with `room` left in the window at its take; 0: none (near the limit)."""
    want = min(max(int(per_s * rules.lifetime_s), rules.requests),
               max(rules.max_requests, rules.requests))
    n = min(want, room // rules.headroom)
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
        self._next: dict[str, Block] = {}  # taken ahead: used once the one in use is spent
        self._done: list[Block] = []  # past their stamp or dropped: unused part to give back
        self._taking: set[str] = set()
        # user -> when its requests were last checked in the store (the last few, within an
        # idle block's lifetime: their pace sizes an idle block)
        self._checked: dict[str, list[int]] = {}
        self._epoch = 0  # retire_all calls

    def use(self, user: str, limit: int, now_us: int) -> RateDecision | None:
        """One request of `user` admitted from its block (no store call), or None: there is
        none usable (the request is checked in the store)."""
        with self._lock:
            b = self._blocks.get(user)
            if b is None or not self._usable(b, limit, now_us):
                prev = b
                if b is not None:
                    self._drop(b)
                b = self._next.pop(user, None)  # the block taken ahead, if any
                if b is None:
                    return None
                if not self._usable(b, limit, now_us):
                    self._done.append(b)
                    return None
                self._blocks[user] = b
                b.start_us = now_us
                if prev is not None:
                    b.since_us, b.base = prev.start_us, prev.used
                else:  # the pace since its take (the request that asked it, not counted)
                    b.since_us = b.taken_us
            b.used += 1
            remaining = max(0, limit - b.count + (b.granted - b.used))
            return RateDecision(True, limit, remaining, 0, now_us + self.window_us)

    def _usable(self, b: Block, limit: int, now_us: int) -> bool:
        return self.rules.enabled and b.limit == limit and now_us <= b.stamp_us and (
            b.used < b.granted
        )

    def _drop(self, b: Block) -> None:
        if self._blocks.get(b.user) is b:
            del self._blocks[b.user]
            self._done.append(b)

    def ask_next(self, user: str, limit: int, now_us: int) -> TakeAsk | None:
        """After a request admitted from `user`'s block: the next block to take now, before
        this one runs out (at the pace seen on it, within an eighth of its lifetime), or
        None."""
        if not self.rules.enabled:
            return None
        with self._lock:
            b = self._blocks.get(user)
            if b is None or b.limit != limit or user in self._next or user in self._taking:
                return None
            lifetime_us = b.stamp_us - b.taken_us
            seen_us = now_us - b.since_us
            left = b.granted - b.used
            # requests since since_us: the take's (its asking request, not counted) or the first
            # of the block before (counted: one gap fewer than requests, which matters at an idle
            # pace of a few requests a block)
            seen_n = b.base + b.used - (1 if b.base else 0)
            per_s = seen_n / (max(seen_us, 1000) / US_PER_S)
            ends_us = b.stamp_us
            if 8 * seen_us >= lifetime_us and per_s > 0:  # a pace to trust: when it runs out
                ends_us = min(ends_us, now_us + int(left / per_s * US_PER_S))
            elif 4 * left <= b.granted:  # else: a quarter left
                ends_us = now_us
            # the next one's kind follows the pace: an idle block while one covers its
            # lifetime's demand, else a one-second block
            idle = self.rules.idle(per_s)
            next_us = self._lifetime_us(idle)
            # the margin: an eighth of the next one's lifetime; for an idle one, a gap and a
            # half between requests at that pace if longer (an idle user's next request may
            # come seconds after the end; a one-second block asked that early would be used
            # only for the rest of its second: more takes and returns)
            margin_us = next_us / 8
            if idle:
                margin_us = max(margin_us, 1.5 / per_s * US_PER_S)
            if ends_us - now_us > margin_us:
                return None  # more than the margin left
            # the next is used from then until its stamp, a lifetime from now; nine tenths of
            # that: spent just before its stamp rather than a few left to give back (a return is
            # a store call; a pace that varies would leave some at most blocks' ends)
            span_s = max(now_us + next_us - ends_us, 0) / US_PER_S
            if idle:
                n = idle_block_size(self.rules, 0.9 * per_s * span_s, limit - b.count)
            else:
                n = next_block_size(self.rules, 0.9 * per_s * span_s / self.rules.lifetime_s,
                                    limit - b.count)
            if not n:
                return None
            self._taking.add(user)
        return self._ask(user, limit, n, next_us, ask_after(1 / per_s) if per_s > 0 else 0.0)

    def ask(self, user: str, limit: int, decision: RateDecision) -> TakeAsk | None:
        """After a request was checked in the store and admitted: a block to take for the
        next ones, if the window has room for `headroom` of them, none is held or asked, and
        the user was checked in the store before within a block's lifetime (a one-second
        block), or within an idle block's (an idle block, sized to the pace of its checks
        then; a user checked once in a while is checked in the store each time, rather than
        take and give back a block for each)."""
        if not self.rules.enabled or not decision.allowed or decision.kind != "requests":
            return None
        n = block_size(self.rules, decision.remaining)
        if not n:
            return None
        now_us = to_us(self.clock())
        idle_us = self._lifetime_us(True)
        lifetime_us = self._lifetime_us(False)
        keep_us = max(idle_us, lifetime_us)
        with self._lock:
            seen = [t for t in self._checked.pop(user, ()) if now_us - t <= keep_us][-7:]
            seen.append(now_us)
            self._checked[user] = seen  # last in the dict's order: the least recent come first
            while len(self._checked) > CHECKED_MAX:  # many users: forget the least recent (O(1)
                del self._checked[next(iter(self._checked))]  # a call, not a scan past it)
            recent = len(seen) > 1 and now_us - seen[-2] <= lifetime_us
            if self.rules.checks > 1 and not recent:
                if not self.rules.idle_lifetime_s or len(seen) < 2:
                    return None
                # an idle block: sized to the pace of the checks within its lifetime
                per_s = (len(seen) - 1) / (max(now_us - seen[0], 1) / US_PER_S)
                n = idle_block_size(self.rules, 0.9 * per_s * self.rules.idle_lifetime_s,
                                    decision.remaining)
                if not n:
                    return None
                lifetime_us = idle_us
            if user in self._blocks or user in self._next or user in self._taking:
                return None
            self._taking.add(user)
        gap_s = (now_us - seen[-2]) / US_PER_S if len(seen) > 1 else 0.0
        return self._ask(user, limit, n, lifetime_us, ask_after(gap_s))

    def _lifetime_us(self, idle: bool) -> int:
        if idle:
            return round(self.rules.idle_lifetime_s * US_PER_S)
        return round(self.rules.lifetime_s * US_PER_S)

    def _ask(self, user: str, limit: int, n: int, lifetime_us: int, after_s: float) -> TakeAsk:
        def take() -> tuple[RateTake, int]:
            now_us = to_us(self.clock())
            stamp = now_us + lifetime_us
            return self.store.rate_take(user, limit, n, self.window_us, now_us, stamp), stamp

        return TakeAsk(user, limit, take, self._epoch, lifetime_us, after_s)

    def took(self, ask: TakeAsk, got: tuple[RateTake, int] | None) -> bool:
        """The outcome of a TakeAsk's store call (None: it failed)."""
        with self._lock:
            self._taking.discard(ask.user)
            if got is None or got[0].granted <= 0:
                return False
            taken, stamp = got
            lifetime_us = ask.lifetime_us or self._lifetime_us(False)
            b = Block(ask.user, ask.limit, stamp, taken.granted, taken.count,
                      taken_us=stamp - lifetime_us, since_us=stamp - lifetime_us,
                      start_us=stamp - lifetime_us)
            if ask.epoch != self._epoch:  # a reload since it was asked: given back unused
                self._done.append(b)
                return True
            old = self._blocks.get(ask.user)
            if old is not None and old.limit == b.limit and old.used < old.granted and (
                to_us(self.clock()) <= old.stamp_us
            ):
                self._next[ask.user] = b  # used once the one in use is spent
                return True
            if old is not None:
                self._drop(old)
            self._blocks[ask.user] = b
            return True

    def retire_all(self) -> None:
        """Every block is given back at the next flush (a reload: limits may have changed)."""
        with self._lock:
            self._epoch += 1
            for b in list(self._blocks.values()):
                self._drop(b)
            self._done.extend(self._next.values())
            self._next.clear()

    def due(self) -> bool:
        with self._lock:
            return bool(self._blocks or self._done or self._next)

    def held(self) -> int:
        with self._lock:
            return len(self._blocks) + len(self._done) + len(self._next)

    def flush(self, everything: bool = False) -> int:
        """Blocking (store calls): give back the unused part of every block past its stamp (all
        of them with `everything`, at shutdown); a block in use whose next one waits stays
        until the next is used (`use` hands its pace on: an idle user's next request may come
        after the stamp) or is past its own stamp. Returns the entries removed. A return that
        fails leaves its entries to age out of the window (never over-admission)."""
        now_us = to_us(self.clock())
        with self._lock:
            for b in list(self._blocks.values()):
                nxt = self._next.get(b.user)
                if everything or now_us > b.stamp_us and (nxt is None or now_us > nxt.stamp_us):
                    self._drop(b)
            for user, b in list(self._next.items()):
                if everything or now_us > b.stamp_us:
                    self._done.append(self._next.pop(user))
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
