import asyncio
import gzip
import json

import pytest

from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.router import Router

from .conftest import BASE, make_flow


def run(router, flow):
    router.requestheaders(flow)
    if flow.response is None:
        asyncio.run(router.request(flow))
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


# --- the operation catalogue (issue 14) ---------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, body, headers, expected",
    [
        # not in the catalogue, whatever the body names
        ("GET", "/proxy/openai/v1/files", None, {}, (404, "endpoint_not_governed")),
        ("POST", "/proxy/openai/v1/files", {"model": "gpt-4o-mini"}, {}, (404, "endpoint_not_governed")),
        ("GET", "/proxy/openai/v1/batches", None, {}, (404, "endpoint_not_governed")),
        ("POST", "/proxy/openai/v1/responses", {"model": "gpt-4o", "background": True}, {}, (404, "endpoint_not_governed")),
        # a WebSocket upgrade, on a path that would otherwise be planned too
        ("GET", "/proxy/openai/v1/realtime?model=gpt-4o-realtime-preview", None, {}, (404, "endpoint_not_governed")),
        ("GET", "/proxy/openai/v1/realtime", None, {"upgrade": "websocket", "connection": "Upgrade"}, (400, "bad_request")),
        ("GET", "/proxy/openai/v1/models", None, {"upgrade": "websocket", "connection": "Upgrade"}, (404, "endpoint_not_governed")),
        # request targets read two ways
        ("POST", "/proxy/openai/v1/chat/completions#/v1/files", {"model": "gpt-4o"}, {}, (400, "invalid_request_target")),
        ("GET", "/proxy/openai/v1/x/../files", None, {}, (400, "invalid_request_target")),
        ("GET", "/proxy/openai/v1/x/%2e%2e/files", None, {}, (400, "invalid_request_target")),
        ("POST", "/proxy/openai/v1/chat%2fcompletions", {"model": "gpt-4o"}, {}, (400, "invalid_request_target")),
        ("POST", "/v1/chat/completions", {"model": "gpt-4o"}, {"upgrade": "websocket"}, (404, "endpoint_not_governed")),
    ],
)
def test_what_the_catalogue_does_not_govern_is_refused(tctx, runtime, method, path, body, headers, expected):
    router = Router(runtime())
    f = run(router, make_flow(path, body=body, method=method, headers=headers))
    assert error_of(f) == expected
    assert ctx_of(f).plan is None
    payload = json.loads(f.response.content)
    if expected[1] == "endpoint_not_governed":
        assert payload["method"] == method and payload["path"].startswith("/v1/")


@pytest.mark.parametrize(
    "path, model",
    [
        ("/proxy/openai/v1/realtime?model=gpt-realtime", "gpt-realtime"),
        ("/proxy/openai/v1/responses", None),
        ("/proxy/google/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent", None),
    ],
)
def test_a_websocket_upgrade_is_planned_as_a_session(tctx, runtime, path, model):
    router = Router(runtime())
    f = run(router, make_flow(path, method="GET", headers={"upgrade": "websocket", "connection": "Upgrade"}))
    c = ctx_of(f)
    assert f.response is None and c.plan.session and c.plan.model == model


def test_an_operator_allowed_read_is_planned_unmetered(tctx, runtime):
    cfg = {**BASE, "providers": {"openai": {"base_url": "http://upstream.test:8080", "allow": ["GET /v1/files/{id}"]}}}
    router = Router(runtime(cfg))
    f = run(router, make_flow("/proxy/openai/v1/files/file-abc", method="GET"))
    c = ctx_of(f)
    assert f.response is None and c.plan.operation.billing == "allowed" and not c.plan.metered
    f = run(router, make_flow("/proxy/openai/v1/files", method="GET"))
    assert error_of(f) == (404, "endpoint_not_governed")


def test_async_jobs_reserve_plans_background_responses(tctx, runtime):
    router = Router(runtime({**BASE, "governance": {"async_jobs": "reserve"}}))
    f = run(router, make_flow("/proxy/openai/v1/responses", {"model": "gpt-4o", "input": "x", "background": True}))
    assert f.response is None and ctx_of(f).plan.charge_reservation


def test_local_runtime_routes_exist_in_candela_server_only_when_configured(tctx, runtime):
    body = {"model": "llama3.2:3b", "messages": []}
    server = Router(runtime())
    assert error_of(run(server, make_flow("/proxy/ollama/api/chat", body))) == (404, "not_found")
    assert error_of(run(server, make_flow("/proxy/lmstudio/v1/models", method="GET"))) == (404, "not_found")
    configured = Router(runtime({**BASE, "providers": {**BASE["providers"], "ollama": {}}}))
    f = run(configured, make_flow("/proxy/ollama/api/chat", body))
    assert f.response is None and ctx_of(f).plan.operation.name == "chat"
    f = run(configured, make_flow("/proxy/ollama/api/pull", {"model": "llama3.2:3b"}))
    assert error_of(f) == (404, "endpoint_not_governed")
    local = Router(runtime(command="local"))
    f = run(local, make_flow("/proxy/ollama/api/chat", body))
    assert f.response is None and ctx_of(f).plan.upstream.name == "ollama"


def test_claude_codes_head_probe_is_answered_here_without_a_credential(tctx, runtime):
    router = Router(runtime())
    f = run(router, make_flow("/proxy/anthropic-direct/", method="HEAD"))
    assert f.response.status_code == 200 and f.response.content == b""
    f = run(router, make_flow("/proxy/anthropic-direct/api/claude_code/settings", method="GET"))
    assert error_of(f) == (404, "endpoint_not_governed")


