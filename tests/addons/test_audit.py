"""Audit addon: the wait for an entry's commit (one per request) before the response ends."""

import asyncio
import threading
from concurrent.futures import Future

import pytest

from candela_mitm.addons.audit import _committed
from candela_mitm.errors import StoreUnavailable


def _resolve_later(fut: Future, value=None, error=None, delay=0.05):
    def go():
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    threading.Timer(delay, go).start()  # as the writer thread does


def test_waits_for_the_writer_threads_commit():
    async def main():
        fut: Future[int] = Future()
        _resolve_later(fut, 7)
        assert not fut.done()
        assert await _committed(fut, 5.0) is True
        assert fut.result() == 7
        done: Future[int] = Future()
        done.set_result(1)
        assert await _committed(done, 5.0) is True  # already committed

    asyncio.run(main())


def test_a_failed_commit_raises():
    async def main():
        fut: Future[int] = Future()
        _resolve_later(fut, error=StoreUnavailable("queue full"))
        with pytest.raises(StoreUnavailable):
            await _committed(fut, 5.0)

    asyncio.run(main())


def test_a_stuck_ledger_times_out_and_a_late_commit_is_harmless():
    async def main():
        fut: Future[int] = Future()
        assert await _committed(fut, 0.05) is False
        return fut

    fut = asyncio.run(main())
    fut.set_result(3)  # the loop is closed by now: the writer's callback must not fail
    assert fut.result() == 3
