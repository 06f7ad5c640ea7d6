"""A real Candela process for end-to-end tests: a config file, a free port, a health check."""

from __future__ import annotations

import os
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


class CandelaProcess:
    """`candela-server` (or `candela`) as a subprocess; stopped with SIGTERM, or SIGKILL if asked."""

    def __init__(
        self,
        tmp: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        command: str = "candela-server",
        port: int | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.tmp = tmp
        self.port = port or free_port()
        self.config_path = tmp / f"candela-{self.port}.yaml"
        cfg = dict(config)
        cfg.setdefault("state", {"sqlite_path": str(tmp / "state.db")})
        cfg.setdefault("audit", {"sqlite_path": str(tmp / "audit.db")})
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / f"candela-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.command = command
        self.prefix = list(prefix)  # runs the command (e.g. `unshare -m ...`), exec'ing it in place
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> CandelaProcess:
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
                raise RuntimeError(f"candela exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
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
