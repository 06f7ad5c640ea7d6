"""Spare upstream connections: one connected TCP connection kept ready per provider address in
use, so that a request on a new client connection is forwarded without waiting for a connect
(issue 21; mitmproxy's server connections take them through `mitm_patches.install_spare_connections`).
Plain asyncio: nothing here knows mitmproxy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("candela.spares")

# A spare is handed out at most this long after it connected: less than the idle timeout of any
# server that would close a connection on which nothing was sent (a provider's edge: 10 s and
# more); an older one is closed and, while its address is in use, replaced.
SPARE_MAX_AGE_S = 4.0
# spares are kept for an address for this long after a request last opened a connection there
SPARE_WARM_S = 30.0
SPARE_ADDRESSES_MAX = 32  # addresses with a spare at once (the least recently used let go)

Address = tuple[str, int]
Connected = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Spares:
    """One connected TCP connection kept ready per upstream address in use.

    mitmproxy's reverse mode with `connection_strategy: eager` connects upstream as a client
    connects, before its request arrives. Candela's upstream depends on the request (its
    route), so it runs lazy, and a request on a new client connection connected only after
    every gate had passed: `asyncio.open_connection` is five event-loop wake-ups (the connect,
    writable, the transport's `connection_made`, its waiter, the task), each behind whatever
    else the loop has ready; relaying scenario 3's streams, 1.2-1.7 ms before the first
    upstream byte (bench/README.md, issue 21). A spare makes that wait nil: the connection a
    request opens is one connected earlier, in the background, after the previous request
    to the same address took its spare (Envoy's `preconnect_policy` does the same). Nothing is
    sent on a spare until mitmproxy sends a request on it; one older than SPARE_MAX_AGE_S, or
    that its server closed, is never handed out. An address unused for SPARE_WARM_S keeps no
    spare, so an idle proxy holds no connection open."""

    def __init__(
        self, connect: Callable[..., Any], wanted: Callable[[Address], bool] = lambda _a: True
    ) -> None:
        self.connect = connect
        self.wanted = wanted  # the addresses spares are kept for (Candela's: its providers')
        self._ready: dict[Address, tuple[Connected, float]] = {}
        self._pending: dict[Address, asyncio.Future[Connected]] = {}
        self._used: dict[Address, float] = {}  # when a connection to it was last asked for
        self._timers: dict[Address, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def take(self, address: Address) -> Connected | None:
        """The ready spare for `address`, if it is fresh and open; a new one is started."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a proxy served again in this process: a new loop's own
            self._let_go_of_all()
            self._loop = loop
        now = loop.time()
        self._used.pop(address, None)
        self._used[address] = now  # (last in the dict: the most recently used)
        got = self._ready.pop(address, None)
        self._cancel_timer(address)
        if got is not None and not _usable(got[0], now - got[1]):
            got[0][1].close()
            got = None
        self._refill(address)
        if len(self._used) > SPARE_ADDRESSES_MAX:
            self._forget(next(iter(self._used)))
        return got[0] if got is not None else None

    def _refill(self, address: Address) -> None:
        if address in self._ready or address in self._pending:
            return
        task = asyncio.ensure_future(self.connect(*address))
        self._pending[address] = task
        task.add_done_callback(lambda t: self._connected(address, t))

    def _connected(self, address: Address, task: asyncio.Future[Connected]) -> None:
        if self._pending.get(address) is task:
            del self._pending[address]
        if task.cancelled() or task.exception() is not None:
            return  # unreachable now: the next request connects (and reports) as mitmproxy does
        streams = task.result()
        loop = asyncio.get_running_loop()
        if address not in self._used or address in self._ready:
            streams[1].close()
            return
        self._ready[address] = (streams, loop.time())
        self._timers[address] = loop.call_later(SPARE_MAX_AGE_S, self._expired, address)

    def _expired(self, address: Address) -> None:
        """A spare too old to hand out: closed, and replaced while its address is in use."""
        self._timers.pop(address, None)
        got = self._ready.pop(address, None)
        if got is not None:
            got[0][1].close()
        used = self._used.get(address)
        if used is not None and asyncio.get_running_loop().time() - used < SPARE_WARM_S:
            self._refill(address)
        else:
            self._used.pop(address, None)

    def _forget(self, address: Address) -> None:
        self._used.pop(address, None)
        self._cancel_timer(address)
        got = self._ready.pop(address, None)
        if got is not None:
            got[0][1].close()
        task = self._pending.pop(address, None)
        if task is not None:
            task.cancel()

    def _cancel_timer(self, address: Address) -> None:
        timer = self._timers.pop(address, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        for address in list(self._used) + list(self._pending) + list(self._ready):
            self._forget(address)

    def _let_go_of_all(self) -> None:
        """Everything made on a loop no longer running: closed where it still can be."""
        for (_, writer), _born in self._ready.values():
            try:
                writer.close()
            except Exception:
                log.debug("a spare of a loop that stopped could not be closed")
        self._ready.clear()
        self._pending.clear()
        self._used.clear()
        self._timers.clear()

    @property
    def ready(self) -> int:
        return len(self._ready)


def _usable(streams: Connected, age_s: float) -> bool:
    reader, writer = streams
    return (
        age_s < SPARE_MAX_AGE_S
        and not writer.is_closing()
        and not reader.at_eof()
        and reader.exception() is None
        and not getattr(reader, "_buffer", b"")  # a server that spoke first: not fresh
    )
