"""Prices in Candela's default configuration, end to end (issue 18).

The real Claude Code CLI: Claude Code (npm @anthropic-ai/claude-code, installed by scripts/claude-code.sh) is pointed at
/proxy/anthropic-direct with its own default model. With the default configuration (no
`pricing:`), Candela must answer it (not 402 model_price_unknown) and charge what the model
costs: Claude Code's own reckoning of the cost, from its own price list, is the second witness.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from candela_mitm.config import parse_config
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage
from tests.e2e.conftest import ADMIN_KEY, ALICE_KEY, ALICE_SHA, candela_env, sha
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.upstream import ANTHROPIC_KEY, FakeUpstream
from tests.required import require

pytestmark = pytest.mark.e2e

CLAUDE = Path(__file__).resolve().parents[2] / ".claude-code" / "node_modules" / ".bin" / "claude"
AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}


@pytest.fixture(scope="module")
def default_candela(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, token_server: FakeTokenServer
) -> Iterator[CandelaProcess]:
    """The default configuration: only the upstream address (no internet here) and a key."""
    tmp = tmp_path_factory.mktemp("candela-default")
    cfg = {
        "providers": {"anthropic-direct": {"base_url": upstream.url}},
        "auth": {
            "api_keys": [
                {"sha256": ALICE_SHA, "user": "alice@example.com"},
                {"sha256": sha(ADMIN_KEY), "user": "admin@example.com"},  # /metrics is for admins
            ],
            "admins": ["admin@example.com"],
        },
    }
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp)) as c:
        yield c


def claude(candela: CandelaProcess, tmp: Path, *args: str) -> dict:
    if not CLAUDE.exists():
        require("the Claude Code CLI: run scripts/claude-code.sh (make test does)")
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": f"{candela.url}/proxy/anthropic-direct",
        "ANTHROPIC_API_KEY": ALICE_KEY,  # Candela's key: the provider's is Candela's to add
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    proc = subprocess.run(
        [str(CLAUDE), "-p", "say hi", "--output-format", "json", *args],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    return json.loads(proc.stdout)


def spans(candela: CandelaProcess) -> list[dict]:
    r = requests.get(f"{candela.url}/_local/api/traces?limit=200", headers=AUTH, timeout=5)
    assert r.status_code == 200
    return r.json()["spans"]


@pytest.mark.parametrize("args", [(), ("--model", "claude-opus-4-8")], ids=["default", "opus-4-8"])
def test_claude_code_is_answered_and_charged_at_its_models_price(
    default_candela, upstream, tmp_path, args
):
    upstream.reset()
    upstream.clear()
    upstream.configure(usage=Usage(input_tokens=3_000, output_tokens=40, cached_tokens=2_000))
    before = {s["span_id"] for s in spans(default_candela)}
    out = claude(default_candela, tmp_path, *args)
    assert not out["is_error"] and out["result"] == upstream.reply_text
    (model,) = out["modelUsage"]  # the model Claude Code chose (its default, or --model)
    if args:
        assert model == args[1]
    new = [s for s in spans(default_candela) if s["span_id"] not in before]
    assert new and all(s["status"] == "ok" and s["model"] == model for s in new)
    for rec in upstream.requests:
        assert rec.headers["x-api-key"] == ANTHROPIC_KEY and ALICE_KEY not in json.dumps(rec.headers)
    # charged at the model's price: uncached input, cache reads and output at their rates ...
    price = PricingTable.from_config(parse_config({})).get(model, "anthropic-direct")
    assert price is not None
    per_request = (1_000 * price.input + 2_000 * price.cached_input + 40 * price.output) / 1e6
    for s in new:
        assert s["cost_usd"] == pytest.approx(per_request)
    # ... which is what Claude Code itself reckons it cost
    assert sum(s["cost_usd"] for s in new) == pytest.approx(out["total_cost_usd"], rel=1e-6)
    assert exceeded(default_candela) == 0  # and no request cost more than it reserved


def exceeded(candela: CandelaProcess) -> float:
    text = requests.get(f"{candela.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("candela_estimate_exceeded_total{")
    )


def test_a_cost_above_its_reservation_is_counted(default_candela, upstream):
    """The fake provider bills far more input than the request sent: the estimate missed."""
    upstream.reset()
    before = exceeded(default_candela)
    body = {"model": "claude-opus-4-8", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}
    for usage, counted in ((Usage(10, 5, 0), 0), (Usage(900_000, 5, 0), 1)):
        upstream.configure(usage=usage)
        r = requests.post(f"{default_candela.url}/proxy/anthropic-direct/v1/messages",
                          json=body, headers={"x-api-key": ALICE_KEY}, timeout=30)
        assert r.status_code == 200, r.text
        assert exceeded(default_candela) == before + counted
