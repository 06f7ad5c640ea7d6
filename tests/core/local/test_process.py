"""The local runtime's process: started and stopped by Candela, never one started elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from candela_mitm.local.process import RuntimeActionError
from tests.core.local.support import local_runtime, nowhere

REPO = Path(__file__).resolve().parents[3]


# A stand-in for `ollama serve`: the fake Ollama API where OLLAMA_HOST says, until signalled.
FAKE_SERVE = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
from tests.fakes.upstream import FakeUpstream
host, port = os.environ["OLLAMA_HOST"].rsplit(":", 1)
FakeUpstream(host=host, port=int(port), openai_key=None, models=["started:1b"]).start()
print("serving", flush=True)
time.sleep(3600)
"""


def test_start_and_stop_the_configured_command(tmp_path):
    url = nowhere()
    rt = local_runtime(tmp_path, url, nowhere(), runtime_command=[sys.executable, "-c", FAKE_SERVE])
    assert rt.discover().runtimes["ollama"].reachable is False
    started = rt.start()
    try:
        assert started["started"] is True and started["reachable"] is True
        pid = started["process"]["pid"]
        assert started["process"] == {
            "managed": True,
            "running": True,
            "pid": pid,
            "exit_code": None,
            "command": [sys.executable, "-c", FAKE_SERVE],
        }
        assert rt.discover().models == {"started:1b": "ollama"}  # start dropped the old list
        again = rt.start()
        assert again["started"] is False and again["reason"] == "already running"
    finally:
        stopped = rt.stop()
    assert stopped["stopped"] is True and stopped["pid"] == pid
    assert stopped["process"]["managed"] is False
    assert rt.discover().runtimes["ollama"].reachable is False
    assert rt.stop()["stopped"] is False
    assert "serving" in (tmp_path / "local-runtime.log").read_text()


def test_a_runtime_started_elsewhere_is_neither_started_nor_stopped(tmp_path, ollama):
    rt = local_runtime(tmp_path, ollama.url, nowhere(), runtime_command=["false"])
    assert rt.start()["started"] is False
    with pytest.raises(RuntimeActionError) as e:
        rt.stop()
    assert e.value.status == 409 and "not started by Candela" in str(e.value)


@pytest.mark.parametrize(
    "command, status, words",
    [
        (["/nonexistent/ollama", "serve"], 502, "cannot run"),
        ([sys.executable, "-c", "raise SystemExit(3)"], 502, "exited with code 3"),
    ],
)
def test_a_command_that_cannot_serve_is_an_error(tmp_path, command, status, words):
    rt = local_runtime(tmp_path, nowhere(), nowhere(), runtime_command=command)
    with pytest.raises(RuntimeActionError) as e:
        rt.start(wait_s=5)
    assert e.value.status == status and words in str(e.value)


def test_close_stops_a_started_runtime(tmp_path):
    rt = local_runtime(
        tmp_path, nowhere(), nowhere(), runtime_command=[sys.executable, "-c", FAKE_SERVE]
    )
    assert rt.start()["started"] is True
    proc = rt.process.proc
    assert proc is not None and proc.poll() is None
    rt.close()
    assert proc.poll() is not None
