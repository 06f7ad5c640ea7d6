"""Races on one store backend: threads released at once by a barrier, in one process or in two
(spawned, each opening the store itself), and processes hammering it side by side (forked)."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from candela_mitm.config import State
from candela_mitm.state import StateStore, open_state_store

T = TypeVar("T")


def race_threads(attempt: Callable[[], T], threads: int = 20) -> list[T]:
    """Every thread makes one `attempt` the moment all are ready; their answers."""
    barrier = threading.Barrier(threads)
    results: list[T] = []

    def race() -> None:
        barrier.wait()
        results.append(attempt())

    workers = [threading.Thread(target=race) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    return results


def _race_in_process(
    attempt: Callable[..., int],
    cfg: State,
    prefix: str,
    barrier: Any,
    out: Any,
    threads: int,
    shared: tuple[Any, ...],
) -> None:
    store = open_state_store(cfg, redis_prefix=prefix)
    admitted: list[int] = []

    def race(i: int) -> None:
        barrier.wait()
        admitted.append(attempt(store, i, *shared))

    workers = [threading.Thread(target=race, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    out.put((len(admitted), sum(admitted)))
    store.close()


def race_processes(
    backend: Any,
    attempt: Callable[..., int],
    per_process: int = 6,
    shared: tuple[Any, ...] = (),
) -> tuple[int, int]:
    """Two spawned processes of `per_process` threads each, all released by one barrier; thread
    `i` of a process calls `attempt(store, i, *shared)` (a module-level function: it is
    pickled; `shared`: values of the spawn context, such as counters every process sees), which
    answers how many it got admitted. Returns (attempts that answered, admitted) in all."""
    backend.open()  # create the schema before the race
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2 * per_process)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_race_in_process,
            args=(attempt, backend.cfg, backend.prefix, barrier, out, per_process, shared),
        )
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return sum(n for n, _ in results), sum(ok for _, ok in results)


def _hammer_in_process(
    work: Callable[[StateStore, int], tuple[int, int]], backend: Any, n: int, q: Any
) -> None:
    q.put(work(backend.open(), n))


def hammer_processes(
    backend: Any, work: Callable[[StateStore, int], tuple[int, int]], n: int, processes: int = 3
) -> list[tuple[int, int]]:
    """`processes` forked processes each run `work(store, n)` on the store opened anew; their
    answers."""
    backend.open()  # made (schema, WAL) before the processes open it at once
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer_in_process, args=(work, backend, n, q))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [q.get(timeout=5) for _ in procs]
