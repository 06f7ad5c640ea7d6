"""Shadow mode end to end: a stricter candidate judged live, never enforced, and its replay."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from candela_mitm.audit.query import query_entries, request_entries
from candela_mitm.config import load_config
from candela_mitm.governance.replay import Candidate, replay
from candela_mitm.providers.usage import Usage
from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import FakeUpstream
from tests.wait import WAIT_S, until

from .conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, base_config, candela_env, sha

pytestmark = pytest.mark.e2e
CAROL_KEY = "cdl_carol_key"
CHAT = "/proxy/openai/v1/chat/completions"
CANDELA = str(Path(sys.executable).parent / "candela")

# Stricter than the live policy (1000 USD a day, every model): gpt-4o-mini only, alice 0.001
# a day, the tenant other-team 0.0007 a month
CANDIDATE: dict[str, Any] = {
    "users": {"alice@example.com": {"daily_budget_usd": 0.001}},
    "governance": {
        "models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]},
        "tenants": {"other-team": {"budget_usd": 0.0007, "period": "monthly"}},
    },
}


def chat(c: CandelaProcess, key: str, model: str = "gpt-4o-mini", **headers: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    r = requests.post(c.url + CHAT, json=body, headers={"Authorization": f"Bearer {key}", **headers},
                      timeout=20)
    return r.status_code


def shadows(c: CandelaProcess, n: int) -> list[tuple[str, str | None, dict[str, Any] | None]]:
    """The llm_request entries, oldest first, once there are at least `n`: entries are committed
    right after each response (waited for: a fixed 0.2 s was short on a loaded machine)."""
    rows = until(lambda: query_entries(c.tmp / "audit.db", action="llm_request", limit=1000),
                 lambda rows: len(rows) >= n, what=f"{n} llm_request entries")[::-1]
    return [(r["user_id"], r["fields"]["model"], r["fields"].get("shadow")) for r in rows]


@pytest.fixture
def shadowed(tmp_path: Path, upstream: FakeUpstream, token_server: Any):
    upstream.reset()
    upstream.clear()
    (tmp_path / "candidate.yaml").write_text(yaml.safe_dump(CANDIDATE))
    cfg = base_config(upstream.url)
    cfg["auth"]["api_keys"].append({"sha256": sha(CAROL_KEY), "user": "carol@example.com"})
    cfg["users"]["carol@example.com"] = {"tenants": ["other-team"]}
    # the live tenant counts its spend per month (no budget): the candidate's period
    cfg["governance"]["tenants"] = {"other-team": {"period": "monthly"}}
    cfg["governance"]["shadow"] = "candidate.yaml"  # relative to the config file
    with CandelaProcess(tmp_path, cfg, env=candela_env(token_server, tmp_path)) as c:
        yield c


def test_requests_pass_and_their_entries_carry_the_shadow_verdict(
    shadowed: CandelaProcess, upstream: FakeUpstream
) -> None:
    # each answer costs 2000 * 0.15 + 100 * 0.60 per million = 0.00036 USD, reserved ~0.00006
    upstream.configure(usage=Usage(input_tokens=2000, output_tokens=100))
    codes = [chat(shadowed, ALICE_KEY) for _ in range(5)]
    codes.append(chat(shadowed, BOB_KEY, model="gpt-4o"))
    codes.append(chat(shadowed, BOB_KEY))
    codes += [chat(shadowed, CAROL_KEY) for _ in range(3)]
    assert codes == [200] * 10  # the shadow never enforces
    assert len(upstream.requests) == 10
    user = {"decision": "denied", "code": "budget_exceeded", "scope": "user", "period": "daily",
            "judged": ["model_policy", "budget"]}
    allowed = {"decision": "allowed", "code": None, "judged": ["model_policy", "budget"]}
    assert shadows(shadowed, 10) == [
        ("alice@example.com", "gpt-4o-mini", allowed),
        ("alice@example.com", "gpt-4o-mini", allowed),
        ("alice@example.com", "gpt-4o-mini", allowed),  # 0.00072 spent + 0.00006 <= 0.001
        ("alice@example.com", "gpt-4o-mini", user),
        ("alice@example.com", "gpt-4o-mini", user),
        ("bob@example.com", "gpt-4o", {"decision": "denied", "code": "model_not_allowed",
                                       "policy": "allowlist", "judged": ["model_policy", "budget"]}),
        ("bob@example.com", "gpt-4o-mini", allowed),
        ("carol@example.com", "gpt-4o-mini", allowed),
        ("carol@example.com", "gpt-4o-mini", allowed),
        ("carol@example.com", "gpt-4o-mini", {
            "decision": "denied", "code": "budget_exceeded", "scope": "tenant",
            "period": "monthly", "judged": ["model_policy", "budget"],
        }),
    ]
    metrics = requests.get(shadowed.url + "/metrics", timeout=5,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'candela_shadow_decisions_total{decision="denied"} 4.0' in metrics
    assert 'candela_shadow_decisions_total{decision="allowed"} 6.0' in metrics

    # the replay of that log judges every request as the shadow did
    candidate = Candidate(load_config(shadowed.tmp / "candidate.yaml"))
    report = replay(candidate, request_entries(shadowed.tmp / "audit.db"))
    assert len(report.judged) == 10
    for j in report.judged:
        recorded = j.request.shadow
        assert recorded is not None
        assert (j.verdict.decision, j.verdict.code) == (recorded["decision"], recorded["code"])
        assert {**j.verdict.detail} == {
            k: v for k, v in recorded.items() if k not in ("decision", "code", "judged")
        }
    # and so does the command, from the ledger the proxy wrote
    out = subprocess.run(
        [CANDELA, "policy", "replay", "--config", str(shadowed.tmp / "candidate.yaml"),
         "--audit", str(shadowed.tmp / "audit.db"), "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    changes = json.loads(out.stdout)["changes"]
    assert [(c["user_id"], c["candidate"]["code"]) for c in changes] == [
        ("alice@example.com", "budget_exceeded"),
        ("alice@example.com", "budget_exceeded"),
        ("bob@example.com", "model_not_allowed"),
        ("carol@example.com", "budget_exceeded"),
    ]
    # three gpt-4o-mini answers, and gpt-4o's at 2.50 and 10.00 per million
    avoided = 3 * 0.00036 + (2000 * 2.5 + 100 * 10.0) / 1e6
    assert json.loads(out.stdout)["totals"]["spend_avoided_usd"] == pytest.approx(avoided)


def test_the_shadow_is_reloaded_with_the_config(
    shadowed: CandelaProcess, upstream: FakeUpstream
) -> None:
    assert chat(shadowed, BOB_KEY, model="gpt-4o") == 200
    looser = {**CANDIDATE, "governance": {"models": {"mode": "blocklist", "blocked": ["o1*"]}}}
    (shadowed.tmp / "candidate.yaml").write_text(yaml.safe_dump(looser))
    assert shadowed.proc is not None
    shadowed.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT_S
    while not query_entries(shadowed.tmp / "audit.db", action="config_reload", limit=1):
        assert time.monotonic() < deadline, shadowed.log()
        time.sleep(0.05)
    assert chat(shadowed, BOB_KEY, model="gpt-4o") == 200
    assert [s[2]["decision"] for s in shadows(shadowed, 2)] == ["denied", "allowed"]  # type: ignore[index]
    # a candidate that stops being valid is refused at the reload, the running one stays
    (shadowed.tmp / "candidate.yaml").write_text("users: {alice: {daily_budget_usd: -1}}\n")
    shadowed.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT_S
    while len(query_entries(shadowed.tmp / "audit.db", action="config_reload", limit=5)) < 2:
        assert time.monotonic() < deadline, shadowed.log()
        time.sleep(0.05)
    refused = query_entries(shadowed.tmp / "audit.db", action="config_reload", limit=1)[0]
    assert refused["fields"]["result"] == "refused"
    assert "users.alice.daily_budget_usd" in refused["fields"]["reason"]
    assert chat(shadowed, BOB_KEY, model="gpt-4o") == 200
    assert shadows(shadowed, 3)[-1][2]["decision"] == "allowed"  # type: ignore[index]