MULTIPART = {"content-type": "multipart/form-data; boundary=b"}
UPLOAD = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b--\r\n'


def test_a_batch_input_upload_is_planned_without_being_parsed_as_json(tctx, runtime):
    router = Router(runtime({**BASE, "governance": {"async_jobs": "reserve"}}))
    f = run(router, make_flow("/proxy/openai/v1/files", raw=UPLOAD, headers=MULTIPART))
    assert f.response is None  # addons/jobs.py reads it
    c = ctx_of(f)
    assert c.body is None and c.plan.operation.billing == "batch_input"


@pytest.mark.parametrize(
    "path, headers, cfg, expected",
    [
        # only the batch_input row takes multipart; elsewhere it is still not JSON
        ("/proxy/openai/v1/chat/completions", MULTIPART, {"async_jobs": "reserve"}, (400, "bad_request")),
        # a multipart upload that is not declared so is not JSON either
        ("/proxy/openai/v1/files", {}, {"async_jobs": "reserve"}, (400, "bad_request")),
        # under async_jobs: refuse, uploads are not governed
        ("/proxy/openai/v1/files", MULTIPART, {}, (404, "endpoint_not_governed")),
    ],
)
def test_multipart_is_taken_only_by_a_governed_batch_upload(tctx, runtime, path, headers, cfg, expected):
    router = Router(runtime({**BASE, "governance": cfg}))
    f = run(router, make_flow(path, raw=UPLOAD, headers=headers))
    assert error_of(f) == expected
_BIG = {f"k{i:06d}": [i, "x", None] for i in range(40_000)}  # ~0.8 MB: read in slices


@pytest.mark.parametrize(
    "raw, expected",
    [
        (json.dumps({"model": "gpt-4o-mini", "messages": [], "metadata": _BIG}).encode(), None),
        (json.dumps({"model": "gpt-4o-mini", "messages": [], "m": _BIG}).encode()[:-2], (400, "invalid_json")),
        (json.dumps({"model": "gpt-4o-mini", "m": _BIG, "x": "\ud800"}).encode(), (400, "invalid_json")),
        (b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b" " * 300_000, (400, "invalid_json")),  # too deep
    ],
    ids=["object", "broken", "lone-surrogate", "too-deep"],
)
def test_a_large_body_is_read_in_slices_as_json_loads_reads_it(tctx, runtime, raw, expected):
    router = Router(runtime())
    f = run(router, make_flow("/proxy/openai/v1/chat/completions", raw=raw))
    if expected is None:
        assert f.response is None and ctx_of(f).body == json.loads(raw)
        assert ctx_of(f).scan is not None  # the estimate's walk made in slices too
    else:
        assert error_of(f) == expected and ctx_of(f).plan is None


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [(b"Content-Length", b"12"), (b"Content-Type", b"application/json")],
        [(b"content-length", b"12"), (b"CONTENT-LENGTH", b"13")],  # joined, as Headers.get does
        [(b"Traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")],
        [(b"Content-Encoding", b" GZip "), (b"Upgrade", b"websocket")],
        [(b"upgrade", "\u00e9".encode()), (b"content-encoding", b"\xff\xfe")],
    ],
)
def test_head_values_equal_headers_get(fields) -> None:
    from mitmproxy.test import tflow

    from candela_mitm.addons.router import _HEAD, head_values

    f = tflow.tflow()
    f.request.headers.fields = tuple(fields)
    got = head_values(f.request.headers, _HEAD)
    for name in _HEAD:
        assert got.get(name) == f.request.headers.get(name.decode())


@pytest.mark.parametrize(
    "fields, refused",
    [
        ([(b"Transfer-Encoding", b"chunked")], None),
        ([(b"transfer-encoding", b" Chunked ")], None),
        ([(b"Transfer-Encoding", b"gzip, chunked")], "Transfer-Encoding"),
        ([(b"Transfer-Encoding", b"chunked"), (b"TRANSFER-ENCODING", b"chunked")], "Transfer-Encoding"),
        ([(b"X-A", b"a\r\n b")], "obs-fold"),
        ([(b"Transfer-Encoding", b"gzip"), (b"X-A", b"a\n b")], "obs-fold"),  # the fold first
        ([(b"Content-Length", b"3")], None),
    ],
)
def test_framing_problem(fields, refused) -> None:
    from mitmproxy.test import tflow

    from candela_mitm.addons.router import framing_problem

    f = tflow.tflow()
    f.request.headers.fields = tuple(fields)
    got = framing_problem(f.request.headers)
    assert (got is None) if refused is None else (got is not None and refused in got)


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b"{",
        b' {"a": "\\u00e9\xc3\xa9"}',
        b'\n{"a": [1, 2.5, true, null]}',
        '{"a": "b"}'.encode("utf-16-le"),
        '{"a": "b"}'.encode("utf-32-le"),
        b'{"a": "\xed\xa0\x80"}',  # a lone surrogate, as UTF-8 bytes
        b'{"a": "\xff"}',
    ],
)
def test_loads_is_json_loads(raw) -> None:
    from candela_mitm.addons.router import _loads

    def outcome(f):
        try:
            return f(raw)
        except ValueError as e:
            return type(e), str(e)

    assert outcome(_loads) == outcome(json.loads)
