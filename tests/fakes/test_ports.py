"""Tests of the tests' own port handling: a port picked free can be taken by another process
before the server binds it (a loaded CI machine, other suites running); the start is retried on
a new port, never on one the test chose itself."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

import tests.conftest as shared
import tests.fakes.candela as fake_candela
from tests.e2e.conftest import base_config
from tests.fakes.candela import CandelaProcess, PortTaken


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process listens on (every address)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield int(s.getsockname()[1])


def picks(monkeypatch: pytest.MonkeyPatch, module: object, *first: int) -> None:
    """`module.free_port` answers `first` in order, then really free ports."""
    real = fake_candela.free_port
    queue = list(first)
    monkeypatch.setattr(module, "free_port", lambda: queue.pop(0) if queue else real())


def test_a_taken_port_is_picked_again(
    tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks(monkeypatch, fake_candela, taken)
    with CandelaProcess(tmp_path, base_config("http://127.0.0.1:9")) as c:
        assert c.port != taken
        assert requests.get(c.url + "/healthz", timeout=30).status_code == 200
        assert c.config_path.name == f"candela-{c.port}.yaml"
    refused = (tmp_path / f"candela-{taken}.port-taken-1.log").read_text()
    assert "address already in use" in refused.lower()
    assert not (tmp_path / f"candela-{taken}.yaml").exists()  # nothing left under its name


def test_a_taken_transparent_listener_port_is_picked_again(
    tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.privileged.sandbox_env import transparent_config

    first = fake_candela.free_port()
    picks(monkeypatch, fake_candela, first, taken)  # its own port free, the listener's taken
    cfg = transparent_config("http://127.0.0.1:9", tmp_path)
    with CandelaProcess(tmp_path, cfg, pick_listen_port=True) as c:
        assert c.listen_port != taken
        written = yaml.safe_load(c.config_path.read_text())
        assert written["interception"]["listen_port"] == c.listen_port
        with socket.create_connection(("127.0.0.1", c.listen_port), timeout=30):
            pass  # Candela's transparent listener
    assert (tmp_path / f"candela-{first}.port-taken-1.log").exists()


def test_a_port_the_test_chose_is_never_changed(tmp_path: Path, taken: int) -> None:
    c = CandelaProcess(tmp_path, base_config("http://127.0.0.1:9"), port=taken)
    with pytest.raises(PortTaken, match="(?i)address already in use"):
        c.start()
    assert c.port == taken and c.proc is None


def test_a_redis_port_taken_before_redis_binds_it_is_picked_again(
    tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch, redis_binary: str
) -> None:
    picks(monkeypatch, shared, taken)
    server = shared.RedisServer(redis_binary, tmp_path)
    try:
        assert server.port != taken
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(16).startswith(b"+PONG")
    finally:
        server.stop()
    assert "address already in use" in (tmp_path / "redis.port-taken-1.log").read_text().lower()
