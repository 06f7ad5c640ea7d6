"""Chain: the pipeline behind one mitmproxy addon calls each hook in order, guarded like mitmproxy."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import exceptions, options
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster

from candela_mitm.addons.chain import UNUSED_DEFAULTS, Chain, drop_unused_defaults


class Recorder:
    def __init__(self, name: str, calls: list[str], fail: type[BaseException] | None = None):
        self.name, self.calls, self.fail = name, calls, fail

    def request(self, flow: object) -> None:
        self.calls.append(f"{self.name}.request")
        if self.fail is not None:
            raise self.fail("boom")


class AsyncRecorder(Recorder):
    async def request(self, flow: object) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.request")

    async def response(self, flow: object) -> None:
        self.calls.append(f"{self.name}.response")


def test_hooks_run_in_pipeline_order_sync_and_async() -> None:
    calls: list[str] = []
    chain = Chain([Recorder("a", calls), AsyncRecorder("b", calls), Recorder("c", calls)])
    assert set(chain.hooks) == {"request", "response"}
    asyncio.run(chain.request(tflow.tflow()))  # one async hook makes the dispatcher async
    assert calls == ["a.request", "b.request", "c.request"]
    calls.clear()
    asyncio.run(chain.response(tflow.tflow()))  # a lone hook is the member's own method
    assert calls == ["b.response"]
    assert not hasattr(chain, "error") and not hasattr(chain, "addons")


def test_sync_only_hooks_stay_sync() -> None:
    calls: list[str] = []
    chain = Chain([Recorder("a", calls), Recorder("b", calls)])
    assert chain.request(tflow.tflow()) is None
    assert calls == ["a.request", "b.request"]


def test_an_exception_is_logged_and_the_next_member_runs(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    chain = Chain([Recorder("a", calls, fail=ValueError), Recorder("b", calls)])
    with caplog.at_level(logging.ERROR):
        chain.request(tflow.tflow())
    assert calls == ["a.request", "b.request"]
    assert "Addon error" in caplog.text


@pytest.mark.parametrize("halt", [exceptions.AddonHalt, exceptions.OptionsError])
def test_addon_halt_stops_the_chain(halt: type[BaseException]) -> None:
    calls: list[str] = []
    chain = Chain([Recorder("a", calls, fail=halt), Recorder("b", calls)])
    with pytest.raises(halt):
        chain.request(tflow.tflow())
    assert calls == ["a.request"]


def test_unused_defaults_are_dropped_and_the_proxy_core_kept() -> None:
    async def build() -> list[str]:
        master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        dropped = drop_unused_defaults(master)
        assert set(dropped) <= UNUSED_DEFAULTS and "ClientPlayback" in dropped
        for a in dropped:
            assert a.lower() not in master.addons.lookup
        master.options.update(anticache=True)  # options of dropped addons stay registered
        return [type(a).__name__ for a in master.addons.chain]

    kept = asyncio.run(build())
    for needed in ("Core", "Proxyserver", "NextLayer", "TlsConfig", "Block", "ErrorCheck"):
        assert needed in kept
    assert not UNUSED_DEFAULTS & set(kept)
