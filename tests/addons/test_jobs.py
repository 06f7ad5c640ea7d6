"""Jobs addon: a job's result only for its creator (or an admin), a batch's every model checked,
the Message Batch results_url pointed back through Candela."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.jobs import Jobs, point_results_here
from candela_mitm.addons.modelpolicy import ModelPolicy
from candela_mitm.addons.router import Router
from candela_mitm.governance.ledger import Reservation

from .conftest import ALICE_KEY, ALICE_SHA, audit_entries, make_flow, run_hooks

BOB_KEY = "cdl_bob_key_for_jobs"
ADMIN_KEY = "cdl_admin_key_for_jobs"


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


CFG = {
    "providers": {
        "openai": {"base_url": "http://upstream.test:8080"},
        "anthropic-direct": {"base_url": "http://upstream.test:8080"},
    },
    "auth": {
        "api_keys": [
            {"sha256": ALICE_SHA, "user": "alice@example.com"},
            {"sha256": _sha(BOB_KEY), "user": "bob@example.com"},
            {"sha256": _sha(ADMIN_KEY), "user": "admin@example.com"},
        ],
        "admins": ["admin@example.com"],
    },
    "users": {"alice@example.com": {"tenants": ["research-team"]}},
    "governance": {"async_jobs": "reserve", "models": {"blocked": ["claude-opus-4-1"]}},
}


def ask(rt, path, key, body=None, method="GET"):
    flow = make_flow(path, body, method=method,
                     headers={"Authorization": f"Bearer {key}", "Host": "127.0.0.1:8181"})
    addons = [Router(rt), Auth(rt), ModelPolicy(rt), Jobs(rt)]
    asyncio.run(run_hooks(addons, flow, "requestheaders", "request"))
    return flow


def alices_job(rt, job_id="resp_1"):
    res = rt.ledger.reserve("alice@example.com", "research-team", 1.0, 100.0, "span-1",
                            model="gpt-4o", provider="openai")
    assert isinstance(res, Reservation)
    assert rt.ledger.record_job(res, "openai", job_id, "gpt-4o", 1.0, 10, 0)


@pytest.mark.parametrize(
    "key, job_id, status",
    [
        (ALICE_KEY, "resp_1", None),  # its creator: passes on to Upstream
        (ADMIN_KEY, "resp_1", None),  # an admin too
        (BOB_KEY, "resp_1", 403),  # anyone else: refused
        (ALICE_KEY, "resp_elsewhere", 403),  # a job Candela never saw created: nobody's
    ],
)
def test_a_jobs_result_is_for_its_creator_or_an_admin(tctx, runtime, key, job_id, status):
    rt = runtime(CFG)
    alices_job(rt)
    flow = ask(rt, f"/proxy/openai/v1/responses/{job_id}", key)
    c = ctx_of(flow)
    if status is None:
        assert flow.response is None
        assert c.job is not None and c.job.user_id == "alice@example.com"
        assert c.client_host == "127.0.0.1:8181"
    else:
        assert flow.response.status_code == status
        assert flow.response.json() == {
            "error": "job_not_owned",
            "message": flow.response.json()["message"],
            "provider": "openai",
            "job_id": job_id,
        }
        assert c.job is None


def _batch(*models):
    return {"requests": [
        {"custom_id": str(i), "params": {"model": m, "max_tokens": 10,
                                         "messages": [{"role": "user", "content": "hi"}]}}
        for i, m in enumerate(models)
    ]}


def test_every_model_of_a_batch_passes_the_policy_the_first_denied_is_named(tctx, runtime):
    rt = runtime(CFG)
    body = _batch("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1", "claude-sonnet-4-5")
    flow = ask(rt, "/proxy/anthropic-direct/v1/messages/batches", ALICE_KEY, body, "POST")
    assert flow.response.status_code == 403
    assert flow.response.json()["error"] == "model_not_allowed"
    assert "claude-opus-4-1" in flow.response.json()["message"]
    decisions = [(e["model"], e["result"]) for e in audit_entries(rt, "model_policy_check")]
    # each distinct model once, in the batch's order, up to the first denied
    assert decisions == [
        ("claude-sonnet-4-5", "allowed"), ("claude-haiku-4-5", "allowed"),
        ("claude-opus-4-1", "denied"),
    ]


def test_a_batch_naming_a_model_without_a_price_is_402(tctx, runtime):
    rt = runtime(CFG)
    flow = ask(rt, "/proxy/anthropic-direct/v1/messages/batches", ALICE_KEY,
               _batch("claude-sonnet-4-5", "house-llm"), "POST")
    assert flow.response.status_code == 402
    assert flow.response.json()["error"] == "model_price_unknown"


def test_an_allowed_batch_passes(tctx, runtime):
    rt = runtime(CFG)
    flow = ask(rt, "/proxy/anthropic-direct/v1/messages/batches", ALICE_KEY,
               _batch("claude-sonnet-4-5", "claude-haiku-4-5"), "POST")
    assert flow.response is None
    assert [m for m, _ in ctx_of(flow).plan.batch] == ["claude-sonnet-4-5", "claude-haiku-4-5"]


@pytest.mark.parametrize(
    "results_url, expected",
    [
        ("https://api.anthropic.com/v1/messages/batches/msgbatch_1/results",
         "http://candela.test:8080/proxy/anthropic-direct/v1/messages/batches/msgbatch_1/results"),
        # another batch's results, or a shape Candela does not know: left alone
        ("https://api.anthropic.com/v1/messages/batches/msgbatch_2/results",
         "https://api.anthropic.com/v1/messages/batches/msgbatch_2/results"),
        ("https://files.example/x.jsonl", "https://files.example/x.jsonl"),
        (None, None),
    ],
)
def test_a_batchs_results_url_is_pointed_back_through_candela(tctx, runtime, results_url, expected):
    rt = runtime(CFG)
    res = rt.ledger.reserve("alice@example.com", None, 1.0, 100.0, "s", model="claude-sonnet-4-5",
                            provider="anthropic-direct")
    assert rt.ledger.record_job(res, "anthropic-direct", "msgbatch_1", "claude-sonnet-4-5", 1.0, 1, 0)
    flow = ask(rt, "/proxy/anthropic-direct/v1/messages/batches/msgbatch_1", ALICE_KEY)
    c = ctx_of(flow)
    c.client_host = "candela.test:8080"
    flow.client_conn.timestamp_tls_setup = None  # the client spoke plain HTTP to Candela
    resp = http.Response.make(200, json.dumps({"id": "msgbatch_1", "results_url": results_url}),
                              {"content-type": "application/json"})
    point_results_here(flow, c, resp)
    assert resp.json()["results_url"] == expected


def _planned(rt, path, key, body=None, method="POST", raw=None, headers=()):
    flow = make_flow(path, body, method=method, raw=raw,
                     headers={"Authorization": f"Bearer {key}", "Host": "127.0.0.1:8181",
                              **dict(headers)})
    asyncio.run(run_hooks([Router(rt), Auth(rt), ModelPolicy(rt)], flow, "requestheaders",
                          "request"))
    assert flow.response is None and ctx_of(flow).plan is not None
    return flow


def test_jobs_request_makes_a_coroutine_only_for_a_plan_it_checks(tctx, runtime):
    """Jobs.request is gated (only_when): a chat gets no coroutine, and each plan it has a check
    for (a batch, a batch's input upload, a batch naming its file, a job's result) gets one."""
    from urllib3 import encode_multipart_formdata

    rt = runtime(CFG)
    alices_job(rt)
    upload, ctype = encode_multipart_formdata(
        {"purpose": "batch", "file": ("batch.jsonl", b'{"custom_id": "a"}')})
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    checked = {
        "batch": _planned(rt, "/proxy/anthropic-direct/v1/messages/batches", ALICE_KEY,
                          _batch("claude-sonnet-4-5")),
        "upload": _planned(rt, "/proxy/openai/v1/files", ALICE_KEY, raw=upload,
                           headers={"Content-Type": ctype}),
        "batch file": _planned(rt, "/proxy/openai/v1/batches", ALICE_KEY,
                               {"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                                "completion_window": "24h"}),
        "result": _planned(rt, "/proxy/openai/v1/responses/resp_1", ALICE_KEY, method="GET"),
    }
    jobs = Jobs(rt)
    assert jobs.request(_planned(rt, "/proxy/openai/v1/chat/completions", ALICE_KEY, chat)) is None
    for kind, flow in checked.items():
        work = jobs.request(flow)
        assert asyncio.iscoroutine(work), kind
        asyncio.run(work)
    # and each did its check: the bad upload line and the unknown file are refused, the
    # batch and its owner's result pass
    assert checked["upload"].response.status_code == 400
    assert checked["batch file"].response.json()["error"] == "batch_file_not_governed"
    assert checked["batch"].response is None and checked["result"].response is None
    assert ctx_of(checked["result"]).job is not None
