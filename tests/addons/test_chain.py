"""addons/chain.py: the default addons Candela drops, and the hook table that dispatches events."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import pytest
from mitmproxy import exceptions, hooks, options
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster

from candela_mitm.addons.chain import (
    UNUSED_DEFAULTS,
    drop_unused_defaults,
    hook_args,
    use_hook_table,
)
from candela_mitm.addons.flowstate import KEY, ROUTE_KINDS, for_routes
from candela_mitm.context import RequestContext
from candela_mitm.observability.spans import TraceContext


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


def test_hooks_run_in_chain_order_sync_and_async() -> None:
    def make(calls: list[str]) -> list[object]:
        return [Recorder("a", calls), AsyncRecorder("b", calls), Recorder("c", calls)]

    calls = _run_through(True, make)
    assert calls == ["a.request", "b.request", "c.request", "b.response"]
    assert calls == _run_through(False, make)


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


# --- HookTable: the master's dispatch, only to the addons that have the hook -------------------
class Everything(Recorder):
    """Has every hook of a request's life, plus update."""

    def requestheaders(self, flow: object) -> None:
        self.calls.append(f"{self.name}.requestheaders")

    async def response(self, flow: object) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.response")

    def update(self, flows: object) -> None:
        self.calls.append(f"{self.name}.update")


class Parent:
    """An addon with children: mitmproxy walks them after the parent, depth first."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.addons = [Recorder("child1", calls), Recorder("child2", calls)]

    def request(self, flow: object) -> None:
        self.calls.append("parent.request")


def _events(f: object) -> list[object]:
    from mitmproxy.proxy.layers import http as lhttp

    return [
        lhttp.HttpRequestHeadersHook(f),  # type: ignore[arg-type]
        lhttp.HttpRequestHook(f),  # type: ignore[arg-type]
        lhttp.HttpResponseHook(f),  # type: ignore[arg-type]
    ]


def _run_through(
    fast: bool, make: object, prepare: Callable[[object], None] | None = None
) -> list[str]:
    """Every event of a request through a master's addon manager; the calls, in order."""

    async def go() -> list[str]:
        calls: list[str] = []
        master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        drop_unused_defaults(master)
        for addon in make(calls):  # type: ignore[operator]
            master.addons.add(addon)
        if fast:
            use_hook_table(master)
        f = tflow.tflow(resp=True)
        if prepare is not None:
            prepare(f)
        try:
            for event in _events(f):
                await master.addons.handle_lifecycle(event)  # type: ignore[arg-type]
        finally:  # its log handler would outlive this loop (a master that never ran)
            master._legacy_log_events.uninstall()
        return calls

    return asyncio.run(go())


@pytest.mark.parametrize(
    "make",
    [
        lambda calls: [Everything("a", calls), Recorder("b", calls), Parent(calls)],
        lambda calls: [Recorder("a", calls), Everything("b", calls)],
        lambda calls: [Recorder("a", calls), AsyncRecorder("b", calls)],
    ],
)
def test_hook_table_calls_what_mitmproxy_calls_in_its_order(make: object) -> None:
    assert _run_through(True, make) == _run_through(False, make)
    assert _run_through(True, make)  # it did call something


def test_hook_table_skips_update_when_no_addon_has_it() -> None:
    calls = _run_through(True, lambda calls: [Recorder("a", calls)])
    assert calls == ["a.request"]
    calls = _run_through(True, lambda calls: [Everything("a", calls)])
    assert calls.count("a.update") == 3  # one after each flow event, as mitmproxy does


def test_hook_table_sees_a_changed_chain() -> None:
    async def go() -> list[str]:
        calls: list[str] = []
        master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        use_hook_table(master)
        event = _events(tflow.tflow())[1]
        await master.addons.handle_lifecycle(event)  # type: ignore[arg-type]
        late = Recorder("late", calls)
        master.addons.add(late)
        await master.addons.handle_lifecycle(event)  # type: ignore[arg-type]
        master.addons.remove(late)
        await master.addons.handle_lifecycle(event)  # type: ignore[arg-type]
        master._legacy_log_events.uninstall()
        return calls

    assert asyncio.run(go()) == ["late.request"]


