"""WebSocket clients run unchanged under `candela run` (issue 15): the openai Python SDK's
realtime client and the Node `ws` client connect to wss://api.openai.com with their own defaults;
Candela intercepts by SNI and governs the session (model at the upgrade, usage per frame) before
the fake Realtime provider. A denied model is refused at the upgrade with nothing reaching the
fake; the audit trail holds the session, the refusal and the process that made them."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import candela_env
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.realtime import FakeRealtime, RtUsage
from tests.fakes.sdk import sdk_available, sdk_python
from tests.fakes.upstream import OPENAI_KEY
from tests.required import require

from .sandbox_env import PROVIDER_IP, audit_entries, candela_run, sdk_env, transparent_config

pytestmark = [pytest.mark.privileged, pytest.mark.sdk, pytest.mark.timeout(120)]

USER = "alice@example.com"
MODEL = "gpt-realtime"
DENIED = "gpt-4o-realtime-preview"
APP_KEY = "sk-the-apps-own-key"  # what the app brings: the organisation's key replaces it
NODE_WS = Path(__file__).resolve().parents[2] / ".node-ws" / "node_modules"


@dataclass
class Env:
    candela: CandelaProcess
    fake: FakeRealtime

    @property
    def audit_db(self) -> Path:
        return self.candela.tmp / "audit.db"

    def run(self, command: list[str], env: dict[str, str]) -> dict[str, Any]:
        p = candela_run(
            self.candela.config_path,
            command,
            "--user",
            USER,
            "--add-host",
            f"api.openai.com:{PROVIDER_IP}",
            env={**sdk_env(), **env},
        )
        assert p.returncode == 0, p.stderr[-3000:]
        out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("sandbox-websocket")
    with FakeTokenServer() as tokens, FakeRealtime() as fake:
        cfg = transparent_config(fake.url, tmp)
        cfg["governance"]["models"] = {"mode": "blocklist", "blocked": [DENIED]}
        cfg["governance"]["websocket"] = {"reserve_usd": 0.05}
        with CandelaProcess(tmp, cfg, env=candela_env(tokens, tmp), pick_listen_port=True) as candela:
            yield Env(candela, fake)


@pytest.fixture(autouse=True)
def _reset(env: Env) -> None:
    env.fake.reset()


def wait_entries(env: Env, action: str, before: int, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        got = audit_entries(env.audit_db, action)[before:]
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def assert_governed(env: Env, out: dict[str, Any], exe: str, counts: tuple[int, int]) -> None:
    """One session reached the fake with the organisation's key and was metered; the denied
    upgrade never left; the audit trail holds both, with the process the kernel names."""
    requests_before, sessions_before = counts
    (session,) = env.fake.sessions
    assert session.query["model"] == [MODEL]
    assert session.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert [f["type"] for f in session.frames] == ["response.create"]
    (entry,) = wait_entries(env, "llm_session", sessions_before, 1)
    assert (entry["user_id"], entry["provider"], entry["model"]) == (USER, "openai", MODEL)
    assert (entry["input_tokens"], entry["output_tokens"]) == (30, 5)
    assert entry["usage_frames"] == 1 and entry["cost_usd"] > 0
    upgrades = wait_entries(env, "llm_request", requests_before, 2)
    assert [(e["decision"], e["model"]) for e in upgrades] == [
        ("allowed", MODEL), ("denied", DENIED)
    ]
    assert upgrades[1]["reason"] == "model_not_allowed"
    assert upgrades[0]["span_id"] == entry["span_id"]  # the session is the upgrade's
    for e in upgrades:
        assert e["workload_exe"] == os.path.realpath(exe)
        assert e["workload_cgroup"].startswith("/candela/sandbox-")


def _counts(env: Env) -> tuple[int, int]:
    return (
        len(audit_entries(env.audit_db, "llm_request")),
        len(audit_entries(env.audit_db, "llm_session")),
    )


SDK_REALTIME = """
    import asyncio, json, os
    from openai import AsyncOpenAI

    async def session(model):
        # no base_url: wss://api.openai.com/v1/realtime, as the app would anywhere
        client = AsyncOpenAI(api_key=os.environ["APP_KEY"], max_retries=0)
        events = []
        try:
            async with client.realtime.connect(model=model) as conn:
                events.append((await conn.recv()).type)
                await conn.response.create()
                async for event in conn:
                    events.append(event.type)
                    if event.type == "response.done":
                        return {"events": events, "usage": event.response.usage.model_dump()}
        except Exception as e:
            return {"refused": type(e).__name__, "detail": str(e)[:300]}

    async def main():
        print(json.dumps({"allowed": await session(os.environ["MODEL"]),
                          "denied": await session(os.environ["DENIED"])}))

    asyncio.run(main())
"""


def test_the_openai_sdk_realtime_client_runs_unchanged(env: Env) -> None:
    if not sdk_available():
        pytest.fail("the SDK venv is missing: run scripts/sdk-venv.sh (make test does)")
    env.fake.usage = RtUsage(input_text=30, output_text=5)
    counts = _counts(env)
    out = env.run(
        [str(sdk_python()), "-c", textwrap.dedent(SDK_REALTIME)],
        {"APP_KEY": APP_KEY, "MODEL": MODEL, "DENIED": DENIED},
    )
    allowed = out["allowed"]
    assert allowed.get("events", [None])[0] == "session.created", allowed
    assert allowed["events"][-1] == "response.done"
    assert (allowed["usage"]["input_tokens"], allowed["usage"]["output_tokens"]) == (30, 5)
    assert "403" in out["denied"]["detail"], out["denied"]  # refused at the upgrade
    assert_governed(env, out, str(sdk_python()), counts)


NODE_CLIENT = """
const WebSocket = require("ws");
function session(model) {
  return new Promise((resolve) => {
    const url = "wss://api.openai.com/v1/realtime?model=" + model;
    const ws = new WebSocket(url, {headers: {Authorization: "Bearer " + process.env.APP_KEY}});
    const seen = [];
    ws.on("message", (data) => {
      const e = JSON.parse(data.toString());
      seen.push(e.type);
      if (e.type === "session.created") ws.send(JSON.stringify({type: "response.create"}));
      if (e.type === "response.done") { ws.close(1000); resolve({seen, usage: e.response.usage}); }
    });
    ws.on("unexpected-response", (req, res) => resolve({status: res.statusCode}));
    ws.on("error", (err) => resolve({error: String(err)}));
  });
}
(async () => {
  const allowed = await session(process.env.MODEL);
  const denied = await session(process.env.DENIED);
  console.log(JSON.stringify({allowed, denied}));
  process.exit(0);
})();
"""


def test_a_node_ws_client_runs_unchanged(env: Env) -> None:
    if not (NODE_WS / "ws" / "package.json").is_file():
        require("the Node ws client: run scripts/node-ws.sh (make test does)")
    node = shutil.which("node")
    assert node is not None
    env.fake.usage = RtUsage(input_text=30, output_text=5)
    counts = _counts(env)
    out = env.run(
        [node, "-e", NODE_CLIENT],
        {"NODE_PATH": str(NODE_WS), "APP_KEY": APP_KEY, "MODEL": MODEL, "DENIED": DENIED},
    )
    allowed = out["allowed"]
    assert allowed.get("seen", [None])[0] == "session.created", allowed
    assert allowed["seen"][-1] == "response.done" and allowed["usage"]["input_tokens"] == 30
    assert out["denied"] == {"status": 403}
    assert_governed(env, out, node, counts)
