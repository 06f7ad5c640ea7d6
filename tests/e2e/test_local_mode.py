"""Issue 6 end to end: `candela` local mode on its LM Studio-compatible endpoint and /_local/ API."""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import requests

from candela_mitm.audit.query import query_entries
from candela_mitm.config import parse_config
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage
from tests.fakes.candela import CandelaProcess, free_port
from tests.fakes.upstream import FakeUpstream
from tests.wait import WAIT_S, until

from .conftest import ALICE_KEY, base_config, candela_env, sdk_json

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
OS_USER = getpass.getuser()
LOCAL_MODELS = {"llama3.2:3b": "ollama", "qwen3:0.6b": "ollama", "qwen2.5-7b-instruct": "lmstudio"}
DUMMY = {"Authorization": "Bearer lm-studio"}  # what apps written for LM Studio send


def local_config(cloud_url: str, ollama_url: str, lmstudio_url: str, **local: object) -> dict:
    cfg = base_config(cloud_url)
    cfg["providers"]["ollama"] = {"base_url": ollama_url}
    cfg["providers"]["lmstudio"] = {"base_url": lmstudio_url}
    if local:
        cfg["local"] = local
    return cfg


@pytest.fixture(scope="module")
def ollama():
    with FakeUpstream(openai_key=None, models=["llama3.2:3b", "qwen3:0.6b"]) as f:
        yield f


@pytest.fixture(scope="module")
def lmstudio():
    with FakeUpstream(openai_key=None, models=["qwen2.5-7b-instruct"]) as f:
        yield f


@pytest.fixture(scope="module")
def local(tmp_path_factory, upstream, token_server, ollama, lmstudio):
    tmp = tmp_path_factory.mktemp("local")
    cfg = local_config(upstream.url, ollama.url, lmstudio.url)
    with CandelaProcess(tmp, cfg, env=candela_env(token_server, tmp), command="candela") as c:
        yield c


@pytest.fixture(autouse=True)
def _reset(upstream, ollama, lmstudio):
    for f in (upstream, ollama, lmstudio):
        f.reset()
        f.clear()
    yield


_TOKENS: dict[str, str] = {}


def ui_headers(c: CandelaProcess) -> dict[str, str]:
    """What the /_local/ page's script sends with a write: the token the page carries."""
    if c.url not in _TOKENS:
        page = requests.get(f"{c.url}/_local/", timeout=5).text
        m = re.search(r'<meta name="candela-local-token" content="([^"]+)">', page)
        assert m is not None, "the page carries no token"
        _TOKENS[c.url] = m.group(1)
    return {"X-Candela-Local-Token": _TOKENS[c.url]}


def chat(c, body, headers=DUMMY, **kw):
    return requests.post(
        f"{c.url}/v1/chat/completions", json=body, headers=headers, timeout=20, **kw
    )


