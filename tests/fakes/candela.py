"""A real Candela process for end-to-end tests: a config file, a free port, a health check."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(RuntimeError):
    """Candela could not listen: another process took a port between our pick and its bind."""


# the server's own words (mitmproxy's listener, or `candela: cannot listen ...` with workers)
_PORT_IN_USE = re.compile(r"address already in use", re.IGNORECASE)
PORT_ATTEMPTS = 5


class CandelaProcess:
    """`candela-server` (or `candela`) as a subprocess; stopped with SIGTERM, or SIGKILL if asked.

    Ports are picked free and bound later by Candela: on a loaded machine another process can
    take one in between. A start that fails with "address already in use" is retried on new
    ports, for the ports this class picked (`port` not given; `pick_listen_port`: the transparent
    listener's `interception.listen_port` too, read back as `listen_port`)."""

    def __init__(
        self,
        tmp: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        command: str = "candela-server",
        port: int | None = None,
        prefix: Sequence[str] = (),
        pick_listen_port: bool = False,
    ) -> None:
        self.tmp = tmp
        self._pick_port = port is None
        self._pick_listen_port = pick_listen_port
        cfg = dict(config)
        cfg.setdefault("state", {"sqlite_path": str(tmp / "state.db")})
        cfg.setdefault("audit", {"sqlite_path": str(tmp / "audit.db")})
        self._config = cfg
        self._place(port or free_port())
        self.env = {**os.environ, **(env or {})}
        self.command = command
        self.prefix = list(prefix)  # runs the command (e.g. `unshare -m ...`), exec'ing it in place
        self.proc: subprocess.Popen[bytes] | None = None

    def _place(self, port: int) -> None:
        """Write the config for `port` (and a new listener port if this class picks it)."""
        self.port = port
        if self._pick_listen_port:
            self._config["interception"] = {
                **self._config.get("interception", {}), "listen_port": free_port()
            }
        self.config_path = self.tmp / f"candela-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(self._config))
        self.log_path = self.tmp / f"candela-{self.port}.log"

    @property
    def listen_port(self) -> int:
        """The transparent listener's port (interception.listen_port)."""
        return int(self._config["interception"]["listen_port"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> CandelaProcess:
        """Start and wait until /healthz answers (`timeout`: for a loaded machine; returns as
        soon as it does); on a port taken since it was picked, again on new ports."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return self._start(timeout)
            except PortTaken:
                if attempt == PORT_ATTEMPTS or not (self._pick_port or self._pick_listen_port):
                    raise
                # kept for a look: the next attempt's log starts afresh
                self.log_path.replace(self.log_path.with_suffix(f".port-taken-{attempt}.log"))
                self.config_path.unlink()
                self._place(free_port() if self._pick_port else self.port)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> CandelaProcess:
        exe = str(Path(sys.executable).parent / self.command)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*self.prefix, exe, "--config", str(self.config_path), "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(self.tmp),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                self.stop()
                error = PortTaken if _PORT_IN_USE.search(log) else RuntimeError
                raise error(f"candela exited early:\n{log}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    # ours, not another process's on a port taken from us (this one exits)
                    if r.status == 200 and self.proc.poll() is None:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()  # never leave a server (or its workers) running behind a failed start
        raise RuntimeError(f"candela did not become healthy:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self) -> CandelaProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
