"""providers/spares.py: a spare upstream connection per address in use, over real loopback
servers (mitmproxy's use of them: tests/addons/test_mitm_patches.py)."""

from __future__ import annotations

import asyncio
import socket

from candela_mitm.providers import spares as spares_module
from candela_mitm.providers.spares import Spares


class Accepting:
    """A loopback TCP server counting the connections it accepted and those closed by the peer."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = 0
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Accepting:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for w in self.writers:
            w.close()
        self.server.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(w)
        await r.read()  # until the peer closes
        self.closed += 1


async def settle(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


def test_a_spare_is_connected_before_it_is_asked_for_and_replaced_as_it_is_taken():
    async def main() -> None:
        async with Accepting() as srv:
            spares = Spares(asyncio.open_connection)
            assert spares.take(srv.address) is None  # the first request connects itself
            await settle(lambda: spares.ready == 1)
            assert srv.accepted == 1
            got = spares.take(srv.address)
            assert got is not None and not got[1].is_closing()
            assert got[1].get_extra_info("peername")[:2] == srv.address
            await settle(lambda: spares.ready == 1)  # the next one, in the background
            assert srv.accepted == 2 and srv.closed == 0
            got[1].write(b"ping")  # the one handed out is a working connection
            await got[1].drain()
            got[1].close()
            spares.close()
            await settle(lambda: srv.closed == 2)

    asyncio.run(main())


def test_a_spare_too_old_is_closed_and_replaced_only_while_its_address_is_in_use(monkeypatch):
    monkeypatch.setattr(spares_module, "SPARE_MAX_AGE_S", 0.05)

    async def main() -> None:
        async with Accepting() as srv:
            spares = Spares(asyncio.open_connection)
            spares.take(srv.address)
            await settle(lambda: srv.accepted >= 3)  # expired twice, replaced each time
            assert srv.closed >= 2
            monkeypatch.setattr(spares_module, "SPARE_WARM_S", 0.0)  # no request since: cold
            await settle(lambda: spares.ready == 0 and srv.closed == srv.accepted)
            accepted = srv.accepted
            await asyncio.sleep(0.2)
            assert srv.accepted == accepted  # an idle address keeps nothing open
            spares.close()

    asyncio.run(main())


def test_a_spare_its_server_closed_is_not_handed_out():
    async def main() -> None:
        async with Accepting() as srv:
            spares = Spares(asyncio.open_connection)
            spares.take(srv.address)
            await settle(lambda: spares.ready == 1)
            srv.writers[0].close()  # the server's idle timeout, say
            await asyncio.sleep(0.05)
            assert spares.take(srv.address) is None  # mitmproxy connects anew
            await settle(lambda: spares.ready == 1)
            assert spares.take(srv.address) is not None
            spares.close()

    asyncio.run(main())


def test_an_unreachable_address_gets_no_spare_and_no_error():
    async def main() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        address = s.getsockname()[:2]
        s.close()  # nothing listens there
        spares = Spares(asyncio.open_connection)
        assert spares.take(address) is None
        await asyncio.sleep(0.05)
        assert spares.ready == 0 and spares.take(address) is None
        spares.close()

    asyncio.run(main())


def test_spares_are_kept_for_the_most_recently_used_addresses_only(monkeypatch):
    monkeypatch.setattr(spares_module, "SPARE_ADDRESSES_MAX", 2)

    async def main() -> None:
        async with Accepting() as a, Accepting() as b, Accepting() as c:
            spares = Spares(asyncio.open_connection)
            for srv in (a, b):
                spares.take(srv.address)
            await settle(lambda: spares.ready == 2)
            spares.take(c.address)  # a, least recently used, let go: its spare closed
            await settle(lambda: a.closed == 1 and spares.ready == 2)
            assert (a.accepted, b.accepted, c.accepted) == (1, 1, 1)
            spares.close()
            await settle(lambda: b.closed == 1 and c.closed == 1)

    asyncio.run(main())


def test_spares_made_on_a_loop_that_stopped_are_not_handed_out_on_the_next():
    spares = Spares(asyncio.open_connection)

    async def first() -> tuple[str, int]:
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        address = srv.sockets[0].getsockname()[:2]
        spares.take(address)
        await settle(lambda: spares.ready == 1)
        return address

    address = asyncio.run(first())  # (its server went with that loop)

    async def second() -> None:
        assert spares.take(address) is None  # not the first loop's connection
        assert spares.ready == 0
        spares.close()

    asyncio.run(second())
