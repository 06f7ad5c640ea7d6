"""Liveness: a zombie and a reused pid hold nothing; reservations and leases are freed at start."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from candela_mitm.governance.ledger import Ledger, Reservation
from candela_mitm.governance.ratelimit import Admission, RateLimiter
from candela_mitm.governance.reconcile import reconcile_stale
from candela_mitm.state import StateStore
from candela_mitm.state.liveness import (
    boot,
    default_owner,
    host_id,
    owner_of,
    process_alive,
    process_start_time,
)
from tests.forking import in_a_fork

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


class Zombie:
    """A child that runs until `exit()`, then stays a zombie: nothing reaps it until `reap()`."""

    def __init__(self) -> None:
        r, self._w = os.pipe()
        # no subprocess.Popen: it reaps children it has lost track of; this one must stay
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            os.close(self._w)
            os.read(r, 1)  # until the parent closes its end
            os._exit(0)
        os.close(r)
        self.owner = owner_of(self.pid)  # named while it runs, as a worker names itself

    def exit(self) -> None:
        os.close(self._w)
        deadline = time.monotonic() + 30
        while _state(self.pid) != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)

    def reap(self) -> None:
        os.waitpid(self.pid, 0)


@pytest.fixture
def zombie() -> Iterator[Zombie]:
    z = Zombie()
    try:
        yield z
    finally:
        try:
            z.exit()
        except OSError:
            pass
        try:
            z.reap()
        except ChildProcessError:
            pass


def test_a_running_child_is_alive_and_its_zombie_is_dead(zombie: Zombie) -> None:
    start = process_start_time(zombie.pid)
    assert start is not None
    assert zombie.owner == f"{host_id()}:{zombie.pid}:{boot()}.{start}"
    assert process_alive(zombie.owner)
    zombie.exit()
    assert _state(zombie.pid) == "Z"  # the pid still exists: kill(pid, 0) would say alive
    os.kill(zombie.pid, 0)
    assert process_start_time(zombie.pid) is None
    assert not process_alive(zombie.owner)
    assert not process_alive(f"{host_id()}:{zombie.pid}")  # a holder named by pid alone too
    zombie.reap()
    assert not process_alive(zombie.owner)


def test_a_reused_pid_is_not_the_process_that_held(zombie: Zombie) -> None:
    start = process_start_time(zombie.pid)
    assert start is not None
    # the same pid, started at another tick or in another boot: another process now
    assert not process_alive(f"{host_id()}:{zombie.pid}:{boot()}.{start + 1}")
    if boot():
        assert not process_alive(f"{host_id()}:{zombie.pid}:00000000.{start}")
    assert process_alive(zombie.owner)


@pytest.mark.parametrize(
    "owner",
    ["garbage", "another-host:1", "another-host:1:abcd.12", f"{os.uname().nodename}[1]:1:ab.1"],
)
def test_holders_that_cannot_be_checked_from_here_count_as_alive(owner: str) -> None:
    assert process_alive(owner)


def test_this_process_is_alive() -> None:
    assert default_owner().startswith(f"{host_id()}:{os.getpid()}:")
    assert process_alive(default_owner())


def test_at_start_a_zombies_reservations_are_settled_and_leases_freed(
    store: StateStore, zombie: Zombie
) -> None:
    held = Ledger(store, clock=lambda: T0, owner=zombie.owner)
    r = held.reserve("u", None, 2.0, 10.0, "span-z", model="gpt-4o", provider="openai")
    assert isinstance(r, Reservation)
    limiter = RateLimiter(store)
    assert limiter.acquire(Admission("u"), 5, zombie.owner).allowed
    me = Ledger(store, clock=lambda: T0)
    # while it runs, what it holds stays held
    assert reconcile_stale(me, process_alive, max_age_s=None) == []
    assert limiter.reconcile_leases(process_alive) == 0
    zombie.exit()  # killed, not reaped: what a restart after kill -9 finds
    (settled,) = reconcile_stale(me, process_alive, max_age_s=None)
    assert (settled.reservation_id, settled.reason, settled.owner) == (
        r.id, "proxy_crash", zombie.owner
    )
    assert me.spent_today("u") == 2.0
    assert limiter.reconcile_leases(process_alive) == 1
    assert store.leases() == []



def test_a_forked_child_names_itself_not_its_parent() -> None:
    """The owner name is kept per process, not read per call: a fork's child forgets its
    parent's (a worker's reservations must be its own, or the parent's death would free them)."""
    parent = default_owner()
    pid, child = in_a_fork(default_owner)
    assert child.startswith(f"{host_id()}:{pid}:") and child != parent
    assert default_owner() == parent
