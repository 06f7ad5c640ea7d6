"""Waiting on what another process or thread does (a flush, a writer thread, a poll, an idle
timer): poll the condition itself until it holds, never a fixed sleep before an assertion.

The deadline is generous because CI is a 2-core machine that may be loaded: a wait that is met
returns as soon as it is met, so a long deadline costs nothing when things go well, and a short
one fails when they are merely slow. On timeout the assertion says what was last seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

WAIT_S = 30.0  # for anything another process does; never what a test asserts about speed


def until(
    probe: Callable[[], T],
    ok: Callable[[T], bool] = bool,
    *,
    timeout: float = WAIT_S,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """`probe()` until `ok` holds for what it returns, which is returned; AssertionError naming
    `what` and the last value seen once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if ok(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {timeout:g} s; last seen: "
                                 f"{seen!r}"[:4000])
        time.sleep(interval)


async def until_async(
    ok: Callable[[], bool], *, timeout: float = WAIT_S, interval: float = 0.002, what: str = ""
) -> None:
    """As `until`, inside an event loop: the loop runs (hooks, callbacks of pool threads) while
    `ok()` is not yet true; it runs once before the first look, so that what was just scheduled
    has started."""
    deadline = time.monotonic() + timeout
    await asyncio.sleep(interval)
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met within {timeout:g} s")
        await asyncio.sleep(interval)