def test_hook_table_guards_each_addon_like_mitmproxy(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        calls = _run_through(
            True, lambda calls: [Recorder("a", calls, fail=ValueError), Recorder("b", calls)]
        )
    assert calls == ["a.request", "b.request"]
    assert "Addon error: boom" in caplog.text
    # AddonHalt ends the event quietly (b's request is not called); update and the next events run
    def halting(calls: list[str]) -> list[object]:
        return [Recorder("a", calls, fail=exceptions.AddonHalt), Everything("b", calls)]

    calls = _run_through(True, halting)
    assert calls == _run_through(False, halting)
    assert calls == ["b.requestheaders", "b.update", "a.request", "b.update", "b.response", "b.update"]
    with pytest.raises(exceptions.OptionsError):
        _run_through(True, lambda calls: [Recorder("a", calls, fail=exceptions.OptionsError)])


def test_hook_table_leaves_odd_attributes_to_mitmproxy(caplog: pytest.LogCaptureFixture) -> None:
    class NotCallable:
        request = 42

    class ModuleNamedLikeAHook:
        request = logging  # a module: mitmproxy skips it

    assert _run_through(True, lambda calls: [ModuleNamedLikeAHook(), Recorder("a", calls)]) == [
        "a.request"
    ]
    # mitmproxy logs a non-callable hook as that addon's error and goes on; the table defers to it
    for fast in (True, False):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert _run_through(fast, lambda calls: [NotCallable(), Recorder("a", calls)]) == ["a.request"]
        assert "not callable" in caplog.text


def test_the_pipeline_joins_mitmproxys_chain_addon_by_addon(runtime, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As addons/server.py builds it: mitmproxy's kept addons, then the pipeline's, in order."""
    from candela_mitm.addons import pipeline

    rt = runtime(
        {
            "providers": {"openai": {"base_url": "http://upstream.test:8080"}},
            "state": {"sqlite_path": str(tmp_path / "state.db")},
            "audit": {"sqlite_path": str(tmp_path / "audit.db")},
        }
    )

    async def build() -> list[str]:
        master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        drop_unused_defaults(master)
        members = pipeline(rt)
        master.addons.add(*members)  # names are unique: mitmproxy refuses a second of one
        use_hook_table(master)
        try:
            hooks = master.addons._hooks_for("response")  # type: ignore[attr-defined]
            return [type(fn.__self__).__name__ for fn, _ in hooks]
        finally:
            master._legacy_log_events.uninstall()

    names = asyncio.run(build())
    assert names[0] == "AuditStart" and names[-1] == "Audit"
    assert names == [
        type(m).__name__
        for m in pipeline(rt)
        if callable(getattr(m, "response", None)) and "response" not in getattr(m, "idle_hooks", ())
    ]
    assert "LocalUi" not in names and "Telemetry" not in names  # idle in candela-server
    rt.close()


def test_hook_args_are_mitmproxys_for_every_hook() -> None:
    # every hook mitmproxy (and its addons, imported above through DumpMaster) has registered
    import mitmproxy.addons  # noqa: F401
    import mitmproxy.proxy.layers  # noqa: F401

    assert len(hooks.all_hooks) > 30
    for name, cls in hooks.all_hooks.items():
        values = {f.name: object() for f in dataclasses.fields(cls)}
        event = cls(**values)
        assert hook_args(event) == event.args() == list(values.values()), name
        assert hook_args(event) == event.args(), name  # the second time, from the cache


# --- hooks the table leaves out: idle ones, and those for other route kinds --------------------
class ForAdmin(Recorder):
    @for_routes("admin")
    def request(self, flow: object) -> None:
        self.calls.append(f"{self.name}.request")

    @for_routes(but=("proxy", "chat"))
    async def response(self, flow: object) -> None:
        self.calls.append(f"{self.name}.response")


class Idle(Everything):
    idle_hooks = frozenset({"requestheaders", "response"})


def _with_kind(kind: str | None) -> Callable[[object], None]:
    def put(f: object) -> None:
        if kind is not None:
            f.metadata[KEY] = RequestContext(  # type: ignore[attr-defined]
                kind=kind, provider=None, rest="/", trace=TraceContext.from_headers(None)  # type: ignore[arg-type]
            )

    return put


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("admin", ["r.request", "a.request", "r.request", "a.response"]),
        ("metrics", ["r.request", "r.request", "a.response"]),
        ("proxy", ["r.request", "r.request"]),
        ("chat", ["r.request", "r.request"]),
        (None, ["r.request", "r.request"]),  # no context: none of the marked hooks has work
    ],
)
def test_hook_table_calls_a_route_kinds_hook_only_for_it(
    kind: str | None, expected: list[str]
) -> None:
    def make(calls: list[str]) -> list[object]:
        return [Recorder("r", calls), ForAdmin("a", calls), Recorder("r2", calls)]

    calls = _run_through(True, make, _with_kind(kind))
    assert [c.replace("r2.", "r.") for c in calls] == expected
    # mitmproxy's own walk calls them all (each keeps its own check, here none)
    assert _run_through(False, make, _with_kind(kind)) == [
        "r.request", "a.request", "r2.request", "a.response"
    ]


def test_hook_table_leaves_out_an_addons_idle_hooks() -> None:
    calls = _run_through(True, lambda calls: [Idle("i", calls), Recorder("r", calls)])
    assert calls == ["i.update", "i.request", "r.request", "i.update", "i.update"]
    calls = _run_through(False, lambda calls: [Idle("i", calls), Recorder("r", calls)])
    assert "i.requestheaders" in calls and "i.response" in calls  # mitmproxy knows no idle_hooks


def test_for_routes_names_route_kinds_only() -> None:
    assert for_routes(but=("proxy",))(lambda f: None).candela_routes == ROUTE_KINDS - {"proxy"}  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="no such route kind"):
        for_routes("admn")  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["server", "local"])
def test_every_hook_the_table_leaves_out_does_nothing_there(runtime, tmp_path, command) -> None:  # type: ignore[no-untyped-def]
    """The pipeline's hooks marked for some route kinds, called for a flow of every other kind
    (and one without a context), and its idle hooks for every kind: none answers, denies or
    raises (so leaving them out changes nothing)."""
    from candela_mitm.addons import pipeline

    rt = runtime(None, command)
    left_out = 0
    flow_hooks = ("requestheaders", "request", "responseheaders", "response", "error")

    async def check(addon: object, name: str, kind: str | None) -> None:
        f = tflow.tflow()
        _with_kind(kind)(f)
        res = getattr(addon, name)(f)
        if res is not None:
            await res
        c = f.metadata.get(KEY)
        assert f.response is None, (type(addon).__name__, name, kind)
        assert c is None or c.denial_code is None, (type(addon).__name__, name, kind)

    async def go() -> None:
        nonlocal left_out
        for addon in pipeline(rt):
            for name in flow_hooks:
                fn = getattr(addon, name, None)
                if fn is None:
                    continue
                if name in getattr(addon, "idle_hooks", ()):
                    kinds: frozenset[str] = ROUTE_KINDS
                else:
                    routes = getattr(fn, "candela_routes", None)
                    if routes is None:
                        continue
                    kinds = ROUTE_KINDS - routes
                for kind in [*sorted(kinds), None]:
                    await check(addon, name, kind)
                left_out += 1

    asyncio.run(go())
    assert left_out >= (6 if command == "local" else 12)
