"""Real clients run unchanged under `candela run` (issues 14 and 17): the Node SDKs of OpenAI,
Anthropic and Google, the Claude Code CLI and boto3's Converse, each with its own default base
URL, reaching the fake provider only through Candela's SNI interception. Each gets the governed
answer; a denied model is refused with nothing reaching the fake; the audit trail holds both,
with the process the kernel says sent them. One Candela serves every test of the module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from candela_mitm.providers.usage import Usage
from tests.e2e.conftest import candela_env
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.node import SCRIPTS, node_sdk_dir, node_sdk_missing
from tests.fakes.sdk import sdk_available, sdk_python
from tests.fakes.upstream import ANTHROPIC_KEY, FakeUpstream
from tests.required import require

from .sandbox_env import PROVIDER_IP, audit_entries, candela_run, sdk_env, transparent_config

pytestmark = [pytest.mark.privileged, pytest.mark.sdk, pytest.mark.timeout(120)]

USER = "alice@example.com"
HOSTS = (
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
)
CLAUDE = Path(__file__).resolve().parents[2] / ".claude-code" / "node_modules" / ".bin" / "claude"
BEDROCK_MODEL = "anthropic.claude-sonnet-4-20250514-v1:0"
BEDROCK_DENIED = "anthropic.claude-opus-4-20250514-v1:0"
CLAUDE_CODE_DENIED = "claude-opus-4-8"
# (route, script, allowed model, denied model, path the fake sees for both calls)
NODE_SDKS = {
    "openai": ("openai", "openai.mjs", "gpt-4o-mini", "gpt-4o", "/v1/chat/completions"),
    "anthropic": (
        "anthropic-direct",
        "anthropic.mjs",
        "claude-sonnet-4-20250514",
        "claude-opus-4-20250514",
        "/v1/messages",
    ),
    "google": (
        "google",
        "google.mjs",
        "gemini-2.5-flash",
        "gemini-2.5-pro",
        "/v1beta/models/gemini-2.5-flash:",
    ),
}
DENIED = [case[3] for case in NODE_SDKS.values()] + [BEDROCK_DENIED, CLAUDE_CODE_DENIED]
# what an app brings as its own key: never forwarded, the organisation's replaces it
APP_KEY = "sk-the-apps-own-key"


@dataclass
class Env:
    candela: CandelaProcess
    upstream: FakeUpstream
    tokens: FakeTokenServer

    @property
    def audit_db(self) -> Path:
        return self.candela.tmp / "audit.db"

    def run(
        self, command: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        hosts = [a for h in HOSTS for a in ("--add-host", f"{h}:{PROVIDER_IP}")]
        return candela_run(
            self.candela.config_path,
            command,
            "--user",
            USER,
            *hosts,
            env={**sdk_env(), **env},
            cwd=cwd,
            timeout=90,
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("sandbox-clients")
    with FakeTokenServer() as tokens, FakeUpstream(google_token_valid=tokens.is_valid) as upstream:
        cfg = transparent_config(upstream.url, tmp)
        cfg["governance"]["models"] = {"mode": "blocklist", "blocked": DENIED}
        with CandelaProcess(tmp, cfg, env=candela_env(tokens, tmp), pick_listen_port=True) as candela:
            yield Env(candela, upstream, tokens)


@pytest.fixture(autouse=True)
def _reset(env: Env) -> None:
    env.upstream.reset()
    env.upstream.clear()


def new_entries(env: Env, before: int, n: int) -> list[dict[str, Any]]:
    """The llm_request entries written since `before` of them were, waiting for `n`."""
    deadline = time.monotonic() + 30
    while True:
        got = audit_entries(env.audit_db, "llm_request")[before:]
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def assert_workload(entries: list[dict[str, Any]], exe: str) -> None:
    for e in entries:
        assert e["user_id"] == USER
        assert e["workload_exe"] == os.path.realpath(exe)
        assert e["workload_cgroup"].startswith("/candela/sandbox-")


# -- the Node SDKs ----------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", sorted(NODE_SDKS))
def test_a_node_sdk_runs_unchanged(env: Env, sdk: str) -> None:
    missing = node_sdk_missing()
    if missing:
        require(missing)
    route, script, model, denied, path = NODE_SDKS[sdk]
    env.upstream.configure(usage=Usage(input_tokens=40, output_tokens=9), n_chunks=3)
    before = len(audit_entries(env.audit_db, "llm_request"))
    node = ["node", "--input-type=module", "-e", (SCRIPTS / script).read_text()]
    # no CANDELA_URL: the SDK talks to its provider's own host, as it would anywhere
    p = env.run(node, {"CANDELA_KEY": APP_KEY, "MODEL": model, "DENIED_MODEL": denied},
                cwd=node_sdk_dir())
    assert p.returncode == 0, p.stderr[-3000:]
    out = {line.pop("call"): line for line in map(json.loads, p.stdout.splitlines())}
    assert out["json"]["text"] == env.upstream.reply_text
    assert out["json"]["usage"] == [40, 9] and out["json"]["span"]
    assert out["stream"]["text"] == env.upstream.reply_text
    assert out["denied"] == {"status": 403, "error": "model_not_allowed", "api_error": True}
    seen = env.upstream.wait_for(2)
    assert len(env.upstream.requests) == 2  # the denied model never left
    for rec in seen:
        assert rec.route_path.startswith(path) if sdk == "google" else rec.route_path == path
        assert APP_KEY not in json.dumps(rec.headers)  # the organisation's credential went on
        expected = {"openai": "openai_key", "anthropic": "anthropic_key", "google": "google_token"}
        assert rec.auth == expected[sdk]
    entries = new_entries(env, before, 3)
    assert [(e["decision"], e["provider"], e["model"]) for e in entries] == [
        ("allowed", route, model), ("allowed", route, model), ("denied", route, denied)
    ]
    assert entries[0]["span_id"] == out["json"]["span"]
    assert entries[2]["reason"] == "model_not_allowed" and entries[2]["cost_usd"] == 0
    assert entries[0]["input_tokens"] == 40 and entries[0]["cost_usd"] > 0
    assert_workload(entries, _which("node"))


def _which(name: str) -> str:
    found = shutil.which(name)
    assert found is not None
    return found


# -- Claude Code ------------------------------------------------------------------------------


def _claude(env: Env, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CLAUDE.exists():
        require("the Claude Code CLI: run scripts/claude-code.sh (make test does)")
    home.mkdir(exist_ok=True)
    variables = {
        "HOME": str(home),
        "ANTHROPIC_API_KEY": APP_KEY,  # no ANTHROPIC_BASE_URL: api.anthropic.com, intercepted
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
    }
    command = [str(CLAUDE), "-p", "say hi", "--output-format", "json", *args]
    return env.run(command, variables, cwd=home)


def test_claude_code_runs_unchanged(env: Env, tmp_path: Path) -> None:
    env.upstream.configure(usage=Usage(input_tokens=300, output_tokens=12))
    before = len(audit_entries(env.audit_db, "llm_request"))
    p = _claude(env, tmp_path / "home")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    out = json.loads(p.stdout)
    assert not out["is_error"] and out["result"] == env.upstream.reply_text
    (model,) = out["modelUsage"]
    assert env.upstream.requests
    for rec in env.upstream.requests:
        assert rec.route_path == "/v1/messages"
        assert rec.headers["x-api-key"] == ANTHROPIC_KEY and APP_KEY not in json.dumps(rec.headers)
    entries = new_entries(env, before, len(env.upstream.requests))
    inference = [e for e in entries if e.get("operation") == "messages"]
    assert inference and all(
        (e["decision"], e["model"], e["provider"]) == ("allowed", model, "anthropic-direct")
        for e in inference
    )
    assert sum(e["cost_usd"] for e in inference) == pytest.approx(out["total_cost_usd"], rel=1e-6)
    # the process the kernel names: Claude Code's own binary
    assert {e["workload_exe"] for e in inference} == {os.path.realpath(CLAUDE)}

    # a model the policy denies: Claude Code reports the refusal, nothing reached the provider
    env.upstream.clear()
    before = len(audit_entries(env.audit_db, "llm_request"))
    p = _claude(env, tmp_path / "home", "--model", CLAUDE_CODE_DENIED)
    refused = json.loads(p.stdout)
    # Claude Code shows the 403 and Candela's message (the code is in the audit entry)
    assert refused["is_error"] and refused["api_error_status"] == 403, refused
    assert f"Model '{CLAUDE_CODE_DENIED}' is blocked by the model policy" in refused["result"]
    assert env.upstream.requests == []
    denied = [e for e in new_entries(env, before, 1) if e["decision"] == "denied"]
    assert (CLAUDE_CODE_DENIED, "model_not_allowed") in {(e["model"], e["reason"]) for e in denied}
    # its auxiliary calls (not inference) are refused by the catalogue, never forwarded
    assert {e["reason"] for e in denied if e["model"] is None} <= {"endpoint_not_governed"}


# -- boto3's Converse -------------------------------------------------------------------------

CONVERSE = """
    import json, boto3, botocore.exceptions
    # no endpoint_url: bedrock-runtime.us-east-1.amazonaws.com, as in production; the app's own
    # (dummy) AWS keys sign it, Candela re-signs with the organisation's
    b = boto3.client("bedrock-runtime", region_name="us-east-1",
                     aws_access_key_id="AKIDAPPOWN", aws_secret_access_key="app-own-secret")
    messages = [{"role": "user", "content": [{"text": "hi"}]}]
    r = b.converse(modelId=%(model)r, messages=messages)
    out = {"text": r["output"]["message"]["content"][0]["text"], "usage": r["usage"]}
    try:
        b.converse(modelId=%(denied)r, messages=messages)
        out["denied"] = None
    except botocore.exceptions.ClientError as e:
        out["denied"] = [e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]]
    print(json.dumps(out))
