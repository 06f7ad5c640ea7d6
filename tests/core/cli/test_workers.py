"""Workers: the supervisor forks N workers, stops them together, and reports how they ended."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from candela_mitm.cli.workers import claim_port, run_workers
from tests.wait import until


def test_claim_port_resolves_zero_and_refuses_a_port_in_use() -> None:
    port = claim_port("127.0.0.1", 0)
    assert port > 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            claim_port("127.0.0.1", busy.getsockname()[1])


def test_claim_port_accepts_a_port_with_connections_in_time_wait() -> None:
    """A killed worker's connections: the server side closed first, so the port's local end
    stays in TIME-WAIT (60 s on Linux) after the listener is gone."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server closes first: its end goes to TIME-WAIT once the client acks
        assert client.recv(1) == b""
        client.close()
    local_port = f":{port:04X}"

    def time_wait() -> bool:
        states = Path("/proc/net/tcp").read_text().splitlines()[1:]
        return any(
            line.split()[1].endswith(local_port) and line.split()[3] == "06" for line in states
        )

    # waited for (a fixed 0.1 s before)
    until(time_wait, what="a TIME-WAIT socket on the port (the test set-up did not make one)")
    with socket.socket() as plain:  # what claim_port did before: refused
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    assert claim_port("127.0.0.1", port) == port


@pytest.mark.parametrize(
    "codes, expected",
    [
        ((0, 0), 1),  # a worker that ends unasked (even cleanly) leaves the port short: 1
        ((0, 3), 3),  # one failed: its code, the others are stopped
        ((2, 2), 2),  # a config error in every worker
    ],
)
def test_exit_codes(tmp_path: Path, codes: tuple[int, int], expected: int) -> None:
    def child(i: int) -> int:
        (tmp_path / f"ran-{i}").write_text(str(os.getpid()))
        if codes[i] == 0 and codes != (0, 0):
            time.sleep(30)  # a healthy worker runs until it is stopped
        return codes[i]

    started = time.monotonic()
    assert run_workers(2, child, grace_s=5) == expected
    assert time.monotonic() - started < 10
    assert (tmp_path / "ran-0").exists()  # the other may be stopped before it starts


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    def child(i: int) -> int:
        (tmp_path / f"pid-{i}").write_text(str(os.getpid()))
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait(30)
        (tmp_path / f"stopped-{i}").write_text("ok")
        return 0

    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert run_workers(3, child, grace_s=5) == 0
    finally:
        timer.cancel()
    assert sorted(p.name for p in tmp_path.glob("stopped-*")) == [f"stopped-{i}" for i in range(3)]
    for i in range(3):
        assert not Path(f"/proc/{(tmp_path / f'pid-{i}').read_text()}").exists()


def test_stores_are_created_before_the_workers_race_to_create_them(tmp_path: Path) -> None:
    import sqlite3

    from candela_mitm.cli.main import prepare_stores
    from candela_mitm.config import parse_config

    cfg = parse_config(
        {
            "state": {"sqlite_path": str(tmp_path / "state.db")},
            "audit": {"sqlite_path": str(tmp_path / "audit.db")},
        }
    )
    prepare_stores(cfg)
    for name in ("state.db", "audit.db"):
        with sqlite3.connect(tmp_path / name) as db:  # WAL is set once, before anyone competes
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
