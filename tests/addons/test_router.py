import gzip
import json

import pytest

from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.router import Router

from .conftest import make_flow


def run(router, flow):
    router.requestheaders(flow)
    if flow.response is None:
        router.request(flow)
    return flow


def error_of(flow):
    assert flow.response is not None
    return flow.response.status_code, json.loads(flow.response.content)["error"]


@pytest.mark.parametrize(
    "path, body, raw, headers, expected",
    [
        ("/proxy/nowhere/v1/x", {"model": "m"}, None, {}, (404, "not_found")),
        ("/proxy/openai/v1/chat/completions", None, b"{not json", {}, (400, "invalid_json")),
        ("/proxy/openai/v1/chat/completions", None, b"[1, 2]", {}, (400, "bad_request")),
        ("/proxy/openai/v1/chat/completions", None, b"\xff\xfe{}", {}, (400, "invalid_json")),
        ("/proxy/openai/v1/chat/completions", None, b"{}", {"content-encoding": "compress"}, (415, "unsupported_encoding")),
        ("/proxy/openai/v1/chat/completions", None, b"nope", {"content-encoding": "gzip"}, (400, "bad_request")),
        ("/proxy/openai/v1/chat/completions", None, b"x" * 10, {"content-length": "999999999"}, (413, "payload_too_large")),
        ("/proxy/openai/v1/chat/completions", None, b"x", {"content-length": "12abc"}, (400, "bad_request")),
        ("/v1/chat/completions", {"model": "mystery"}, None, {}, (404, "model_not_found")),
        ("/v1/chat/completions", {"messages": []}, None, {}, (400, "bad_request")),
        ("/proxy/google/v1beta/models/gemini-2.5-flash:generateContent", {"model": "gemini-2.5-pro"}, None, {}, (400, "model_mismatch")),
    ],
)
def test_bad_requests_are_answered_json_and_never_planned(tctx, runtime, path, body, raw, headers, expected):
    router = Router(runtime())
    f = run(router, make_flow(path, body=body, raw=raw, headers=headers))
    assert error_of(f) == expected
    assert ctx_of(f).plan is None


def test_gzip_bomb_is_413(tctx, runtime):
    router = Router(runtime({"limits": {"max_body_bytes": 100_000}}))
    bomb = gzip.compress(b"{" + b" " * 5_000_000 + b"}")
    f = run(router, make_flow("/proxy/openai/v1/chat/completions", raw=bomb, headers={"content-encoding": "gzip"}))
    assert error_of(f) == (413, "payload_too_large")


def test_gzip_body_is_read(tctx, runtime):
    router = Router(runtime())
    raw = gzip.compress(json.dumps({"model": "gpt-4o-mini", "messages": []}).encode())
    f = run(router, make_flow("/proxy/openai/v1/chat/completions", raw=raw, headers={"content-encoding": "gzip"}))
    assert f.response is None
    assert ctx_of(f).plan.model == "gpt-4o-mini"


def test_plans_a_chat_completion_by_model(tctx, runtime):
    router = Router(runtime())
    f = run(router, make_flow("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}))
    c = ctx_of(f)
    assert f.response is None and c.kind == "chat"
    assert c.plan.upstream.name == "openai" and c.plan.path == "/v1/chat/completions"


def test_traceparent_is_honoured(tctx, runtime):
    router = Router(runtime())
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    f = run(router, make_flow("/healthz", method="GET", headers={"traceparent": tp}))
    c = ctx_of(f)
    assert c.trace.trace_id == "0af7651916cd43dd8448eb211c80319c" and c.trace.parent_id == "b7ad6b7169203331"


def test_an_exception_in_a_hook_denies_instead_of_forwarding(tctx, runtime, monkeypatch):
    rt = runtime()
    router = Router(rt)

    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr("candela_mitm.addons.router.plan_provider_request", boom)
    f = run(router, make_flow("/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"}))
    assert error_of(f) == (503, "governance_unavailable")
