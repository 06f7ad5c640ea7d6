"""Fixtures of the enforcement tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

MANY_SOCKETS = """
import socket, time
listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
held = []
for _ in range(1000):
    held.append(socket.create_connection(listener.getsockname()))
    held.append(listener.accept()[0])
print("ready", flush=True)
time.sleep(120)  # killed by the test
"""


@pytest.fixture
def many_sockets() -> Iterator[subprocess.Popen[str]]:
    """Another process holding 2,000 loopback sockets (1,000 connections, both ends)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", MANY_SOCKETS], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert len(Path("/proc/net/tcp").read_text().splitlines()) > 2000
        yield holder
    finally:
        holder.kill()
        holder.wait()
