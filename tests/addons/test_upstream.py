import asyncio
import json

import pytest

from candela_mitm.addons.flowstate import ctx_of, defer
from candela_mitm.addons.router import Router
from candela_mitm.addons.upstream import Upstream, replaces_provider_key

from .conftest import BASE, make_flow


def planned(rt, path, body, headers, intercepted=False):
    f = make_flow(path, body=body, headers=headers)
    Router(rt).requestheaders(f)
    c = ctx_of(f)
    c.intercepted = intercepted
    asyncio.run(Router(rt).request(f))
    assert f.response is None
    return f


def forward(rt, flow):
    up = Upstream(rt)

    async def go():
        await up.request(flow)
        up.done()

    asyncio.run(go())
    return flow


@pytest.mark.parametrize(
    "setting, route, replaced",
    [(True, "openai", True), (False, "openai", False), (["openai"], "openai", True), (["openai"], "anthropic-direct", False)],
)
def test_replaces_provider_key_setting(setting, route, replaced):
    assert replaces_provider_key(setting, route) is replaced


def test_reverse_mode_always_sets_the_org_key_and_strips_the_callers(tctx, runtime):
    rt = runtime()
    f = planned(rt, "/proxy/openai/v1/chat/completions?key=cdl_x", {"model": "gpt-4o-mini"},
                {"authorization": "Bearer cdl_alice_example_key", "x-candela-tenant-id": "t", "x-goog-api-key": "k"})
    forward(rt, f)
    h = f.request.headers
    assert h["authorization"] == "Bearer sk-upstream"
    assert "x-candela-tenant-id" not in h and "x-goog-api-key" not in h
    assert "key=" not in f.request.path
    assert (f.request.host, f.request.port, f.request.path) == ("upstream.test", 8080, "/v1/chat/completions")
    assert json.loads(f.request.content) == {"model": "gpt-4o-mini"}
    assert ctx_of(f).forwarded


@pytest.mark.parametrize("setting, kept", [(True, False), (False, True), (["anthropic-direct"], True)])
def test_intercepted_app_key_is_replaced_unless_configured_otherwise(tctx, runtime, setting, kept):
    rt = runtime({**BASE, "interception": {"replace_provider_keys": setting}})
    raw = b'{"model":"gpt-4o-mini",  "messages":[]}'
    f = make_flow("/proxy/openai/v1/chat/completions", raw=raw, headers={"authorization": "Bearer sk-app-own"})
    Router(rt).requestheaders(f)
    ctx_of(f).intercepted = True
    asyncio.run(Router(rt).request(f))
    forward(rt, f)
    assert f.request.headers["authorization"] == ("Bearer sk-app-own" if kept else "Bearer sk-upstream")
    # a kept request goes as the app sent it (it may be signed over these bytes)
    assert (f.request.content == raw) is kept


def test_headers_rewritten_in_one_pass_as_sent(tctx, runtime):
    """What goes upstream, header by header: the caller's other headers in their order, every
    header Candela sets exactly once, a length that matches the body Candela sends."""
    rt = runtime()
    raw = b'{"model": "gpt-4o-mini",\n "messages": []}'
    f = make_flow("/proxy/openai/v1/chat/completions", raw=raw, headers={
        "Host": "candela.local:8181", "User-Agent": "sdk/1", "Authorization": "Bearer x",
        "X-Candela-Auth": "a", "X-Candela-Whatever": "b", "Content-Encoding": "identity",
        "Content-Type": "text/plain", "Content-Length": str(len(raw)), "Accept-Encoding": "gzip",
        "traceparent": "00-bad", "X-Custom": "1"})
    Router(rt).requestheaders(f)
    asyncio.run(Router(rt).request(f))
    assert f.response is None
    forward(rt, f)
    names = [k.lower() for k, _ in f.request.headers.fields]
    assert names[0] == b"host" and f.request.headers["host"] == "upstream.test:8080"
    for name in (b"host", b"content-type", b"content-length", b"traceparent", b"accept-encoding",
                 b"authorization"):
        assert names.count(name) == 1, name
    assert b"content-encoding" not in names and not any(n.startswith(b"x-candela-") for n in names)
    assert [n for n in names if n in (b"user-agent", b"x-custom")] == [b"user-agent", b"x-custom"]
    h = f.request.headers
    assert h["authorization"] == "Bearer sk-upstream" and h["accept-encoding"] == "identity"
    assert h["content-type"] == "application/json"
    assert int(h["content-length"]) == len(f.request.raw_content)
    assert json.loads(f.request.raw_content) == {"model": "gpt-4o-mini", "messages": []}
    assert h["traceparent"].startswith("00-") and h["traceparent"] != "00-bad"
    assert f.request.url == "http://upstream.test:8080/v1/chat/completions"


