"""The settings watch: the poller forgets a change made elsewhere once, a change made here once
(when it is made, not again at the next poll), and falls back to the short TTL when it cannot
read; its polls counted in the metrics. Over every state backend (two clients of one store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance.settings_watch import SettingsPoller, SettingsWatch
from candela_mitm.governance.users import UserDirectory
from candela_mitm.observability.metrics import Metrics
from candela_mitm.state.ports import TenantRecord, UserRecord
from tests.conftest import StoreBackend


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Flaky:
    """A store whose generation read fails while `down` is set (the rest passes through)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.down = False

    def settings_generation(self) -> int:
        if self.down:
            raise ConnectionError("store unreachable")
        return int(self._store.settings_generation())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Process:
    """One proxy process's watch, driven by hand: its directory over its own client of the
    store, and the forgets its poller made (each one what Runtime.forget_settings does)."""

    def __init__(self, backend: StoreBackend, tmp_path: Path, metrics: Metrics | None = None):
        self.store = Flaky(backend.open())
        self.clock = Clock()
        self.watch = SettingsWatch(poll_s=0.25, long_ttl_s=60.0, clock=self.clock)
        config = parse_config({
            "state": {"sqlite_path": str(tmp_path / "state.db")},
            "audit": {"sqlite_path": str(tmp_path / "audit.db")},
        })
        self.users = UserDirectory(
            config, self.store, cache_ttl_s=1.0, clock=self.clock, watch=self.watch
        )
        self.forgets = 0
        self.firsts = 0
        self.metrics = metrics
        self.poller = SettingsPoller(
            self.store,
            self.watch,
            self.forget,
            self.first,
            on_poll=None if metrics is None else (lambda o: metrics.settings_polls.labels(o).inc()),
            on_seen=None if metrics is None else metrics.settings_changes.inc,
        )

    def forget(self) -> None:
        self.forgets += 1
        self.users.forget()

    def first(self) -> None:
        self.firsts += 1
        self.users.forget()

    def poll(self) -> bool:
        self.clock.t += self.watch.poll_s
        return self.poller.poll()

    def change_here(self, change: Any) -> None:
        """A change made through this process's admin API: made, then forgotten (_audited)."""
        try:
            change()
        finally:
            self.poller.forget_own_change()


@pytest.fixture
def here(backend: StoreBackend, tmp_path: Path) -> Process:
    p = Process(backend, tmp_path)
    assert p.poll() and p.firsts == 1 and p.forgets == 0
    return p


@pytest.fixture
def elsewhere(backend: StoreBackend) -> Any:
    """Another process's client of the same store (the memory store: the same one)."""
    return backend.open()


def budget(p: Process, tenant: str = "t") -> float | None:
    return p.users.tenant_settings_cached(tenant).budget_usd


def test_a_change_made_here_is_forgotten_once(here: Process) -> None:
    here.store.put_tenant(TenantRecord("t", budget_usd=1.0))
    here.poller.forget_own_change()
    assert here.forgets == 1
    assert budget(here) == 1.0
    for _ in range(3):
        assert here.poll()
    assert (here.forgets, here.poller.changes) == (1, 0)  # the poll did not forget it again
    assert here.watch.seen == here.store.settings_generation()
    assert here.users.recent_tenant("t") is not None  # still remembered, for the long TTL


def test_a_change_made_elsewhere_is_forgotten_at_the_next_poll(
    here: Process, elsewhere: Any
) -> None:
    assert budget(here) is None
    elsewhere.put_tenant(TenantRecord("t", budget_usd=3.0))
    assert budget(here) is None  # remembered, until the poll
    assert here.poll()
    assert (here.forgets, here.poller.changes) == (1, 1)
    assert budget(here) == 3.0
    assert here.poll() and here.forgets == 1  # seen once


def test_changes_made_elsewhere_then_here_are_forgotten_by_the_change_here(
    here: Process, elsewhere: Any
) -> None:
    """Both committed before the forget that follows the change here: that forget covers both,
    and the next poll has nothing left to forget."""
    assert budget(here) is None and budget(here, "u") is None
    elsewhere.put_tenant(TenantRecord("t", budget_usd=3.0))
    here.change_here(lambda: here.store.put_tenant(TenantRecord("u", budget_usd=5.0)))
    assert (budget(here), budget(here, "u")) == (3.0, 5.0)  # the change made elsewhere too
    assert here.poll()
    assert (here.forgets, here.poller.changes) == (1, 0)


