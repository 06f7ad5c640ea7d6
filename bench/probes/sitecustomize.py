"""Loaded by every Python process started with this folder on PYTHONPATH (bench/s3_calls.py and
bench/loop_turns.py set it for the processes they measure): a measurement aid, never loaded by
Candela itself.

- CANDELA_STORE_CALLS: every public method of the SQLite and Redis state stores is wrapped to
  note (start time, name, thread, seconds), written to `$CANDELA_STORE_CALLS.<pid>.json` every
  second.
- CANDELA_LOOP_TURNS: every event-loop iteration (`BaseEventLoop._run_once`: the wait in select
  and the callbacks it runs) notes (start, end, seconds of work after select returned), written
  to `$CANDELA_LOOP_TURNS.<pid>.json` every second (the newest 200,000)."""

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
            current.append(_callback_name(self))
            handle_run(self)

        events.Handle._run = named  # type: ignore[method-assign]

    def dump() -> None:
        while True:
            time.sleep(1)
            with open(f"{out}.{os.getpid()}.json", "w") as fh:
                json.dump(notes[-200_000:], fh)

    threading.Thread(target=dump, daemon=True, name="loop-turns").start()


if os.environ.get("CANDELA_STORE_CALLS"):
    _start(os.environ["CANDELA_STORE_CALLS"])
if os.environ.get("CANDELA_LOOP_TURNS"):
    _turns(os.environ["CANDELA_LOOP_TURNS"])
