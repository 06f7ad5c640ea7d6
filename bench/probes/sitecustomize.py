"""Loaded by every Python process started with this folder on PYTHONPATH (bench/s3_calls.py and
bench/loop_turns.py set it for the processes they measure): a measurement aid, never loaded by
Candela itself.

- CANDELA_STORE_CALLS: every public method of the SQLite and Redis state stores is wrapped to
  note (start time, name, thread, seconds), written to `$CANDELA_STORE_CALLS.<pid>.json` every
  second.
- CANDELA_LOOP_TURNS: every event-loop iteration (`BaseEventLoop._run_once`: the wait in select
  and the callbacks it runs) notes (start, end), written to `$CANDELA_LOOP_TURNS.<pid>.json`
  every second (the newest 200,000)."""

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


def _turns(out: str) -> None:
    import asyncio.base_events as base

    notes: list[tuple[float, float]] = []
    run_once = base.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def noted(self: base.BaseEventLoop) -> None:
        t0 = time.time()
        run_once(self)
        notes.append((t0, time.time()))

    base.BaseEventLoop._run_once = noted  # type: ignore[attr-defined]

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
