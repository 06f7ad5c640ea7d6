"""Browser fixtures: Debian's headless Chromium driven by Playwright, and a local-mode Candela."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import base_config, candela_env
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.upstream import FakeUpstream

# Never a downloaded browser (`playwright install` needs the internet): the distribution's.
CHROMIUM = os.environ.get("CANDELA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-system.sh (make test does)")
    from playwright.sync_api import expect, sync_playwright

    # expect() polls until its condition holds; its 5 s default is short for a page that
    # fetches from a Candela on a loaded 2-core machine (a met condition returns at once)
    expect.set_options(timeout=30_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def token_server() -> Iterator[FakeTokenServer]:
    with FakeTokenServer() as t:
        yield t


@pytest.fixture(scope="module")
def upstream(token_server: FakeTokenServer) -> Iterator[FakeUpstream]:
    with FakeUpstream(google_token_valid=token_server.is_valid) as f:
        yield f


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeUpstream]:
    with FakeUpstream(openai_key=None, models=["llama3.2:3b", "qwen3:0.6b"]) as f:
        yield f


@pytest.fixture(scope="module")
def lmstudio() -> Iterator[FakeUpstream]:
    with FakeUpstream(openai_key=None, models=["qwen2.5-7b-instruct"]) as f:
        yield f


@pytest.fixture(scope="module")
def local(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
    token_server: FakeTokenServer,
    ollama: FakeUpstream,
    lmstudio: FakeUpstream,
) -> Iterator[CandelaProcess]:
    tmp = tmp_path_factory.mktemp("ui")
    cfg = base_config(upstream.url, governance={"budgets": {"default_daily_usd": 5.0}})
    cfg["providers"]["ollama"] = {"base_url": ollama.url}
    cfg["providers"]["lmstudio"] = {"base_url": lmstudio.url}
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp), command="candela") as c:
        yield c
