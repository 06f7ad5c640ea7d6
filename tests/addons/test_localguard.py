"""LocalGuard: laptop mode lets in only this machine's clients, speaking JSON, with the UI token."""

import json

import pytest

from candela_mitm.addons.localguard import LocalGuard
from candela_mitm.addons.router import Router
from candela_mitm.local.guard import TOKEN_HEADER, token_path, ui_token

from .conftest import make_flow

PORT = 1234


def guarded(rt, path, host, body=None, headers=None, method="POST"):
    flow = make_flow(path, body=body, method=method, headers={"host": host, **(headers or {})})
    flow.client_conn.sockname = ("127.0.0.1", PORT)
    Router(rt).requestheaders(flow)
    LocalGuard(rt).requestheaders(flow)
    return flow


def refusal(flow):
    return None if flow.response is None else json.loads(flow.response.content)["error"]


@pytest.mark.parametrize(
    "host, error",
    [
        (f"127.0.0.1:{PORT}", None),
        (f"localhost:{PORT}", None),
        (f"evil.example:{PORT}", "host_not_allowed"),
        ("localhost:9999", "host_not_allowed"),
    ],
)
def test_host_must_be_this_machines_candela(make_runtime, host, error):
    rt = make_runtime("local")
    json_ = {"content-type": "application/json"}
    flow = guarded(rt, "/v1/chat/completions", host, {"model": "gpt-4o-mini"}, json_)
    assert refusal(flow) == error


@pytest.mark.parametrize(
    "ctype, error",
    [("application/json", None), ("text/plain", "unsupported_media_type"),
     ("application/x-www-form-urlencoded", "unsupported_media_type")],
)
def test_bodies_must_be_declared_json(make_runtime, ctype, error):
    rt = make_runtime("local")
    flow = guarded(
        rt, "/proxy/openai/v1/chat/completions", f"localhost:{PORT}", {"model": "gpt-4o-mini"},
        {"content-type": ctype},
    )
    assert refusal(flow) == error


def test_management_writes_need_the_token(make_runtime):
    rt = make_runtime("local")
    token = ui_token(token_path(rt.config.audit.sqlite_path))
    host = f"localhost:{PORT}"
    ok = {"content-type": "application/json"}
    assert refusal(guarded(rt, "/_local/api/config", host, {}, ok)) == "forbidden"
    wrong = {**ok, TOKEN_HEADER: "x" * 43}
    assert refusal(guarded(rt, "/_local/api/config", host, {}, wrong)) == "forbidden"
    assert refusal(guarded(rt, "/_local/api/config", host, {}, {**ok, TOKEN_HEADER: token})) is None
    assert refusal(guarded(rt, "/_local/api/config", host, method="GET")) is None  # reads: no token


def test_candela_server_is_not_guarded_this_way(make_runtime):
    rt = make_runtime("server")
    flow = guarded(rt, "/v1/chat/completions", "proxy.example.com", {"model": "gpt-4o-mini"},
                   {"content-type": "text/plain"})
    assert flow.response is None
