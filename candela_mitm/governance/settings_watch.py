"""The settings watch: when a process must forget the settings it remembers, from the store's
settings generation (GenerationStore), polled on a thread of its own."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from candela_mitm.state.ports import GenerationStore

log = logging.getLogger("candela.settings")


@dataclass(frozen=True)
class WatchState:
    """What a status view shows of the watch: whether the long TTL applies now, and the
    generation last read (None: never read yet)."""

    current: bool
    seen: int | None


class SettingsWatch:
    """Since when this process is sure to have seen every change to users, tenants, grants and
    API keys made through any process: what the state store's settings generation said when it
    was last read (GenerationStore; SettingsPoller reads it every `poll_s`).

    A poll that began at `began` and read generation g has seen every change committed before
    `began`: if g differs from the generation seen before, the poller forgets what the process
    remembers first, then `confirm`s. While the last confirmation is at most
    `stale_after_polls` polls old, a remembered setting may be used for `long_ttl_s`: a change
    made anywhere is then seen within those polls. A poll that fails (`failed`), or none for
    that long, and the directory falls back to its own short TTL: freshness fails closed.

    A change made through this process is forgotten when it is made (SettingsPoller.
    forget_own_change), which then tells the watch (`forgotten`) the generation it read after
    the change and before the forget: a poll that reads that generation (or one between the
    one it saw and that one) has nothing left to forget. Only the poller writes `seen`;
    `forgotten` is written under a lock by the threads that make changes.
    """

    def __init__(
        self,
        poll_s: float,
        long_ttl_s: float,
        stale_after_polls: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.poll_s = poll_s
        self.long_ttl_s = long_ttl_s
        self.stale_after_s = stale_after_polls * poll_s
        self.clock = clock
        self.seen: int | None = None  # the generation last read; None: never read yet
        self._confirmed = -math.inf  # when the poll that last confirmed it began
        # the newest generation read before a forget made outside the poller (-1: none)
        self._forgotten = -1
        self._lock = threading.Lock()

    def changed(self, generation: int) -> bool:
        """Whether `generation` differs from the one last seen (True at the first poll)."""
        return generation != self.seen

    def to_forget(self, generation: int) -> bool:
        """Whether a poll that read `generation` must forget: it moved since the last poll, and
        not only by changes a forget made since (`forgotten`) already covers. Anything else
        forgets: the first read, a generation that went back (a store replaced or emptied)."""
        if not self.changed(generation):
            return False
        if self.seen is None or generation < self.seen:
            return True
        with self._lock:
            return generation > self._forgotten

    def forgotten(self, generation: int) -> None:
        """Every setting was forgotten after `generation` was read: every change it counts was
        committed before the forget, so none of them needs another."""
        with self._lock:
            self._forgotten = max(self._forgotten, generation)

    def confirm(self, generation: int, began: float) -> None:
        """A poll that began at `began` read `generation`, and whatever it changed is forgotten."""
        self.seen = generation
        self._confirmed = began

    def failed(self) -> None:
        """A poll failed: remembered settings are used for the short TTL only, until one works."""
        self._confirmed = -math.inf

    def current(self, now: float) -> bool:
        """Whether every change committed more than `stale_after_s` before `now` has been seen."""
        return now - self._confirmed <= self.stale_after_s

    def state(self) -> WatchState:
        return WatchState(self.current(self.clock()), self.seen)


class SettingsPoller:
    """Reads the store's settings generation every `watch.poll_s` on a thread of its own (never
    on the event loop, never per request). A generation moved by a change made elsewhere:
    `on_change` (what a change made here does), then the watch is confirmed; the first read
    only forgets what was remembered before it (`on_first`: nothing to compare with). A failed
    read: the watch falls back to the short TTL at once (SettingsWatch.failed), and the next
    poll tries again. `on_poll` hears each poll's outcome ("ok", "failed") and `on_seen` each
    change acted on (metrics: fails open, a failing callback is ignored)."""

    def __init__(
        self,
        store: GenerationStore,
        watch: SettingsWatch,
        on_change: Callable[[], None],
        on_first: Callable[[], None],
        on_poll: Callable[[str], None] | None = None,
        on_seen: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.watch = watch
        self.on_change = on_change
        self.on_first = on_first
        self.on_poll = on_poll
        self.on_seen = on_seen
        self.polls = 0  # reads that succeeded
        self.failures = 0
        self.changes = 0  # changes made elsewhere acted on (the first read not counted)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def poll(self) -> bool:
        """One read; False if it failed."""
        began = self.watch.clock()
        try:
            generation = self.store.settings_generation()
            if self.watch.to_forget(generation):
                if self.watch.seen is None:
                    self.on_first()
                else:
                    self.changes += 1
                    self.on_change()
                    _observe(self.on_seen)
        except Exception as e:
            self.watch.failed()
            self.failures += 1
            _observe(self.on_poll, "failed")
            if not self._failing:  # once per outage, not every poll
                log.warning(
                    "settings generation unreadable (%s): settings are read again at the "
                    "short TTL until it is readable",
                    type(e).__name__,
                )
            self._failing = True
            return False
        self.watch.confirm(generation, began)
        self.polls += 1
        _observe(self.on_poll, "ok")
        if self._failing:
            log.info("settings generation readable again")
            self._failing = False
        return True

    def forget_own_change(self) -> None:
        """After a change made through this process (admin/base.py `_audited`), committed or
        not: forget at once (`on_change`), and let the poll that reads the generation it made
        pass it over instead of forgetting a second time. The generation is read after the
        change and before the forget, so every change it counts (this one, and any made
        elsewhere before it) is covered by this forget; a change made elsewhere after the read
        moves the generation past it and the poll forgets it. An unreadable generation: the
        poll forgets again (never a change missed to save a forget)."""
        try:
            generation: int | None = self.store.settings_generation()
        except Exception:
            generation = None
        self.on_change()
        if generation is not None:
            self.watch.forgotten(generation)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="candela-settings-watch", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        self.poll()
        while not self._stop.wait(self.watch.poll_s):
            if getattr(self.store, "closed", False):  # closed without Runtime.close (tests)
                return
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _observe(fn: Callable[..., None] | None, *args: str) -> None:
    """Tell an observer (metrics); its failure never changes what the poll does."""
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.debug("settings watch observer failed", exc_info=True)
