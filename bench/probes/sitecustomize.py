"""Loaded by every Python process started with this folder on PYTHONPATH (bench/s3_calls.py,
bench/loop_turns.py and bench/hook_times.py set it for the processes they measure): a measurement aid, never loaded by
Candela itself.

- CANDELA_STORE_CALLS: every public method of the SQLite and Redis state stores is wrapped to
  note (start time, name, thread, seconds), written to `$CANDELA_STORE_CALLS.<pid>.json` every
  second.
- CANDELA_LOOP_TURNS: every event-loop iteration (`BaseEventLoop._run_once`: the wait in select
  and the callbacks it runs) notes (start, end, seconds of work after select returned), written
  to `$CANDELA_LOOP_TURNS.<pid>.json` every second (the newest 200,000); with
  CANDELA_LOOP_TURNS_DETAIL also each iteration's callbacks (name, thread CPU seconds).
- CANDELA_HOOK_TIMES: every addon hook the proxy calls (`HookTable.trigger_event`) notes (start,
  hook, addon, wall seconds, thread CPU seconds until it returned or its awaitable ended),
  appended to `$CANDELA_HOOK_TIMES.<pid>.jsonl` every quarter second, a line each (rewriting
  them all every second held the GIL long enough to show in the hooks' wall times).
- CANDELA_FUNC_TIMES (with CANDELA_HOOK_TIMES: the same notes, hook "call"): comma-separated
  `module:Name.attr` of plain functions or methods to time the same way, each where it is
  looked up (a function imported by name into another module: that module's name)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

_SKIP = {"call_without_waiting", "savepoint", "batch", "in_batch", "closed", "loop_admission"}


def _wrap(cls: type, notes: list[tuple[float, str, str, float]]) -> None:
    for name, f in list(vars(cls).items()):
        if name.startswith("_") or name in _SKIP or not callable(f):
            continue
        if isinstance(f, staticmethod | classmethod | property):
            continue

        def noted(f: Callable[..., Any] = f, name: str = name) -> Callable[..., Any]:
            def w(*a: Any, **kw: Any) -> Any:
                t0 = time.time()
                try:
                    return f(*a, **kw)
                finally:
                    notes.append((t0, name, threading.current_thread().name, time.time() - t0))

            return w

        setattr(cls, name, noted())


def _start(out: str) -> None:
    try:
        from candela_mitm.state.redis import RedisStateStore
        from candela_mitm.state.sqlite import SqliteStateStore
    except ImportError:  # not a Candela process (the load generator, the fake upstream)
        return
    notes: list[tuple[float, str, str, float]] = []
    _wrap(SqliteStateStore, notes)
    _wrap(RedisStateStore, notes)

    def dump() -> None:
        while True:
            time.sleep(1)
            with open(f"{out}.{os.getpid()}.json", "w") as fh:
                json.dump(notes, fh)

    threading.Thread(target=dump, daemon=True, name="store-calls").start()


def _callback_name(handle: Any) -> str:
    cb = handle._callback
    task = getattr(cb, "__self__", None)
    coro = getattr(task, "get_coro", None)
    if coro is not None:  # a task's step: the coroutine it runs, and where it is suspended
        c = coro()
        frames = []
        while c is not None and len(frames) < 12:
            frame = getattr(c, "cr_frame", None)
            if frame is None:
                break
            frames.append(f"{frame.f_code.co_qualname}")
            c = getattr(c, "cr_await", None)
        return "task " + " > ".join(frames)
    return getattr(cb, "__qualname__", repr(cb))


def _turns(out: str) -> None:
    import asyncio.base_events as base
    import asyncio.events as events

    notes: list[Any] = []
    run_once = base.BaseEventLoop._run_once  # type: ignore[attr-defined]
    current: list[Any] = []

    selected: list[float] = [0.0]

    def noted(self: base.BaseEventLoop) -> None:
        sel = self._selector  # type: ignore[attr-defined]
        if not getattr(sel, "_noted", False):  # when select returns: the iteration's work after
            select = sel.select

            def timed(*a: Any, **kw: Any) -> Any:
                try:
                    return select(*a, **kw)
                finally:
                    selected[0] = time.time()

            sel.select, sel._noted = timed, True
        t0 = time.time()
        selected[0] = t0
        current.clear()
        run_once(self)
        t1 = time.time()
        notes.append((t0, t1, t1 - selected[0], list(current)) if detail
                     else (t0, t1, t1 - selected[0]))

    base.BaseEventLoop._run_once = noted  # type: ignore[attr-defined]
    # CANDELA_LOOP_TURNS_DETAIL: each iteration's callbacks, by name (slower: a diagnosis)
    detail = bool(os.environ.get("CANDELA_LOOP_TURNS_DETAIL"))
    if detail:
        handle_run = events.Handle._run

        def named(self: events.Handle) -> None:
            name, t0 = _callback_name(self), time.thread_time()
            handle_run(self)
            current.append((name, time.thread_time() - t0))

        events.Handle._run = named  # type: ignore[method-assign]

    def dump() -> None:
        while True:
            time.sleep(1)
            with open(f"{out}.{os.getpid()}.json", "w") as fh:
                json.dump(notes[-200_000:], fh)

    threading.Thread(target=dump, daemon=True, name="loop-turns").start()


def _hooks(out: str) -> None:
    import inspect

    try:
        from candela_mitm.addons.mitm_patches import HookTable, hook_args
    except ImportError:
        return
    from mitmproxy import exceptions

    notes: list[Any] = []

    async def trigger_event(self: Any, event: Any) -> None:
        fns = self._hooks_for(event.name)
        if not fns:
            return await HookTable.__mro__[1].trigger_event(self, event) if fns is None else None
        args = hook_args(event)
        meta = getattr(args[0], "metadata", None) if args else None
        for fn, routes in fns:
            if routes is not None and type(meta) is dict:  # as HookTable.trigger_event skips
                c = meta.get("candela")
                if c is None or c.kind not in routes:
                    continue
            t0, c0 = time.time(), time.thread_time()
            try:
                res = fn(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except exceptions.AddonHalt:
                return None
            finally:
                notes.append((t0, event.name, type(getattr(fn, "__self__", fn)).__name__,
                              time.time() - t0, time.thread_time() - c0))
        return None

    HookTable.trigger_event = trigger_event  # type: ignore[method-assign]

    import importlib

    for spec in filter(None, os.environ.get("CANDELA_FUNC_TIMES", "").split(",")):
        module, _, qual = spec.partition(":")
        owner: Any = importlib.import_module(module)
        *path, attr = qual.split(".")
        for part in path:
            owner = getattr(owner, part)

        def timed(f: Callable[..., Any], name: str) -> Any:
            def w(*a: Any, **kw: Any) -> Any:
                t0, c0 = time.time(), time.thread_time()
                try:
                    return f(*a, **kw)
                finally:
                    notes.append((t0, "call", name, time.time() - t0, time.thread_time() - c0))

            return w

        setattr(owner, attr, timed(getattr(owner, attr), qual))

    def dump() -> None:  # the new notes appended, a line each: a short hold of the GIL
        done = 0
        while True:
            time.sleep(0.25)
            new, done = notes[done:], len(notes)
            with open(f"{out}.{os.getpid()}.jsonl", "a") as fh:
                fh.writelines(json.dumps(n) + "\n" for n in new)

    threading.Thread(target=dump, daemon=True, name="hook-times").start()


if os.environ.get("CANDELA_STORE_CALLS"):
    _start(os.environ["CANDELA_STORE_CALLS"])
if os.environ.get("CANDELA_LOOP_TURNS"):
    _turns(os.environ["CANDELA_LOOP_TURNS"])
if os.environ.get("CANDELA_HOOK_TIMES"):
    _hooks(os.environ["CANDELA_HOOK_TIMES"])
