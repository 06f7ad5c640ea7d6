"""Store calls: hot-path state-store calls batched per event-loop turn, on the loop when they can be."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from candela_mitm.errors import StoreUnavailable
from candela_mitm.state.ports import (
    Call,
    Outcome,
    StateStore,
    StoreUnreachable,
    WouldWait,
    run_calls,
)

T = TypeVar("T")

# A batch refused because the store's lock is held is tried again on the event loop this many
# times (the first half at once after other ready flows ran, the rest after a pause), then run
# on the thread pool, which may wait.
STORE_TRIES = 8
STORE_PAUSE_S = 0.0002

_Future = asyncio.Future[Any]
Pending = tuple[Callable[..., Any], tuple[Any, ...], _Future]


def store_error(e: BaseException) -> BaseException:
    """What each call of a batch that failed as a whole answers: the store's error."""
    if isinstance(e, StoreUnavailable) or not isinstance(e, Exception):
        return e
    return StoreUnavailable(f"state store: {type(e).__name__}: {e}")


def deliver(calls: list[Pending], outcomes: list[Outcome]) -> None:
    """Each call's outcome to its caller's future, in the order the calls were made."""
    for (_, _, fut), (ok, value) in zip(calls, outcomes, strict=True):
        if fut.done():  # its flow is gone (cancelled); what the call did stays done
            continue
        if ok:
            fut.set_result(value)
        elif isinstance(value, asyncio.CancelledError):
            fut.cancel()
        else:
            fut.set_exception(value)


def _uncounted(_n: int) -> None:
    return None


class StoreCalls:
    """The hot-path state-store calls of one process, batched per turn of its event loop.

    Calls made in one turn of the event loop run together, in one transaction, each atomic on
    its own (a savepoint): under load two or three requests settle or reserve in the same turn,
    and in a busy proxy each transaction starts on cold CPU caches (a transaction costs 2-3x
    what it does in a tight loop), so a shared one is much cheaper than several. The answers
    are the same as run one after the other, in the order the calls were made.

    A hop to the thread pool and back costs more CPU than the transaction itself, so the batch
    runs right on the loop when the store can answer without waiting (SQLite with its write lock
    free). If its lock is held the batch is refused with nothing changed and tried again a few
    times (another worker's event loop holds it for tens of microseconds), letting other flows
    run between tries, then runs on the pool. Going there at once made things worse: a pool
    thread holding the lock must win the GIL back from a busy event loop between statements,
    the other workers' calls then found the lock taken too, and most calls ended on the pool.
    A store that cannot join calls (Redis) runs the turn's calls on the pool, one after the
    other in one job (`run_apart`): one hand-off to a pool thread and back per turn rather than
    one per call, each hand-off costing the event loop a wake-up and a GIL handover or two. A
    call whose store is unreachable answers at once for the calls after it (`run_apart`).

    `on_loop(n)` and `on_pool(n)` count the calls that ran on the loop and on the pool.
    """

    def __init__(
        self,
        store: StateStore,
        executor: Executor,
        on_loop: Callable[[int], None] = _uncounted,
        on_pool: Callable[[int], None] = _uncounted,
    ) -> None:
        self.store = store
        self.executor = executor
        self.on_loop = on_loop
        self.on_pool = on_pool
        # calls made during the current event-loop turn, run together after it
        self._turn: list[Pending] | None = None
        self._turn_loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the store, batched with the other calls of this loop turn."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._turn is None or self._turn_loop is not loop:
            # (a turn left by a loop that stopped before running it is abandoned with it)
            self._turn, self._turn_loop = [], loop
            loop.call_soon(self._run_turn, self._turn)
        self._turn.append((fn, args, fut))
        return await fut

    async def _on_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _run_turn(self, calls: list[Pending]) -> None:
        """The calls of this loop turn (call_soon runs it after the turn's other callbacks)."""
        if self._turn is calls:
            self._turn = None
        if not calls:
            return
        if not self.store.joins_calls:
            self._background(self._apart(calls))
            return
        pairs = [(fn, args) for fn, args, _ in calls]
        try:
            outcomes = self.store.call_without_waiting(run_calls, self.store, pairs)
        except WouldWait as e:
            self._background(self._run_turn_later(calls, pairs, e.busy))
            return
        except Exception as e:  # the transaction itself failed: every call did
            outcomes = [(False, store_error(e))] * len(calls)
        except BaseException as e:
            deliver(calls, [(False, store_error(e))] * len(calls))
            raise
        self.on_loop(len(calls))
        deliver(calls, outcomes)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _run_turn_later(self, calls: list[Pending], pairs: list[Call], busy: bool) -> None:
        outcomes: list[Outcome] | None = None
        try:
            for attempt in range(1, STORE_TRIES) if busy else ():
                await asyncio.sleep(0 if attempt < STORE_TRIES // 2 else STORE_PAUSE_S)
                try:
                    outcomes = self.store.call_without_waiting(run_calls, self.store, pairs)
                except WouldWait:
                    continue
                self.on_loop(len(calls))
                break
            if outcomes is None:
                self.on_pool(len(calls))
                outcomes = await self._on_pool(run_calls, self.store, pairs)
        except BaseException as e:
            outcomes = [(False, store_error(e))] * len(calls)
            if isinstance(e, asyncio.CancelledError):
                deliver(calls, outcomes)
                raise
        deliver(calls, outcomes)

    async def _apart(self, calls: list[Pending]) -> None:
        try:
            self.on_pool(len(calls))
            outcomes = await self._on_pool(run_apart, [(fn, args) for fn, args, _ in calls])
        except BaseException as e:
            deliver(calls, [(False, e)] * len(calls))
            if not isinstance(e, Exception):
                raise
            return
        deliver(calls, outcomes)


def run_apart(calls: Sequence[Call]) -> list[Outcome]:
    """Store calls one after the other, each its own outcome (a store that cannot join calls in
    one transaction: Redis, where each is one atomic script). Once a call finds the store
    unreachable (StoreUnreachable: refused, or its timeout spent), the calls after it answer
    that error without trying: a turn of calls must not wait out the timeout once per call
    (before, each ran on a pool thread of its own, side by side)."""
    outcomes: list[Outcome] = []
    down: StoreUnreachable | None = None
    for fn, args in calls:
        if down is not None:
            outcomes.append((False, down))
            continue
        try:
            outcomes.append((True, fn(*args)))
        except StoreUnreachable as e:
            down = e
            outcomes.append((False, e))
        except Exception as e:
            outcomes.append((False, e))
    return outcomes