"""


def test_boto3_converse_runs_unchanged(env: Env) -> None:
    if not sdk_available():
        pytest.fail("the SDK venv is missing: run scripts/sdk-venv.sh (make test does)")
    env.upstream.configure(usage=Usage(input_tokens=50, output_tokens=10))
    before = len(audit_entries(env.audit_db, "llm_request"))
    script = textwrap.dedent(CONVERSE) % {"model": BEDROCK_MODEL, "denied": BEDROCK_DENIED}
    variables = {
        # botocore trusts only AWS_CA_BUNDLE (candela run sets it): no profile, no metadata
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    p = env.run([str(sdk_python()), "-c", script], variables)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["text"] == env.upstream.reply_text
    assert (out["usage"]["inputTokens"], out["usage"]["outputTokens"]) == (50, 10)
    status, error = out["denied"]
    # botocore shows the status and Candela's message (the code is in the audit entry)
    assert status == 403
    assert f"Model '{BEDROCK_DENIED}' is blocked by the model policy" in error["Message"]
    (rec,) = env.upstream.wait_for(1)
    assert len(env.upstream.requests) == 1  # the denied model never left
    assert rec.sigv4 is True, rec.sigv4_reason  # re-signed with the organisation's keys
    assert "AKIDAPPOWN" not in rec.headers["authorization"]
    entries = new_entries(env, before, 2)
    assert [(e["decision"], e["provider"], e["model"]) for e in entries] == [
        ("allowed", "anthropic-bedrock", BEDROCK_MODEL),
        ("denied", "anthropic-bedrock", BEDROCK_DENIED),
    ]
    assert entries[0]["operation"] == "Converse" and entries[0]["cost_usd"] > 0
    assert_workload(entries, str(sdk_python()))
