"""Audit addon: the wait for an entry's commit (one per request) before the response ends."""

import asyncio
import threading

import pytest

from candela_mitm.addons.audit import CommitWaits
from candela_mitm.errors import StoreUnavailable


def _report_later(committed, seq=None, error=None, delay=0.05):
    threading.Timer(delay, committed, args=(seq, error)).start()  # as the writer thread does


def test_waits_for_the_writer_threads_commit():
    async def main():
        waits = CommitWaits(asyncio.get_running_loop(), 5.0)
        fut, committed = waits.begin()
        _report_later(committed, 7)
        assert not fut.done()
        assert await fut is True
        fut, committed = waits.begin()
        committed(1, None)  # committed before anyone awaits
        assert await fut is True

    asyncio.run(main())


def test_a_failed_commit_raises():
    async def main():
        waits = CommitWaits(asyncio.get_running_loop(), 5.0)
        fut, committed = waits.begin()
        _report_later(committed, error=StoreUnavailable("queue full"))
        with pytest.raises(StoreUnavailable):
            await fut

    asyncio.run(main())


def test_a_burst_of_commits_wakes_the_loop_once():
    async def main():
        loop = asyncio.get_running_loop()
        waits = CommitWaits(loop, 5.0)
        pairs = [waits.begin() for _ in range(100)]
        wakes = 0
        threadsafe = loop.call_soon_threadsafe

        def counting(cb, *args):
            nonlocal wakes
            wakes += 1
            return threadsafe(cb, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        done = threading.Event()

        def writer():
            for seq, (_, committed) in enumerate(pairs):
                committed(seq, None)
            done.set()

        threading.Thread(target=writer).start()
        results = await asyncio.gather(*(f for f, _ in pairs))
        assert results == [True] * 100
        assert done.is_set() and 1 <= wakes < 100
        # a commit reported after a delivery ran is delivered too
        fut, committed = waits.begin()
        threading.Thread(target=committed, args=(101, None)).start()
        assert await asyncio.wait_for(fut, 5) is True

    asyncio.run(main())


def test_a_stuck_ledger_times_out_and_a_late_commit_is_harmless():
    async def main():
        loop = asyncio.get_running_loop()
        waits = CommitWaits(loop, 0.05, sweep_s=0.02)
        slow, late = waits.begin()
        quick, on_time = waits.begin()
        on_time(2, None)
        assert await quick is True
        assert await slow is False
        assert 0.04 <= loop.time() - t0 < 1.0
        assert not waits._open and waits._sweeper is None  # nothing left to sweep
        late(3, None)  # the wait ended: ignored
        await asyncio.sleep(0.01)
        return late

    t0 = 0.0

    async def timed():
        nonlocal t0
        t0 = asyncio.get_running_loop().time()
        return await main()

    late = asyncio.run(timed())
    late(4, None)  # the loop is closed by now: the writer's callback must not fail