def span_of(c, span_id: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for s in requests.get(f"{c.url}/_local/api/traces?limit=200", timeout=5).json()["spans"]:
            if s["span_id"] == span_id:
                return s
        time.sleep(0.05)
    raise AssertionError(f"span {span_id} not in the traces")


MSGS = [{"role": "user", "content": "hi"}]


def test_models_merges_local_runtimes_with_priced_cloud_models(local):
    for headers in ({}, DUMMY):
        r = requests.get(f"{local.url}/v1/models", headers=headers, timeout=5)
        assert r.status_code == 200
        data = r.json()["data"]
        got = {m["id"]: m["provider"] for m in data}
        assert {k: got.get(k) for k in LOCAL_MODELS} == LOCAL_MODELS
        assert got["gpt-4o-mini"] == "openai" and got["gemini-2.5-flash"] == "gemini-oai"
        assert got["claude-sonnet-4-0"] == "anthropic"  # Vertex is configured
        priced = {p.model for p in PricingTable.from_config(parse_config({})).models()}
        assert priced <= set(got) and set(got) == priced | set(LOCAL_MODELS)
        assert all(m["object"] == "model" and m["owned_by"] == m["provider"] for m in data)


@pytest.mark.parametrize(
    "model, runtime, stream",
    [
        ("llama3.2:3b", "ollama", False),
        ("llama3.2:3b", "ollama", True),
        ("qwen2.5-7b-instruct", "lmstudio", False),
        ("qwen2.5-7b-instruct", "lmstudio", True),
    ],
)
def test_local_models_go_to_their_runtime_free_and_traced(
    local, upstream, ollama, lmstudio, model, runtime, stream
):
    r = chat(local, {"model": model, "messages": MSGS, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    target, other = (ollama, lmstudio) if runtime == "ollama" else (lmstudio, ollama)
    seen = [q for q in target.requests if q.route == "openai.chat"]
    assert len(seen) == 1 and seen[0].json["model"] == model
    assert "authorization" not in seen[0].headers  # the dummy key never leaves
    assert [q for q in other.requests if q.route == "openai.chat"] == [] and upstream.requests == []
    s = span_of(local, r.headers["x-candela-span-id"])
    assert s["provider"] == runtime and s["model"] == model and s["user"] == OS_USER
    assert s["cost_usd"] == 0.0 and s["status"] == "ok" and s["input_tokens"] == 12
    assert s["output_tokens"] == 7 and s["stream"] is stream


@pytest.mark.parametrize(
    "model, provider, route, stream",
    [
        ("gpt-4o-mini", "openai", "openai.chat", False),
        ("gpt-4o-mini", "openai", "openai.chat", True),
        ("claude-sonnet-4-20250514", "anthropic", "vertex.anthropic", False),
        ("claude-sonnet-4-20250514", "anthropic", "vertex.anthropic", True),
    ],
)
def test_cloud_models_go_to_their_provider_priced(
    local, upstream, ollama, model, provider, route, stream
):
    r = chat(local, {"model": model, "messages": MSGS, "stream": stream, "max_tokens": 50})
    assert r.status_code == 200, r.text
    if stream:
        chunks = [
            json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
        ]
        assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
    else:
        assert r.json()["object"] == "chat.completion"  # Anthropic's answer translated back
        text = r.json()["choices"][0]["message"]["content"]
    assert text == "Hello from the fake upstream."
    assert [q.route.split(".")[0] for q in upstream.requests] == [route.split(".")[0]]
    assert ollama.requests == []
    s = span_of(local, r.headers["x-candela-span-id"])
    assert s["provider"] == provider and s["user"] == OS_USER and s["cost_usd"] > 0


def test_a_candela_key_still_names_the_user_and_foreign_ones_are_ignored(local):
    r = chat(
        local,
        {"model": "llama3.2:3b", "messages": MSGS},
        headers={"Authorization": f"Bearer {ALICE_KEY}"},
    )
    assert span_of(local, r.headers["x-candela-span-id"])["user"] == "alice@example.com"
    r = chat(local, {"model": "llama3.2:3b", "messages": MSGS}, headers={})
    assert span_of(local, r.headers["x-candela-span-id"])["user"] == OS_USER
    r = chat(
        local, {"model": "llama3.2:3b", "messages": MSGS}, headers={"X-Candela-Auth": "Bearer nope"}
    )
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"


def test_an_unknown_model_is_404_and_nothing_is_sent(local, upstream, ollama, lmstudio):
    r = chat(local, {"model": "not-pulled:1b", "messages": MSGS})
    assert r.status_code == 404 and r.json()["error"] == "model_not_found"
    assert upstream.requests == []
    assert not [q for f in (ollama, lmstudio) for q in f.requests if q.route.endswith("chat")]


def test_traces_default_50_max_200_in_the_001_shape(local):
    for _ in range(3):
        assert chat(local, {"model": "llama3.2:3b", "messages": MSGS}).status_code == 200
    body = requests.get(f"{local.url}/_local/api/traces?limit=2", timeout=5).json()
    assert body["count"] == 2 and len(body["spans"]) == 2
    s = body["spans"][0]
    assert {
        "span_id",
        "model",
        "provider",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cost_usd",
        "duration_ms",
        "status",
        "timestamp",
    } <= set(s)
    assert s["timestamp"].endswith("Z")
    many = requests.get(f"{local.url}/_local/api/traces", timeout=5).json()
    assert many["count"] == len(many["spans"]) <= 50
    assert (
        requests.get(f"{local.url}/_local/api/traces?limit=5000", timeout=5).json()["count"] <= 200
    )


def test_health_reports_the_runtime(local, ollama):
    h = requests.get(f"{local.url}/_local/api/health", timeout=10).json()
    assert h["status"] == "ok" and h["runtime"] == "ollama" and h["reachable"] is True
    assert h["version"] == "0.6.0" and h["base_url"] == ollama.url
    assert h["models"] == ["llama3.2:3b", "qwen3:0.6b"]
    assert {r["name"]: r["reachable"] for r in h["runtimes"]} == {"ollama": True, "lmstudio": True}
    assert h["process"]["managed"] is False


def test_pull_streams_ollama_progress_back_as_it_comes(local, ollama):
    ollama.configure(n_chunks=4, chunk_delay_s=0.3)
    t0 = time.monotonic()
    arrivals = []
    with requests.post(
        f"{local.url}/_local/api/pull",
        json={"model": "phi4:14b"},
        headers=ui_headers(local),
        stream=True,
        timeout=20,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        for line in r.iter_lines():
            if line:
                arrivals.append((time.monotonic() - t0, json.loads(line)))
    assert arrivals[-1][1] == {"status": "success"}
    done = [m["completed"] for _, m in arrivals if "completed" in m]
    assert done == [0, 1024, 2048, 3072, 4096]
    # streamed: the first progress came long before the last
    assert arrivals[-1][0] - arrivals[0][0] >= 1.0
    pulls = [q for q in ollama.requests if q.route == "ollama.pull"]
    assert len(pulls) == 1 and pulls[0].json == {"model": "phi4:14b", "stream": True}
    # queued by the writer thread when the pull was planned (not durable before the answer)
    entries = until(lambda: query_entries(local.tmp / "audit.db", action="local_pull", limit=10),
                    what="the local_pull entry")
    assert entries and entries[0]["fields"]["model"] == "phi4:14b"


@pytest.mark.parametrize("body", [{}, {"model": ""}, {"model": 5}, [1]])
def test_pull_needs_a_model(local, ollama, body):
    r = requests.post(
        f"{local.url}/_local/api/pull", json=body, headers=ui_headers(local), timeout=5
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert [q for q in ollama.requests if q.route == "ollama.pull"] == []


def test_config_is_validated_persisted_and_audited(local):
    url = f"{local.url}/_local/api/config"
    before = requests.get(url, timeout=5).json()
    assert set(before) == {"cache_ttl_s", "gemini_cache_price_multiplier"}
    h = ui_headers(local)
    r = requests.post(url, json={"cache_ttl_s": 120}, headers=h, timeout=5)
    assert r.status_code == 200 and r.json()["cache_ttl_s"] == 120
    assert requests.get(url, timeout=5).json()["cache_ttl_s"] == 120
    saved = json.loads((local.tmp / "local-settings.json").read_text())
    assert saved["cache_ttl_s"] == 120
    entry = query_entries(local.tmp / "audit.db", action="local_config_change", limit=1)[0]
    assert entry["fields"]["actor"] == OS_USER
    assert entry["fields"]["before"]["cache_ttl_s"] == before["cache_ttl_s"]
    assert entry["fields"]["after"]["cache_ttl_s"] == 120
    for bad in (
        {"cache_ttl_s": -1},
        {"gemini_cache_price_multiplier": 2},
        {"runtime_command": ["id"]},
    ):
        r = requests.post(url, json=bad, headers=h, timeout=5)
        assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = requests.post(
        url, json={"cache_ttl_s": 1}, headers={**h, "Origin": "http://evil.example"}, timeout=5
    )
    assert r.status_code == 403
    assert requests.get(url, timeout=5).json()["cache_ttl_s"] == 120
    assert requests.post(url, json={"cache_ttl_s": 1}, timeout=5).status_code == 403  # no token
    assert requests.get(url, timeout=5).json()["cache_ttl_s"] == 120
    assert requests.post(url, json=before, headers=h, timeout=5).status_code == 200


@pytest.mark.parametrize("multiplier", [0.5, 0.1])
def test_gemini_cached_input_is_priced_with_the_configured_multiplier(local, upstream, multiplier):
    assert (
        requests.post(
            f"{local.url}/_local/api/config",
            headers=ui_headers(local),
            timeout=5,
            json={"gemini_cache_price_multiplier": multiplier},
        ).status_code
        == 200
    )
    upstream.configure(usage=Usage(input_tokens=10_000, output_tokens=1_000, cached_tokens=8_000))
    r = chat(local, {"model": "gemini-2.5-flash", "messages": MSGS})
    assert r.status_code == 200, r.text
    p = PricingTable.from_config(parse_config({})).get("gemini-2.5-flash")
    expected = (2_000 * p.input + 8_000 * p.input * multiplier + 1_000 * p.output) / 1e6
    s = span_of(local, r.headers["x-candela-span-id"])
    assert s["provider"] == "gemini-oai" and s["cached_tokens"] == 8_000
    assert s["cost_usd"] == pytest.approx(expected)


def steady_spend(local) -> dict:
    """/_local/api/spend once no earlier request's spend is still to be recorded: a request
    carved from a budget slice (an idle user keeps one idle_s, 30 s) has its spend recorded up
    to record_ms (1 s) and a flush after its answer; read until it stays put that long."""
    def read() -> dict:
        return requests.get(f"{local.url}/_local/api/spend", timeout=5).json()

    deadline = time.monotonic() + WAIT_S
    last = read()
    while True:
        time.sleep(1.5)
        now = read()
        if now["spent_usd"] == last["spent_usd"]:
            return now
        assert time.monotonic() < deadline, "the spend never settled"
        last = now


def test_spend_is_todays_against_the_budget_with_hours(local, upstream):
    before = steady_spend(local)
    upstream.configure(usage=Usage(input_tokens=100_000, output_tokens=10_000))
    assert chat(local, {"model": "gpt-4o-mini", "messages": MSGS}).status_code == 200
    cost = (100_000 * 0.15 + 10_000 * 0.60) / 1e6
    # the spend is recorded after the request's entry: with budget slices (on by default) by
    # governance.budgets.slices.record_ms (a slice in use) when its hold was carved
    deadline = time.monotonic() + WAIT_S
    while True:
        after = requests.get(f"{local.url}/_local/api/spend", timeout=5).json()
        if after["spent_usd"] - before["spent_usd"] >= cost * 0.999:
            break
        assert time.monotonic() < deadline, "the spend was never recorded"
        time.sleep(0.05)
    assert after["user"] == OS_USER and after["budget_usd"] == 1000.0
    assert after["spent_usd"] - before["spent_usd"] == pytest.approx(cost)
    assert len(after["hourly_usd"]) == 24
    assert sum(after["hourly_usd"]) - sum(before["hourly_usd"]) == pytest.approx(cost)


def test_the_page_and_its_assets_are_served(local):
    r = requests.get(f"{local.url}/_local/", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    for name, ctype in (("local.js", "text/javascript"), ("local.css", "text/css")):
        a = requests.get(f"{local.url}/_local/static/{name}", timeout=5)
        assert a.status_code == 200 and a.headers["content-type"].startswith(ctype)
        assert f"/_local/static/{name}" in r.text
    assert requests.get(f"{local.url}/_local/static/../../etc/passwd", timeout=5).status_code == 404
    assert requests.get(f"{local.url}/_local/nope", timeout=5).status_code == 404
    health = f"{local.url}/_local/api/health"
    assert requests.post(health, headers=ui_headers(local), timeout=5).status_code == 405


# A stand-in for `ollama serve`: the fake Ollama API where OLLAMA_HOST says, until signalled.
FAKE_SERVE = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
from tests.fakes.upstream import FakeUpstream
host, port = os.environ["OLLAMA_HOST"].rsplit(":", 1)
FakeUpstream(host=host, port=int(port), openai_key=None, models=["started:1b"]).start()
time.sleep(3600)
"""


def test_start_and_stop_the_runtime_backend(tmp_path, upstream, token_server, lmstudio):
    ollama_url = f"http://127.0.0.1:{free_port()}"
    cfg = local_config(
        upstream.url, ollama_url, lmstudio.url, runtime_command=[sys.executable, "-c", FAKE_SERVE]
    )
    with CandelaProcess(
        tmp_path, cfg, env=candela_env(token_server, tmp_path), command="candela"
    ) as c:
        h = requests.get(f"{c.url}/_local/api/health", timeout=10).json()
        assert h["reachable"] is False and h["status"] == "unreachable"
        assert chat(c, {"model": "started:1b", "messages": MSGS}).status_code == 404
        r = requests.post(f"{c.url}/_local/api/start", headers=ui_headers(c), timeout=30)
        assert (
            r.status_code == 200 and r.json()["started"] is True and r.json()["reachable"] is True
        )
        pid = r.json()["process"]["pid"]
        h = requests.get(f"{c.url}/_local/api/health", timeout=10).json()
        assert h["reachable"] is True and h["models"] == ["started:1b"]
        assert h["process"] == {
            "managed": True,
            "running": True,
            "pid": pid,
            "exit_code": None,
            "command": [sys.executable, "-c", FAKE_SERVE],
        }
        r = chat(c, {"model": "started:1b", "messages": MSGS})
        assert r.status_code == 200, r.text
        r = requests.post(f"{c.url}/_local/api/stop", headers=ui_headers(c), timeout=30)
        assert r.status_code == 200 and r.json()["stopped"] is True and r.json()["pid"] == pid
        assert requests.get(f"{c.url}/_local/api/health", timeout=10).json()["reachable"] is False
        # started again, then left running: stopping Candela stops it too
        started = requests.post(f"{c.url}/_local/api/start", headers=ui_headers(c), timeout=30)
        pid = started.json()["process"]["pid"]
        # queued just before each answer, committed by the writer thread: waited for
        actions = until(lambda: {e["action"] for e in query_entries(c.tmp / "audit.db", limit=100)},
                        lambda got: {"local_runtime_start", "local_runtime_stop"} <= got,
                        what="local_runtime_start and local_runtime_stop entries")
        assert {"local_runtime_start", "local_runtime_stop"} <= actions
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    assert not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.sdk
@pytest.mark.usefixtures("sdk")
def test_openai_sdk_lists_and_chats_local_and_cloud(local, upstream, ollama):
    out = sdk_json(f"""
        import json, openai
        c = openai.OpenAI(base_url="{local.url}/v1", api_key="lm-studio", max_retries=0)
        print(json.dumps({{"models": {{m.id: m.model_dump().get("provider") for m in c.models.list()}}}}))
        msgs = [{{"role": "user", "content": "hi"}}]
        for model in ("llama3.2:3b", "qwen2.5-7b-instruct", "gpt-4o-mini", "claude-sonnet-4-20250514"):
            r = c.chat.completions.create(model=model, messages=msgs, max_tokens=20)
            text = "".join(
                (ch.choices[0].delta.content or "") if ch.choices else ""
                for ch in c.chat.completions.create(model=model, messages=msgs, max_tokens=20, stream=True)
            )
            print(json.dumps({{"model": model, "text": r.choices[0].message.content, "stream": text,
                               "usage": r.usage.total_tokens}}))
    """)
    models = out[0]["models"]
    assert {k: models.get(k) for k in LOCAL_MODELS} == LOCAL_MODELS
    assert models["gpt-4o-mini"] == "openai" and models["claude-sonnet-4-0"] == "anthropic"
    for row in out[1:]:
        assert row["text"] == row["stream"] == "Hello from the fake upstream.", row
        assert row["usage"] == 19
    assert len(out) == 5
    assert len([q for q in ollama.requests if q.route == "openai.chat"]) == 2


@pytest.mark.parametrize(
    "host",
    ["evil.example:{port}", "evil.example", "127.0.0.1.nip.io:{port}", "localhost:1", "[::2]:{port}"],
)
def test_a_page_behind_another_name_is_refused(local, upstream, host):
    """DNS rebinding: a hostile name resolving to 127.0.0.1 still sends its own Host."""
    port = local.url.rsplit(":", 1)[1]
    r = requests.post(
        f"{local.url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MSGS},
        headers={"Host": host.format(port=port)},
        timeout=5,
    )
    assert r.status_code == 403 and r.json()["error"] == "host_not_allowed"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_bodies_a_page_can_send_cross_site_are_415(local, upstream, ctype):
    body = json.dumps({"model": "gpt-4o-mini", "messages": MSGS}).encode()
    headers = {"Content-Type": ctype} if ctype else {}
    r = requests.post(f"{local.url}/v1/chat/completions", data=body, headers=headers, timeout=5)
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    assert upstream.requests == []


def test_the_token_is_the_installs_own(local):
    page = requests.get(f"{local.url}/_local/", timeout=5).text
    token_file = local.tmp / "local-ui.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip() in page


def test_another_local_users_programs_are_refused(local, upstream):
    """The connecting program's owner comes from the kernel's socket table: as root, run curl as
    `nobody` against the laptop proxy; Candela's own user (root here) is served."""
    import pwd
    import subprocess

    if os.geteuid() != 0:
        from tests.required import require

        require("root, to run a client as another user")
    nobody = pwd.getpwnam("nobody").pw_uid
    url = f"{local.url}/v1/chat/completions"
    body = json.dumps({"model": "gpt-4o-mini", "messages": MSGS})
    cmd = ["curl", "-s", "-H", "Content-Type: application/json", "-d", body, url]
    r = subprocess.run(cmd, user=nobody, capture_output=True, text=True, timeout=20)
    answer = json.loads(r.stdout)
    assert answer["error"] == "forbidden" and f"uid {nobody}" in answer["message"]
    assert upstream.requests == []
    mine = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert json.loads(mine.stdout)["object"] == "chat.completion"
