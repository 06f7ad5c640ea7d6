"""Async jobs end to end: charged their reservation when created, read only by their creator, and
trued up to their real cost exactly once when their result is read through Candela."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from candela_mitm.audit.query import query_entries
from candela_mitm.config import parse_config
from candela_mitm.governance.estimate import estimate_cost
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage
from tests.fakes.candela import CandelaProcess
from tests.fakes.upstream import FakeUpstream
from tests.wait import WAIT_S

from .conftest import ADMIN_KEY, ALICE_KEY, BOB_KEY, base_config, candela_env, sdk_json

pytestmark = pytest.mark.e2e
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
BOB = {"Authorization": f"Bearer {BOB_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PRICES = PricingTable.from_config(parse_config({}))
MODEL = "gpt-4o-mini"
BLOCKED = "claude-opus-4-1"


def cost(usage: Usage, model: str = MODEL) -> float:
    price = PRICES.get(model)
    assert price is not None
    return price.cost(usage)


def reservation(body: dict[str, Any]) -> float:
    price = PRICES.get(body["model"])
    assert price is not None
    return estimate_cost(body, body.get("max_output_tokens"), 4096, price)


def spent(c: CandelaProcess, headers: dict[str, str] = ALICE) -> float:
    me = requests.get(c.url + "/admin/v1/me", headers=headers, timeout=10)
    assert me.status_code == 200, me.text
    return float(me.json()["spent_today_usd"])


def true_ups(*procs: CandelaProcess, job_id: str) -> list[dict[str, Any]]:
    out = []
    for c in procs:
        for e in query_entries(c.tmp / "audit.db", action="llm_request", limit=1000):
            f = e["fields"]
            if f.get("reason") == "job_true_up" and f.get("job_id") == job_id:
                out.append(dict(f))
    return out


def wait_true_ups(*procs: CandelaProcess, job_id: str, n: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = true_ups(*procs, job_id=job_id)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def jobs(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
    token_server: Any,
) -> Iterator[tuple[CandelaProcess, CandelaProcess]]:
    """Two candela-server processes on one state store (two workers on one SQLite file, or two
    hosts on one Redis), each with its own audit log, async jobs reserved."""
    tmp = tmp_path_factory.mktemp("jobs")
    tmp_b = tmp_path_factory.mktemp("jobs-b")
    state: dict[str, Any] = {"sqlite_path": str(tmp / "state.db")}
    if request.param == "redis":
        import redis

        # the session's server, a database of this module's own (Candela's default key prefix)
        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/9"
        redis.Redis.from_url(url).flushdb()
        state = {"backend": "redis", "redis_url": url}
    governance = {
        "async_jobs": "reserve",
        "budgets": {"default_daily_usd": 1000.0},
        "models": {"mode": "blocklist", "blocked": [BLOCKED]},
    }
    cfg = base_config(upstream.url, governance=governance, state=state)
    env = candela_env(token_server, tmp)
    with CandelaProcess(tmp, cfg, env=env) as a, CandelaProcess(tmp_b, cfg, env=env) as b:
        yield a, b


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeUpstream) -> Iterator[None]:
    upstream.reset()
    upstream.clear()
    yield
    upstream.reset()


def create_background(c: CandelaProcess, body: dict[str, Any], headers: dict[str, str] = ALICE) -> str:
    r = requests.post(c.url + "/proxy/openai/v1/responses", json=body, headers=headers, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued" and r.json()["usage"] is None
    return str(r.json()["id"])


def test_sdk_background_response_is_charged_its_reservation_then_trued_up_on_retrieve(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream, sdk: None
) -> None:
    a, _ = jobs
    real = Usage(input_tokens=300, output_tokens=40)
    upstream.configure(usage=real)
    body = {"model": MODEL, "input": "summarise the plan", "background": True, "max_output_tokens": 2000}
    before = spent(a)
    out = sdk_json(f"""
        import json, openai
        c = openai.OpenAI(base_url="{a.url}/proxy/openai/v1", api_key="{ALICE_KEY}", max_retries=0)
        r = c.responses.create(model="{MODEL}", input="summarise the plan", background=True,
                               max_output_tokens=2000)
        print(json.dumps({{"id": r.id, "status": r.status}}))
        import urllib.request
        req = urllib.request.Request("{a.url}/admin/v1/me", headers={{"Authorization": "Bearer {ALICE_KEY}"}})
        print(urllib.request.urlopen(req).read().decode())
        done = c.responses.retrieve(r.id)
        print(json.dumps({{"status": done.status, "usage": [done.usage.input_tokens, done.usage.output_tokens],
                          "text": done.output_text}}))
    """)
    created, me_between, done = out
    assert created["status"] == "queued"
    # created: charged its reservation (the queued answer has no usage)
    assert me_between["spent_today_usd"] - before == pytest.approx(reservation(body), abs=1e-6)
    # read: trued up to the real cost of the usage the result reports (a refund here)
    assert done == {"status": "completed", "usage": [300, 40], "text": upstream.reply_text}
    assert cost(real) < reservation(body)
    (entry,) = wait_true_ups(a, job_id=created["id"])
    assert spent(a) - before == pytest.approx(cost(real), abs=1e-6)
    assert entry["usage_source"] == "reported" and entry["user_id"] == "alice@example.com"
    assert entry["operation"] == "responses.retrieve" and entry["path"] == f"/v1/responses/{created['id']}"
    assert entry["job_cost_usd"] == pytest.approx(cost(real), abs=1e-9)
    assert entry["job_charged_usd"] == pytest.approx(reservation(body), abs=1e-9)
    assert entry["cost_usd"] == pytest.approx(cost(real) - reservation(body), abs=1e-9)
    assert (entry["input_tokens"], entry["output_tokens"]) == (300, 40)
    assert [q.route for q in upstream.requests] == ["openai.responses", "openai.responses.retrieve"]


def test_a_result_costing_more_than_reserved_is_charged_the_extra(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream
) -> None:
    a, _ = jobs
    body = {"model": MODEL, "input": "hi", "background": True, "max_output_tokens": 16}
    created = requests.post(a.url + "/proxy/openai/v1/responses", json=body, headers=ALICE, timeout=20)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    before = spent(a)
    real = Usage(input_tokens=20_000, output_tokens=30_000)  # far past what was reserved
    with upstream._lock:
        upstream.objects[job_id]["usage"]["input_tokens"] = real.input_tokens
        upstream.objects[job_id]["usage"]["output_tokens"] = real.output_tokens
        upstream.objects[job_id]["usage"]["total_tokens"] = real.total_tokens
    r = requests.get(a.url + f"/proxy/openai/v1/responses/{job_id}", headers=ALICE, timeout=20)
    assert r.status_code == 200 and r.json()["status"] == "completed"
    (entry,) = wait_true_ups(a, job_id=job_id)
    # it settles the creating request (its span), brought by the read (named apart)
    assert entry["span_id"] == created.headers["X-Candela-Span-Id"]
    assert entry["read_span_id"] == r.headers["X-Candela-Span-Id"]
    assert cost(real) > reservation(body)
    assert spent(a) - before == pytest.approx(cost(real) - reservation(body), abs=1e-6)
    assert entry["cost_usd"] == pytest.approx(cost(real) - reservation(body), abs=1e-9)


def test_two_concurrent_reads_in_two_processes_true_up_once(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream
) -> None:
    a, b = jobs
    upstream.configure(usage=Usage(input_tokens=50, output_tokens=5))
    body = {"model": MODEL, "input": "hi", "background": True, "max_output_tokens": 1000}
    job_id = create_background(a, body)
    before = spent(a)
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def read(c: CandelaProcess) -> None:
        barrier.wait()
        r = requests.get(c.url + f"/proxy/openai/v1/responses/{job_id}", headers=ALICE, timeout=20)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=read, args=(c,)) for c in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 4
    time.sleep(0.3)  # any second true-up would have been committed by now
    found = wait_true_ups(a, b, job_id=job_id)
    assert len(found) == 1
    real = cost(Usage(50, 5))
    assert spent(a) - before == pytest.approx(real - reservation(body), abs=1e-6)
    # a later read changes nothing either
    r = requests.get(b.url + f"/proxy/openai/v1/responses/{job_id}", headers=ALICE, timeout=20)
    assert r.status_code == 200
    assert len(true_ups(a, b, job_id=job_id)) == 1
    assert spent(a) - before == pytest.approx(real - reservation(body), abs=1e-6)


def test_another_users_read_is_403_with_nothing_forwarded(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream
) -> None:
    a, b = jobs
    body = {"model": MODEL, "input": "hi", "background": True, "max_output_tokens": 100}
    job_id = create_background(a, body)
    upstream.clear()
    for c in (a, b):
        r = requests.get(c.url + f"/proxy/openai/v1/responses/{job_id}", headers=BOB, timeout=20)
        assert r.status_code == 403
        assert r.json() == {
            "error": "job_not_owned",
            "message": r.json()["message"],
            "provider": "openai",
            "job_id": job_id,
        }
    # a job Candela never saw created is nobody's to read through Candela
    r = requests.get(a.url + "/proxy/openai/v1/responses/resp_made_elsewhere", headers=ALICE, timeout=20)
    assert r.status_code == 403 and r.json()["error"] == "job_not_owned"
    assert upstream.requests == []
    assert true_ups(a, b, job_id=job_id) == []
    # an admin may read it (and its read trues it up, on alice's spend)
    before = spent(a)
    r = requests.get(a.url + f"/proxy/openai/v1/responses/{job_id}", headers=ADMIN, timeout=20)
    assert r.status_code == 200
    (entry,) = wait_true_ups(a, job_id=job_id)
    assert entry["user_id"] == "alice@example.com" and entry["read_by"] == "admin@example.com"
    assert spent(a) < before


def test_a_job_never_read_stays_charged_its_reservation(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream
) -> None:
    a, _ = jobs
    before = spent(a)
    body = {"model": MODEL, "input": "hi", "background": True, "max_output_tokens": 700}
    job_id = create_background(a, body)
    assert spent(a) - before == pytest.approx(reservation(body), abs=1e-6)
    assert true_ups(a, job_id=job_id) == []


def test_assistants_run_is_trued_up_when_its_run_is_retrieved(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream, sdk: None
) -> None:
    a, _ = jobs
    upstream.configure(usage=Usage(input_tokens=80, output_tokens=9))
    before = spent(a)
    out = sdk_json(f"""
        import json, warnings, openai
        warnings.simplefilter("ignore")
        c = openai.OpenAI(base_url="{a.url}/proxy/openai/v1", api_key="{ALICE_KEY}", max_retries=0)
        run = c.beta.threads.runs.create(thread_id="thread_1", assistant_id="asst_1", model="{MODEL}",
                                         max_completion_tokens=500)
        done = c.beta.threads.runs.retrieve(run.id, thread_id="thread_1")
        print(json.dumps({{"id": run.id, "created": run.status, "status": done.status,
                          "usage": [done.usage.prompt_tokens, done.usage.completion_tokens]}}))
    """)
    (run,) = out
    assert run["created"] == "queued" and run["status"] == "completed" and run["usage"] == [80, 9]
    (entry,) = wait_true_ups(a, job_id=run["id"])
    assert entry["operation"] == "assistants.runs.retrieve"
    assert spent(a) - before == pytest.approx(cost(Usage(80, 9)), abs=1e-6)


def test_sdk_gemini_batch_is_trued_up_at_the_batch_price_when_it_is_got(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream, sdk: None
) -> None:
    a, _ = jobs
    per_request = Usage(input_tokens=400, output_tokens=100)
    upstream.configure(usage=per_request)
    before = spent(a)
    out = sdk_json(f"""
        import json, urllib.request
        from google import genai
        g = genai.Client(api_key="{ALICE_KEY}", http_options={{"base_url": "{a.url}/proxy/google"}})
        src = [{{"contents": [{{"parts": [{{"text": "one"}}], "role": "user"}}]}},
               {{"contents": [{{"parts": [{{"text": "two"}}], "role": "user"}}]}}]
        job = g.batches.create(model="gemini-2.5-flash", src=src)
        req = urllib.request.Request("{a.url}/admin/v1/me", headers={{"Authorization": "Bearer {ALICE_KEY}"}})
        me = json.loads(urllib.request.urlopen(req).read())
        done = g.batches.get(name=job.name)
        print(json.dumps({{"name": job.name, "created": str(job.state), "state": str(done.state),
                          "spent": me["spent_today_usd"],
                          "n": len(done.dest.inlined_responses)}}))
    """)
    (b,) = out
    assert b["created"].endswith("PENDING") and b["state"].endswith("SUCCEEDED") and b["n"] == 2
    charged = b["spent"] - before
    assert charged > 0  # created: charged its reservation
    job_id = b["name"].removeprefix("batches/")
    (entry,) = wait_true_ups(a, job_id=job_id)
    price = PRICES.get("gemini-2.5-flash")
    assert price is not None and price.batch_priced()
    total = Usage(800, 200)
    real = price.cost(total, processing="batch")
    assert real == pytest.approx(price.cost(total) / 2)  # Google's batch price: half the list's
    assert entry["job_cost_usd"] == pytest.approx(real, abs=1e-9)
    assert (entry["input_tokens"], entry["output_tokens"]) == (800, 200)
    assert entry["operation"] == "batches.get" and entry["provider"] == "google"
    assert spent(a) - before == pytest.approx(real, abs=1e-6)
    assert [q.route for q in upstream.requests] == ["gemini.batch", "gemini.batch.get"]


def _batch_request(custom_id: str, model: str, max_tokens: int) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": {"model": model, "max_tokens": max_tokens,
                                               "messages": [{"role": "user", "content": "hi"}]}}


def test_sdk_anthropic_batch_reserved_at_the_batch_price_and_trued_up_from_its_results(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream, sdk: None
) -> None:
    from candela_mitm.governance.estimate import estimate_batch_cost

    a, _ = jobs
    per_request = Usage(input_tokens=120, output_tokens=30)
    upstream.configure(usage=per_request)
    requests_ = [_batch_request("a", "claude-sonnet-4-5", 1000), _batch_request("b", "claude-haiku-4-5", 300)]
    before = spent(a)
    out = sdk_json(f"""
        import json, urllib.request, anthropic
        c = anthropic.Anthropic(base_url="{a.url}/proxy/anthropic-direct", api_key="{ALICE_KEY}", max_retries=0)
        b = c.messages.batches.create(requests={requests_!r})
        req = urllib.request.Request("{a.url}/admin/v1/me", headers={{"Authorization": "Bearer {ALICE_KEY}"}})
        me = json.loads(urllib.request.urlopen(req).read())
        got = c.messages.batches.retrieve(b.id)
        results = [(r.custom_id, r.result.type, r.result.message.usage.input_tokens)
                   for r in c.messages.batches.results(b.id)]
        print(json.dumps({{"id": b.id, "created": b.processing_status, "status": got.processing_status,
                          "results_url": got.results_url, "spent": me["spent_today_usd"],
                          "results": results}}))
    """)
    (b,) = out
    assert b["created"] == "in_progress" and b["status"] == "ended"
    # the results are read through Candela, not fetched around it at the provider
    assert b["results_url"] == f"{a.url}/proxy/anthropic-direct/v1/messages/batches/{b['id']}/results"
    assert sorted(b["results"]) == [["a", "succeeded", 120], ["b", "succeeded", 120]]
    # created: the sum of both requests' most, at Anthropic's batch price
    reserved = estimate_batch_cost([(r["params"]["model"], r["params"]) for r in requests_], 4096, PRICES.get)
    assert b["spent"] - before == pytest.approx(reserved, abs=1e-6)
    (entry,) = wait_true_ups(a, job_id=b["id"])
    sonnet, haiku = PRICES.get("claude-sonnet-4-5"), PRICES.get("claude-haiku-4-5")
    assert sonnet is not None and haiku is not None
    real = sonnet.cost(per_request, processing="batch") + haiku.cost(per_request, processing="batch")
    assert entry["job_cost_usd"] == pytest.approx(real, abs=1e-9)
    assert entry["operation"] == "messages.batches.results" and entry["usage_source"] == "reported"
    assert (entry["input_tokens"], entry["output_tokens"]) == (240, 60)
    assert spent(a) - before == pytest.approx(real, abs=1e-6)
    assert [q.route for q in upstream.requests] == [
        "anthropic.batches", "anthropic.batches.get", "anthropic.batches.get", "anthropic.batches.results"
    ]
    # the results read again: nothing changes
    r = requests.get(a.url + f"/proxy/anthropic-direct/v1/messages/batches/{b['id']}/results", headers=ALICE, timeout=20)
    assert r.status_code == 200 and len(true_ups(a, job_id=b["id"])) == 1
    # bob reads neither the batch nor its results
    upstream.clear()
    for tail in ("", "/results"):
        r = requests.get(a.url + f"/proxy/anthropic-direct/v1/messages/batches/{b['id']}{tail}", headers=BOB, timeout=20)
        assert r.status_code == 403 and r.json()["error"] == "job_not_owned"
    assert upstream.requests == []


def test_an_anthropic_batch_naming_a_denied_model_is_refused_naming_it(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream
) -> None:
    a, _ = jobs
    before = spent(a)
    body = {"requests": [_batch_request("a", "claude-sonnet-4-5", 100), _batch_request("b", BLOCKED, 100),
                         _batch_request("c", "claude-haiku-4-5", 100)]}
    r = requests.post(a.url + "/proxy/anthropic-direct/v1/messages/batches", json=body, headers=ALICE, timeout=20)
    assert r.status_code == 403 and r.json()["error"] == "model_not_allowed"
    assert BLOCKED in r.json()["message"]
    body = {"requests": [_batch_request("a", "claude-sonnet-4-5", 100), _batch_request("b", "house-llm-9", 100)]}
    r = requests.post(a.url + "/proxy/anthropic-direct/v1/messages/batches", json=body, headers=ALICE, timeout=20)
    assert r.status_code == 402 and r.json()["error"] == "model_price_unknown"
    assert "house-llm-9" in r.json()["message"]
    assert upstream.requests == []
    assert spent(a) == pytest.approx(before, abs=1e-9)


def _openai_line(custom_id: str, model: str, max_tokens: int) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": "hello there"}]}}


def test_sdk_openai_batch_from_a_governed_upload_is_reserved_then_trued_up(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream, sdk: None
) -> None:
    from candela_mitm.governance.estimate import estimate_batch_cost

    a, _ = jobs
    per_request = Usage(input_tokens=60, output_tokens=25)
    upstream.configure(usage=per_request)
    lines = [_openai_line("a", MODEL, 400), _openai_line("b", MODEL, 100), _openai_line("c", MODEL, 50)]
    before = spent(a)
    out = sdk_json(f"""
        import json, urllib.request, openai
        c = openai.OpenAI(base_url="{a.url}/proxy/openai/v1", api_key="{ALICE_KEY}", max_retries=0)
        data = "\\n".join(json.dumps(x) for x in {lines!r}).encode()
        f = c.files.create(file=("batch.jsonl", data), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        req = urllib.request.Request("{a.url}/admin/v1/me", headers={{"Authorization": "Bearer {ALICE_KEY}"}})
        me = json.loads(urllib.request.urlopen(req).read())
        got = c.batches.retrieve(b.id)
        content = c.files.content(got.output_file_id).text
        print(json.dumps({{"file": f.id, "id": b.id, "created": b.status, "status": got.status,
                          "spent": me["spent_today_usd"], "out": got.output_file_id,
                          "lines": len(content.splitlines())}}))
    """)
    (b,) = out
    assert b["created"] == "validating" and b["status"] == "completed" and b["lines"] == 3
    price = PRICES.get(MODEL)
    assert price is not None and price.batch_priced()
    # created: the sum of its lines' most, read at the upload, at OpenAI's batch price
    reserved = estimate_batch_cost([(MODEL, x["body"]) for x in lines], 4096, PRICES.get)
    assert b["spent"] - before == pytest.approx(reserved, abs=1e-6)
    (entry,) = wait_true_ups(a, job_id=b["id"])
    total = Usage(per_request.input_tokens * 3, per_request.output_tokens * 3)
    real = price.cost(total, processing="batch")
    assert entry["job_cost_usd"] == pytest.approx(real, abs=1e-9)
    assert entry["operation"] == "batches.retrieve"
    assert spent(a) - before == pytest.approx(real, abs=1e-6)
    # its output file was read too: still one true-up
    assert len(true_ups(a, job_id=b["id"])) == 1
    assert [q.route for q in upstream.requests] == [
        "openai.files", "openai.batches", "openai.batches.retrieve", "openai.files.content"
    ]
    # bob reads neither the batch nor its output, and cannot start a batch from alice's file
    upstream.clear()
    for path in (f"/v1/batches/{b['id']}", f"/v1/files/{b['out']}/content"):
        r = requests.get(a.url + "/proxy/openai" + path, headers=BOB, timeout=20)
        assert r.status_code == 403 and r.json()["error"] == "job_not_owned", path
    r = requests.post(a.url + "/proxy/openai/v1/batches", headers=BOB, timeout=20,
                      json={"input_file_id": b["file"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert r.status_code == 403 and r.json()["error"] == "batch_file_not_governed"
    assert upstream.requests == []


def test_an_openai_batch_needs_an_upload_candela_governed(
    jobs: tuple[CandelaProcess, CandelaProcess], upstream: FakeUpstream
) -> None:
    a, _ = jobs
    before = spent(a)
    r = requests.post(a.url + "/proxy/openai/v1/batches", headers=ALICE, timeout=20,
                      json={"input_file_id": "file-uploaded-elsewhere", "endpoint": "/v1/chat/completions",
                            "completion_window": "24h"})
    assert r.status_code == 403
    assert r.json() == {"error": "batch_file_not_governed", "message": r.json()["message"],
                        "provider": "openai", "file_id": "file-uploaded-elsewhere"}
    # an upload naming a denied model is refused naming it; another purpose is not governed
    lines = [_openai_line("a", MODEL, 10), _openai_line("b", "gpt-4o", 10), _openai_line("c", BLOCKED, 10)]
    data = "\n".join(__import__("json").dumps(x) for x in lines).encode()
    r = requests.post(a.url + "/proxy/openai/v1/files", headers=ALICE, timeout=20,
                      files={"file": ("batch.jsonl", data)}, data={"purpose": "batch"})
    assert r.status_code == 403 and r.json()["error"] == "model_not_allowed" and BLOCKED in r.json()["message"]
    r = requests.post(a.url + "/proxy/openai/v1/files", headers=ALICE, timeout=20,
                      files={"file": ("notes.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert r.status_code == 404 and r.json()["error"] == "endpoint_not_governed"
    r = requests.post(a.url + "/proxy/openai/v1/files", headers=ALICE, timeout=20,
                      files={"file": ("batch.jsonl", b'{"custom_id": "x"}')}, data={"purpose": "batch"})
    assert r.status_code == 400 and "line 1" in r.json()["message"]
    assert upstream.requests == []
    assert spent(a) == pytest.approx(before, abs=1e-9)