def test_anthropic_version_is_set_once(tctx, runtime, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    rt = runtime({**BASE, "providers": {**BASE["providers"],
                                        "anthropic-direct": {"base_url": "http://anthropic.test"}}})
    f = planned(rt, "/proxy/anthropic-direct/v1/messages",
                {"model": "claude-sonnet-4-20250514", "max_tokens": 5, "messages": []},
                {"anthropic-version": "2023-06-01", "x-api-key": "cdl_alice"})
    forward(rt, f)
    assert f.request.headers.get_all("anthropic-version") == ["2023-06-01"]
    assert f.request.headers.get_all("x-api-key") == ["sk-ant"]


PROVIDER_HEADERS = [
    ("content-type", "text/event-stream", True),
    ("x-request-id", "req_123", True),
    ("request-id", "req_456", True),
    ("retry-after", "3", True),
    ("x-amzn-bedrock-input-token-count", "12", True),
    ("openai-organization", "org-secret-name", False),
    ("openai-project", "proj_abc", False),
    ("anthropic-organization-id", "1f0c-org", False),
    ("x-ratelimit-remaining-tokens", "149000", False),
    ("anthropic-ratelimit-tokens-remaining", "99000", False),
    ("set-cookie", "__cf_bm=abc; path=/", False),
    # HTTP/3 straight to the provider would bypass Candela: never passed on (which is why
    # mitmproxy's UpdateAltSvc, rewriting it to Candela's port, is not in Candela's chain)
    ("alt-svc", 'h3=":443"; ma=86400', False),
    ("x-some-future-header", "?", False),
]


def test_only_allowed_provider_response_headers_reach_the_client(tctx, runtime):
    from mitmproxy.test import tutils

    rt = runtime()
    f = forward(rt, planned(rt, "/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"}, {}))
    f.response = tutils.tresp(headers=[(k.encode(), v.encode()) for k, v, _ in PROVIDER_HEADERS])
    Upstream(rt).responseheaders(f)
    assert {k: f.response.headers.get(k) is not None for k, _, _ in PROVIDER_HEADERS} == {
        k: kept for k, _, kept in PROVIDER_HEADERS
    }


def test_candelas_own_answers_keep_their_headers(tctx, runtime):
    from mitmproxy.test import tutils

    rt = runtime()
    f = planned(rt, "/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"}, {})
    f.response = tutils.tresp(headers=[(b"retry-after", b"7"), (b"x-candela-span-id", b"s")])
    Upstream(rt).responseheaders(f)  # never forwarded: not the provider's answer
    assert f.response.headers["x-candela-span-id"] == "s"


def test_missing_credential_says_so_without_internals(tctx, runtime, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    rt = runtime()
    f = forward(rt, planned(rt, "/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"}, {}))
    assert f.response is not None and f.response.status_code == 502
    body = json.loads(f.response.content)
    assert body["error"] == "upstream_credentials_unavailable"
    assert "OPENAI_API_KEY" not in f.response.text and "not available" in body["message"]
    assert not ctx_of(f).forwarded


@pytest.mark.parametrize("intercepted", [False, True])
def test_headers_that_change_the_operation_or_its_shape_never_go_upstream(tctx, runtime, intercepted):
    rt = runtime({**BASE, "interception": {"replace_provider_keys": False}})
    headers = {
        "authorization": "Bearer cdl_alice_example_key",
        "X-Goog-FieldMask": "candidates",
        "x-goog-user-project": "someone-else",
        "X-HTTP-Method-Override": "DELETE",
        "x-http-method": "GET",
        "x-method-override": "PUT",
        "x-keep-me": "1",
    }
    f = forward(rt, planned(rt, "/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"}, headers, intercepted))
    names = {k.lower() for k in f.request.headers}
    assert names.isdisjoint({"x-goog-fieldmask", "x-goog-user-project", "x-http-method-override", "x-http-method", "x-method-override"})
    assert f.request.headers["x-keep-me"] == "1" and f.request.method == "POST"


def test_meanwhile_runs_after_the_forwarding_hook_returns_never_for_a_refusal(tctx, runtime):
    """Upstream runs `meanwhile` (the audit's work that waits for no answer) with call_soon:
    after the request hook has returned (mitmproxy writes the request in that same step), for
    a forwarded request only."""
    rt = runtime()
    calls: list[str] = []
    up = Upstream(rt, meanwhile=[lambda _flow: calls.append("meanwhile")])

    async def go(flow):
        await up.request(flow)
        calls.append("hook returned")
        await asyncio.sleep(0)
        up.done()

    f = planned(rt, "/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"},
                {"authorization": "Bearer cdl_alice_example_key"})
    defer(ctx_of(f), lambda: calls.append("deferred"))  # by an addon before (RateLimit)
    asyncio.run(go(f))
    assert ctx_of(f).forwarded and calls == ["hook returned", "deferred", "meanwhile"]
    assert ctx_of(f).later is None
    calls.clear()
    refused = make_flow("/proxy/openai/v1/chat/completions", body={"model": "gpt-4o-mini"})
    asyncio.run(go(refused))  # nobody planned it: 503, nothing forwarded
    assert refused.response.status_code == 503 and calls == ["hook returned"]
