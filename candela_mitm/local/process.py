"""The local runtime's process: the one Candela may start (the configured command) and stop."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("candela.local")

START_WAIT_S = 15.0  # how long `start` waits for the runtime to answer
STOP_WAIT_S = 5.0  # SIGTERM, then SIGKILL after this
RUNTIME_LOG_FILE = "local-runtime.log"


@dataclass(frozen=True)
class ProcessState:
    managed: bool  # Candela started it and it has not been reaped
    running: bool
    pid: int | None
    exit_code: int | None
    command: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "managed": self.managed,
            "running": self.running,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "command": list(self.command),
        }


class RuntimeActionError(Exception):
    """A start or stop that cannot be done; the message is shown to the user as is."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class RuntimeProcess:
    """The configured runtime command, started in its own session and stopped with its group;
    never a runtime started elsewhere. Blocking: call it from a worker thread (a lock keeps
    concurrent calls consistent)."""

    def __init__(
        self,
        runtime: str,
        command: tuple[str, ...],
        log_dir: Path,
        reachable: Callable[[], bool],
        changed: Callable[[], None] = lambda: None,
        extra_env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.command = command
        self.log_dir = log_dir
        self.reachable = reachable  # whether the runtime answers now (started here or not)
        self.changed = changed  # after a start or stop: what it serves may have changed
        self.extra_env = dict(extra_env or {})  # over this process's environment, at start
        self.clock = clock
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def state(self) -> ProcessState:
        proc = self.proc
        if proc is None:
            return ProcessState(False, False, None, None, self.command)
        code = proc.poll()
        return ProcessState(True, code is None, proc.pid, code, self.command)

    def _state_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "process": self.state().to_json()}

    def start(self, wait_s: float = START_WAIT_S) -> dict[str, Any]:
        """Start the configured command unless the runtime already runs; wait until it answers."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return {"started": False, "reason": "already running", **self._state_json()}
            if self.reachable():
                return {
                    "started": False,
                    "reason": "the runtime already answers (started outside Candela)",
                    **self._state_json(),
                }
            if not self.command:
                raise RuntimeActionError("local.runtime_command is empty", 400)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / RUNTIME_LOG_FILE
            with open(log_path, "ab") as out:
                try:
                    # its own session: stop signals the whole group (ollama forks runners)
                    self.proc = subprocess.Popen(
                        list(self.command),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **self.extra_env},
                        start_new_session=True,
                    )
                except OSError as e:
                    raise RuntimeActionError(
                        f"cannot run {self.command[0]!r}: {e.strerror or e}", 502
                    ) from None
            proc = self.proc
            log.info("started runtime %s (pid %d)", self.runtime, proc.pid)
            self.changed()
            deadline = self.clock() + wait_s
            while self.clock() < deadline:
                if proc.poll() is not None:
                    raise RuntimeActionError(
                        f"{self.command[0]!r} exited with code {proc.returncode}; see {log_path}",
                        502,
                    )
                if self.reachable():
                    return {"started": True, "reachable": True, **self._state_json()}
                time.sleep(0.1)
            return {"started": True, "reachable": False, **self._state_json()}

    def stop(self, wait_s: float = STOP_WAIT_S) -> dict[str, Any]:
        """Stop the runtime Candela started (never one started elsewhere)."""
        with self._lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                self.proc = None
                if self.reachable():
                    raise RuntimeActionError(
                        "the runtime was not started by Candela; stop it where it was started"
                    )
                return {"stopped": False, "reason": "not running", **self._state_json()}
            pid = proc.pid
            try:
                os.killpg(pid, signal.SIGTERM)
                proc.wait(timeout=wait_s)
            except ProcessLookupError:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                log.warning("runtime pid %d ignored SIGTERM for %g s; killing it", pid, wait_s)
                with suppress(ProcessLookupError):  # it exited after all
                    os.killpg(pid, signal.SIGKILL)
                proc.wait(timeout=wait_s)
            self.proc = None
            self.changed()
            log.info("stopped runtime %s (pid %d, exit %s)", self.runtime, pid, proc.returncode)
            return {
                "stopped": True,
                "pid": pid,
                "exit_code": proc.returncode,
                **self._state_json(),
            }

    def close(self) -> None:
        """At shutdown: a runtime Candela started goes with it."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        except Exception:
            log.exception("could not stop the runtime")
