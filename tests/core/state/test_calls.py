"""Store calls: hot-path calls batched per event-loop turn, run on the loop when the store is free."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from candela_mitm.config import State
from candela_mitm.errors import StoreUnavailable
from candela_mitm.state import open_state_store
from candela_mitm.state.calls import STORE_TRIES, StoreCalls
from candela_mitm.state.ports import StoreUnreachable, WouldWait


class Calls:
    """A StoreCalls over a SQLite store in tmp_path, counting where its calls ran."""

    def __init__(self, tmp_path):
        self.store = open_state_store(State(backend="sqlite", sqlite_path=str(tmp_path / "s.db")))
        self.executor = ThreadPoolExecutor(max_workers=2)
        self.ran: Counter[str] = Counter()
        self.calls = StoreCalls(
            self.store,
            self.executor,
            on_loop=lambda n: self.ran.update({"loop": n}),
            on_pool=lambda n: self.ran.update({"pool": n}),
        )

    def close(self):
        self.executor.shutdown(wait=True)
        self.store.close()


@pytest.fixture
def c(tmp_path):
    calls = Calls(tmp_path)
    yield calls
    calls.close()


def test_a_call_runs_here_when_the_store_is_free_else_on_the_pool(c, monkeypatch):
    here = threading.get_ident()

    def where(tag):
        c.store.rate_hit(tag, 5, 60_000_000, 1)
        return threading.get_ident()

    async def call(tag):
        return await c.calls.call(where, tag)

    assert asyncio.run(call("a")) == here  # SQLite with its lock free: no thread hop

    def busy(fn, *args):
        raise WouldWait("held")

    with monkeypatch.context() as m:
        m.setattr(c.store, "call_without_waiting", busy)
        assert asyncio.run(call("b")) != here  # refused: the pool runs it, once
    assert c.store.rate_hit("a", 5, 60_000_000, 1).count == 2
    assert c.store.rate_hit("b", 5, 60_000_000, 1).count == 2
    assert c.ran == {"loop": 1, "pool": 1}


def test_a_refused_batch_is_tried_again_before_the_pool(c, monkeypatch):
    """A lock held for a moment (another worker's transaction): tried again on the loop; a
    store that never answers without waiting (Redis): straight to the pool, tried once."""
    here = threading.get_ident()
    real = c.store.call_without_waiting
    tries = []

    def busy_twice(fn, *args):
        tries.append(1)
        if len(tries) <= 2:
            raise WouldWait("held")
        return real(fn, *args)

    def remote(fn, *args):
        tries.append(1)
        raise WouldWait("remote", busy=False)

    def always_busy(fn, *args):
        tries.append(1)
        raise WouldWait("held")

    async def call():
        return await c.calls.call(threading.get_ident)

    # (refusal, tries it takes, whether it ran on the loop)
    for refusal, n, on_loop in [(busy_twice, 3, True), (remote, 1, False), (always_busy, STORE_TRIES, False)]:
        tries.clear()
        monkeypatch.setattr(c.store, "call_without_waiting", refusal)
        assert (asyncio.run(call()) == here) is on_loop
        assert len(tries) == n


def test_the_calls_of_one_loop_turn_share_a_transaction(c, monkeypatch):
    """Calls made in the same event-loop turn run together (one call_without_waiting, one
    transaction), in order; one that fails is undone alone and answers only its caller."""
    store = c.store
    real = store.call_without_waiting
    batches = []

    def spy(fn, *args):
        batches.append(len(args[-1]))
        return real(fn, *args)

    def writes_then_fails():
        store.rate_hit("undone", 5, 60_000_000, 1)
        raise ValueError("after a write")

    async def main():
        return await asyncio.gather(
            c.calls.call(store.rate_hit, "k", 5, 60_000_000, 1),
            c.calls.call(writes_then_fails),
            c.calls.call(store.rate_hit, "k", 5, 60_000_000, 2),
            return_exceptions=True,
        )

    monkeypatch.setattr(store, "call_without_waiting", spy)
    first, failed, third = asyncio.run(main())
    monkeypatch.undo()
    assert batches == [3]
    assert (first.count, third.count) == (1, 2)  # in the order they were made
    assert isinstance(failed, ValueError)
    assert store.rate_hit("undone", 5, 60_000_000, 3).count == 1  # its write was undone
    assert c.ran == {"loop": 3}


def test_calls_of_different_turns_are_separate_batches(c, monkeypatch):
    real = c.store.call_without_waiting
    batches = []

    def spy(fn, *args):
        batches.append(len(args[-1]))
        return real(fn, *args)

    async def main():
        a = await c.calls.call(c.store.rate_hit, "k", 5, 60_000_000, 1)
        b = await c.calls.call(c.store.rate_hit, "k", 5, 60_000_000, 2)
        return a, b

    monkeypatch.setattr(c.store, "call_without_waiting", spy)
    a, b = asyncio.run(main())
    assert batches == [1, 1] and (a.count, b.count) == (1, 2)


def test_a_batch_that_fails_whole_fails_every_call(c):
    async def main():
        return await asyncio.gather(
            c.calls.call(c.store.rate_hit, "k", 5, 60_000_000, 1),
            c.calls.call(c.store.get_user, "nobody"),
            return_exceptions=True,
        )

    c.store.close()
    results = asyncio.run(main())
    assert len(results) == 2 and all(isinstance(r, StoreUnavailable) for r in results)


def test_a_store_that_cannot_join_calls_runs_a_turn_in_one_pool_job(c, monkeypatch):
    here = threading.get_ident()
    monkeypatch.setattr(c.store, "joins_calls", False)  # as Redis
    jobs = []
    submit = c.executor.submit
    monkeypatch.setattr(c.executor, "submit", lambda *a, **k: jobs.append(a) or submit(*a, **k))

    async def main():
        return await asyncio.gather(
            c.calls.call(threading.get_ident),
            c.calls.call(c.store.get_user, "nobody"),
            c.calls.call(threading.get_ident),
        )

    where, user, where_too = asyncio.run(main())
    assert where != here and where_too == where and user is None
    assert c.ran == {"pool": 3} and len(jobs) == 1  # one hand-off for the turn's three calls


def test_calls_after_one_that_found_the_store_unreachable_fail_at_once(c, monkeypatch):
    monkeypatch.setattr(c.store, "joins_calls", False)
    tried = []

    def unreachable():
        tried.append("unreachable")
        raise StoreUnreachable("refused")

    def answered_with_an_error():
        tried.append("error")
        raise StoreUnavailable("script error")

    def then():
        tried.append("then")
        return 7

    async def main():
        return await asyncio.gather(
            c.calls.call(answered_with_an_error), c.calls.call(then),
            c.calls.call(unreachable), c.calls.call(then), return_exceptions=True,
        )

    error, seven, down, skipped = asyncio.run(main())
    # an error the store answered fails its own call only; an unreachable store the rest
    assert type(error) is StoreUnavailable and seven == 7
    assert isinstance(down, StoreUnreachable) and skipped is down
    assert tried == ["error", "then", "unreachable"]


def test_a_call_that_fails_alone_on_the_pool_answers_its_caller(c, monkeypatch):
    monkeypatch.setattr(c.store, "joins_calls", False)

    def fails():
        raise KeyError("x")

    async def main():
        return await asyncio.gather(c.calls.call(fails), c.calls.call(lambda: 7),
                                    return_exceptions=True)

    failed, seven = asyncio.run(main())
    assert isinstance(failed, KeyError) and seven == 7


def test_a_turn_left_by_a_stopped_loop_does_not_hold_up_the_next(c):
    gone = asyncio.new_event_loop()
    stale = gone.create_future()
    # a call queued on a loop that stopped before running its turn
    c.calls._turn, c.calls._turn_loop = [(c.store.get_user, ("x",), stale)], gone

    async def main():
        return await asyncio.wait_for(c.calls.call(c.store.rate_hit, "k", 5, 60_000_000, 1), 5)

    try:
        assert asyncio.run(main()).count == 1  # a new loop starts its own turn
    finally:
        gone.close()


def test_reads_alone_are_answered_on_the_loop_while_another_writer_holds_the_store(c, tmp_path):
    """A turn of reads only (a minted key's lookup, a user's settings) takes no write lock nor
    write gate: while another store on the same file holds both (its batch open), the reads
    answer at once on the loop; a write, or a read joined with a write, is refused there and
    waits on the pool for the writer, as before."""
    from candela_mitm.state.ports import reads_only

    store = c.store
    assert reads_only(store, [(store.api_key, ("ab" * 32,)), (store.get_user, ("u",))])
    assert not reads_only(store, [(store.api_key, ("x",)), (store.rate_hit, ("k", 5, 1, 1))])
    assert not reads_only(store, [(lambda: store.api_key("x"), ())])  # not the store's own
    other = open_state_store(State(backend="sqlite", sqlite_path=str(tmp_path / "s.db")))
    try:
        writer_in = threading.Event()
        release = threading.Event()

        def hold():
            with other.batch():
                other.rate_hit("w", 5, 60_000_000, 1)
                writer_in.set()
                release.wait(30)

        t = threading.Thread(target=hold)
        t.start()
        assert writer_in.wait(30)
        try:

            async def reads():
                return await asyncio.gather(
                    c.calls.call(store.api_key, "ab" * 32), c.calls.call(store.get_user, "nobody")
                )

            assert asyncio.run(reads()) == [None, None]
            assert c.ran == {"loop": 2}  # answered here, the writer still in its transaction

            async def mixed():
                return await asyncio.gather(
                    c.calls.call(store.api_key, "ab" * 32),
                    c.calls.call(store.rate_hit, "k", 5, 60_000_000, 1),
                )

            task = threading.Thread(target=lambda: asyncio.run(mixed()))
            task.start()
            task.join(0.3)
            assert task.is_alive()  # the write (and the read joined with it) waits
        finally:
            release.set()
            t.join(30)
        task.join(30)
        assert not task.is_alive()
        assert c.ran["pool"] == 2  # the mixed turn, once the writer let go
    finally:
        other.close()
