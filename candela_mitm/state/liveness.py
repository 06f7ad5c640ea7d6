"""Liveness: whether the process that holds a reservation or a lease still runs.

A holder is named `<host name><pid namespace>:<pid>:<boot>.<start>`: the pid, plus the boot
(the first 8 hex digits of the kernel's boot id) and the clock tick since that boot at which the
process started. A pid alone is not a process: after a crash the pid can be reused by any other
process, which would keep a dead holder's reservations held until the age limit. A zombie (a
process that has exited but that its parent has not reaped yet, state Z in /proc/<pid>/stat)
still answers `kill(pid, 0)`, but it holds nothing any more: it counts as dead too.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

# /proc/<pid>/stat states of a process that has exited: zombie, dead (and "x", older kernels)
_EXITED = frozenset("ZXx")


@functools.cache
def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:")  # e.g. [4026531836]
    except OSError:
        return ""


@functools.cache
def host_id() -> str:
    """This host as the processes we can signal see it: host name and PID namespace."""
    return f"{socket.gethostname()}{_pid_namespace()}"


@functools.cache
def boot() -> str:
    """This boot of the kernel: start times count clock ticks from it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (the state) on; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) may hold spaces and parentheses: fields resume after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields if len(fields) > 19 else None


def process_start_time(pid: int) -> int | None:
    """A running process's start time (clock ticks since boot): a pid plus this names one
    process. None if there is no such process, or it has exited (a zombie)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in _EXITED:
        return None
    return int(fields[19])


def owner_of(pid: int) -> str:
    """The holder name of process `pid` (see the module docstring)."""
    start = process_start_time(pid)
    if start is None or not boot():
        return f"{host_id()}:{pid}"  # no /proc: the pid alone, as before
    return f"{host_id()}:{pid}:{boot()}.{start}"


def default_owner() -> str:
    """Who holds a reservation or a lease: this process (read from /proc once per process: it
    is asked on every reservation). The name is kept until a fork, whose child forgets it and
    names itself at its first reservation."""
    global _OWNER
    if _OWNER is None:
        _OWNER = _owner_of_pid(os.getpid())
    return _OWNER


_OWNER: str | None = None


def _forget_owner() -> None:
    global _OWNER
    _OWNER = None


os.register_at_fork(after_in_child=_forget_owner)


@functools.lru_cache(maxsize=8)
def _owner_of_pid(pid: int) -> str:
    return owner_of(pid)


def process_alive(owner: str) -> bool:
    """An `owner_alive` for the reconciliations at start: False only for a process we can see
    is gone (no such pid, a zombie, or the pid now another process's, or another boot's).

    An owner on another host, or in another PID namespace (a container with the same host name),
    cannot be checked from here and counts as alive; the age limit reclaims its reservations.
    Owners named before start times were recorded (`<host>:<pid>`) are checked by pid alone.
    """
    head, _, last = owner.rpartition(":")
    started: tuple[str, int] | None = None
    if "." in last:  # <host>:<pid>:<boot>.<start>
        boot_part, _, start = last.partition(".")
        head, _, last = head.rpartition(":")
        if not start.isdigit():
            return True
        started = (boot_part, int(start))
    if head != host_id() or not last.isdigit():
        return True
    pid = int(last)
    if started is not None and boot() and started[0] != boot():
        return False  # the machine has restarted since: every process of then is gone
    fields = _stat_fields(pid)
    if fields is None:  # gone, or hidden from us (no /proc, or hidepid): ask the kernel
        return _signal_alive(pid)
    if fields[0] in _EXITED:
        return False
    return started is None or int(fields[19]) == started[1]


def _signal_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
