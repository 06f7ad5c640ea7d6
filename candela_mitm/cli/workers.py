"""Workers: N proxy processes on one listening port, supervised by the process that forked them."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import suppress

log = logging.getLogger("candela.workers")

# How long stopped workers get to commit their audit entries before they are killed.
STOP_GRACE_S = 30.0
_POLL_S = 0.1


def claim_port(host: str, port: int) -> int:
    """The port the workers will share: `port`, or a free one for 0. Raises OSError if taken.

    The workers bind with SO_REUSEPORT, which would let them join another program's listener
    on the same port silently; a plain bind first turns that into the usual "address in use".
    With SO_REUSEADDR, as the listeners themselves bind (asyncio's default): connections of a
    killed worker still in TIME-WAIT on the port do not make it "in use" (Linux still refuses
    a port another socket listens on).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return int(s.getsockname()[1])


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def run_workers(n: int, child: Callable[[int], int], grace_s: float = STOP_GRACE_S) -> int:
    """Fork n workers running `child(index)`; forward SIGTERM/SIGINT; return when all are gone.

    Call it before anything starts a thread or opens a store: each worker builds its own runtime
    after the fork. If a worker exits on its own, the others are stopped too and the exit code
    is non-zero: a service short of a worker is restarted whole by its supervisor (systemd, a
    container runtime) rather than left running at reduced capacity unnoticed.
    """
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    sys.stdout.flush()
    sys.stderr.flush()
    pids: dict[int, int] = {}
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = int(child(i) or 0)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids[pid] = i
    log.info("candela: %d workers (pids %s)", n, ", ".join(map(str, pids)))
    return _supervise(pids, grace_s)


def _signal_all(pids: dict[int, int], sig: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):  # exited meanwhile: nothing to signal
            os.kill(pid, sig)


def _supervise(pids: dict[int, int], grace_s: float) -> int:
    stop_requested = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    def on_hangup(signum: int, frame: object) -> None:
        _signal_all(pids, signal.SIGHUP)  # each worker re-reads the config itself

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    code = 0
    stopping_since: float | None = None
    try:
        while pids:
            if stop_requested and stopping_since is None:
                stopping_since = time.monotonic()
                _signal_all(pids, signal.SIGTERM)
            if stopping_since is not None and time.monotonic() - stopping_since > grace_s:
                log.error("candela: workers %s did not stop in %.0f s; killing", list(pids), grace_s)
                _signal_all(pids, signal.SIGKILL)
                stopping_since = float("inf")  # once
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except OSError as e:  # pragma: no cover - EINTR is retried by Python (PEP 475)
                if e.errno != errno.EINTR:
                    raise
                continue
            if pid == 0:
                time.sleep(_POLL_S)
                continue
            index = pids.pop(pid, None)
            if index is None:
                continue
            rc = _exit_code(status)
            if not stop_requested:
                log.error("candela: worker %d (pid %d) exited with %d; stopping the others",
                          index, pid, rc)
                code = rc or 1
                stop_requested = True
            elif rc not in (0, -signal.SIGTERM) and code == 0:
                code = rc
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return code
