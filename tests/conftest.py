"""Shared fixtures: a real redis-server on loopback, and state stores of every backend."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from candela_mitm.config import State
from candela_mitm.state import StateStore, open_state_store
from candela_mitm.state.memory import MemoryStateStore
from tests.required import require


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server: loopback only, no persistence, its files in `workdir`. Its port
    is picked free and bound later by redis: if another process took it in between, it starts
    again on another."""

    def __init__(self, binary: str, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 6):
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            if self._start(binary, workdir):
                return
            (workdir / "redis.log").replace(workdir / f"redis.port-taken-{attempt}.log")
        raise RuntimeError(f"redis-server found its port taken 5 times; see {workdir}")

    def _start(self, binary: str, workdir: Path) -> bool:
        """True once it answers PING; False if its port was taken (RuntimeError otherwise)."""
        self._log = (workdir / "redis.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(workdir),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG") and self.proc.poll() is None:
                        return True
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                said = (workdir / "redis.log").read_text(errors="replace")
                if "address already in use" in said.lower():
                    return False
                raise RuntimeError(f"redis-server did not start; see {workdir / 'redis.log'}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        require("redis-server is not installed (apt-get install -y redis-server; make test does)")
    return binary


@pytest.fixture(scope="session")
def redis_url(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the session; tests keep apart through key prefixes."""
    server = RedisServer(redis_binary, tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture
def redis_server_factory(redis_binary: str, tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Own servers for tests that stop them; every one is stopped at teardown."""
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(redis_binary, tmp_path / f"redis-{len(servers)}")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@dataclass
class StoreBackend:
    """How to open (again, from any thread or process) the store one test works on."""

    name: str
    cfg: State
    prefix: str = "candela:"
    opened: list[StateStore] = field(default_factory=list)
    # the memory backend: one store every open() returns (it lives in this process only)
    shared: StateStore | None = None

    def open(self) -> StateStore:
        if self.shared is not None:
            return self.shared
        store = open_state_store(self.cfg, redis_prefix=self.prefix)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "redis", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    """Each contract test runs against the embedded, the shared and the in-memory backend.

    A test whose processes share the store (only SQLite and Redis can) is marked
    `@pytest.mark.processes`: it is not collected for the memory backend (see
    pytest_collection_modifyitems). Tests about files or a server going down open their own
    SQLite or Redis store instead of taking this fixture."""
    if request.param == "memory":
        # cfg names a file of this test only, never ~/.candela, should anything open it
        cfg = State(backend="sqlite", sqlite_path=str(tmp_path / "not-the-memory-store.db"))
        b = StoreBackend("memory", cfg, shared=MemoryStateStore())
    elif request.param == "sqlite":
        b = StoreBackend("sqlite", State(backend="sqlite", sqlite_path=str(tmp_path / "state.db")))
    else:
        url = request.getfixturevalue("redis_url")
        b = StoreBackend(
            "redis",
            State(backend="redis", redis_url=url),
            prefix=f"candela-test-{uuid.uuid4().hex[:12]}:",
        )
    yield b
    b.close_all()


@pytest.fixture
def store(backend: StoreBackend) -> StateStore:
    return backend.open()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test whose processes share one store has no memory-backend case: that store lives in
    one process (deselected at collection, not skipped: the run has no skip to explain)."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        memory = callspec is not None and callspec.params.get("backend") == "memory"
        (drop if memory and item.get_closest_marker("processes") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "processes: the test's processes share one store (no memory-backend case)"
    )