def test_a_change_made_elsewhere_after_one_here_is_still_forgotten(
    here: Process, elsewhere: Any
) -> None:
    here.change_here(lambda: here.store.put_tenant(TenantRecord("u", budget_usd=5.0)))
    assert budget(here) is None  # remembered after the forget
    elsewhere.put_tenant(TenantRecord("t", budget_usd=3.0))  # before the next poll
    assert here.poll()
    assert (here.forgets, here.poller.changes) == (2, 1)
    assert budget(here) == 3.0


def test_changes_racing_here_and_elsewhere_between_polls(here: Process, elsewhere: Any) -> None:
    """Here, elsewhere, here again before one poll: the last forget here covers all three."""
    here.change_here(lambda: here.store.put_tenant(TenantRecord("u", budget_usd=5.0)))
    budget(here)
    elsewhere.put_tenant(TenantRecord("t", budget_usd=3.0))
    here.change_here(lambda: here.store.put_user(UserRecord("bob", daily_budget_usd=2.0)))
    assert budget(here) == 3.0
    assert here.poll()
    assert (here.forgets, here.poller.changes) == (2, 0)


def test_a_change_made_here_whose_generation_cannot_be_read_is_forgotten_again(
    here: Process,
) -> None:
    """Not knowing which generation the forget covers, the poll forgets it too (when in doubt,
    forget)."""
    here.store.put_tenant(TenantRecord("t", budget_usd=1.0))
    here.store.down = True
    here.poller.forget_own_change()
    assert here.forgets == 1
    here.store.down = False
    assert here.poll()
    assert (here.forgets, here.poller.changes) == (2, 1)


def test_a_change_made_here_that_failed_is_forgotten_and_not_again(here: Process) -> None:
    """_audited forgets whether the change worked or not: a failed one moved nothing."""

    def fails() -> None:
        raise RuntimeError("store write failed")

    with pytest.raises(RuntimeError):
        here.change_here(fails)
    assert here.forgets == 1
    assert here.poll() and here.forgets == 1


def test_a_generation_that_goes_back_is_forgotten(here: Process) -> None:
    """The count only grows (GenerationStore); one that went back (a store emptied or replaced
    under the process) is a change nobody counted: forgotten, whatever was forgotten before."""
    here.watch.forgotten(10**6)  # as if a change here had read a far newer generation
    here.watch.seen = here.store.settings_generation() + 5
    assert here.poll()
    assert (here.forgets, here.poller.changes) == (1, 1)


def test_a_failed_poll_falls_back_to_the_short_ttl_and_is_counted(
    backend: StoreBackend, tmp_path: Path
) -> None:
    metrics = Metrics()
    p = Process(backend, tmp_path, metrics)

    def polls(outcome: str) -> float:
        value = metrics.registry.get_sample_value(
            "candela_settings_polls_total", {"outcome": outcome}
        )
        return value or 0.0

    def shown() -> tuple[float | None, float | None]:
        metrics.refresh()
        get = metrics.registry.get_sample_value
        return get("candela_settings_watch_current"), get("candela_settings_generation_seen")

    metrics.watch_settings(p.watch.state)
    assert shown() == (0.0, -1.0)  # never read: the short TTL
    assert p.poll()
    seen = p.store.settings_generation()
    assert (polls("ok"), polls("failed")) == (1.0, 0.0)
    assert p.watch.current(p.clock()) and shown() == (1.0, float(seen))

    p.users.tenant_settings_cached("t")
    p.clock.t += 5.0
    assert p.poll() and p.users.recent_tenant("t") is not None  # 5 s old: the long TTL
    p.store.down = True
    assert not p.poll()
    assert (polls("ok"), polls("failed")) == (2.0, 1.0)
    assert p.poller.failures == 1
    assert not p.watch.current(p.clock())
    assert shown() == (0.0, float(seen))
    assert p.users.recent_tenant("t") is None  # past the 1 s TTL: read again

    p.store.down = False
    backend.open().put_tenant(TenantRecord("t", budget_usd=4.0))  # made while the poll failed
    assert p.poll()
    assert (polls("ok"), polls("failed")) == (3.0, 1.0)
    assert metrics.registry.get_sample_value("candela_settings_changes_total") == 1.0
    assert shown() == (1.0, float(seen + 1))
    assert p.users.tenant_settings_cached("t").budget_usd == 4.0


def test_a_failing_observer_never_changes_a_poll(backend: StoreBackend, tmp_path: Path) -> None:
    p = Process(backend, tmp_path)

    def broken(*args: Any) -> None:
        raise RuntimeError("metrics down")

    p.poller.on_poll = broken
    p.poller.on_seen = broken
    assert p.poll() and p.watch.seen is not None
    backend.open().put_tenant(TenantRecord("t", budget_usd=1.0))
    assert p.poll()
    assert (p.forgets, p.poller.changes, p.poller.failures) == (1, 1, 0)
    assert p.watch.current(p.clock())
