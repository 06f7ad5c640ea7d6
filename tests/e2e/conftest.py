"""End-to-end fixtures: a fake provider, a fake Google token endpoint and a real Candela process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.sdk import run_sdk, sdk_available
from tests.fakes.upstream import (
    ANTHROPIC_KEY,
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY,
    OPENAI_KEY,
    FakeUpstream,
)

ALICE_KEY = "cdl_alice_example_key"
ALICE_SHA = "1d7ab44a7d52779899b2b6d61230b265b654e07590677891e88d4d18fc07f034"
BOB_KEY = "cdl_bob_key"
ADMIN_KEY = "cdl_admin_key"


def sha(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()


def providers_config(url: str) -> dict[str, Any]:
    return {
        "openai": {"base_url": url},
        "google": {"base_url": url},
        "gemini-oai": {"base_url": url + "/v1beta/openai"},
        "anthropic": {"base_url": url, "project": "proj", "region": "us-east5"},
        "anthropic-vertex": {"base_url": url, "project": "proj", "region": "us-east5"},
        "anthropic-direct": {"base_url": url},
        "anthropic-bedrock": {"base_url": url, "region": "us-east-1"},
        "bedrock-mantle": {"base_url": url, "region": "us-east-1"},
        "ollama": {"base_url": url},
        "lmstudio": {"base_url": url},
    }


def base_config(url: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": providers_config(url),
        "auth": {
            "api_keys": [
                {"sha256": ALICE_SHA, "user": "alice@example.com"},
                {"sha256": sha(BOB_KEY), "user": "bob@example.com"},
                {"sha256": sha(ADMIN_KEY), "user": "admin@example.com"},
            ],
            "admins": ["admin@example.com"],
        },
        "users": {"alice@example.com": {"tenants": ["research-team", "other-team"]}},
        "governance": {"budgets": {"default_daily_usd": 1000.0}},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def token_server() -> Iterator[FakeTokenServer]:
    with FakeTokenServer() as t:
        yield t


@pytest.fixture(scope="module")
def upstream(token_server: FakeTokenServer) -> Iterator[FakeUpstream]:
    with FakeUpstream(google_token_valid=token_server.is_valid) as f:
        yield f


def candela_env(token_server: FakeTokenServer, tmp: Path) -> dict[str, str]:
    sa = token_server.make_service_account_file(tmp)
    return {
        "OPENAI_API_KEY": OPENAI_KEY,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "GOOGLE_APPLICATION_CREDENTIALS": str(sa),
        "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_ACCESS_KEY,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "NO_PROXY": "127.0.0.1,localhost",
        "HTTP_PROXY": "",
        "HTTPS_PROXY": "",
    }


@pytest.fixture(scope="module")
def candela(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, token_server: FakeTokenServer
) -> Iterator[CandelaProcess]:
    tmp = tmp_path_factory.mktemp("candela")
    cfg = base_config(upstream.url, limits={"max_body_bytes": 200_000})
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp)) as c:
        yield c


@pytest.fixture
def sdk() -> None:
    if not sdk_available():
        pytest.fail("the SDK venv is missing: run scripts/sdk-venv.sh (make test does)")


def sdk_json(script: str, env: dict[str, str] | None = None) -> list[Any]:
    proc = run_sdk(script, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
