"""Addon tests: mitmproxy's taddons context and tflow, as mitmproxy tests its own addons."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons, tflow

from candela_mitm.config import parse_config
from candela_mitm.runtime import build_runtime

ALICE_KEY = "cdl_alice_example_key"
ALICE_SHA = "1d7ab44a7d52779899b2b6d61230b265b654e07590677891e88d4d18fc07f034"

BASE = {
    "providers": {"openai": {"base_url": "http://upstream.test:8080"}},
    "auth": {"api_keys": [{"sha256": ALICE_SHA, "user": "alice@example.com"}]},
    "users": {"alice@example.com": {"tenants": ["research-team", "b"]}},
}


@pytest.fixture
def runtime(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")

    def make(cfg=None, command="server"):
        cfg = dict(cfg or BASE)
        # the test's own stores, never the user's ~/.candela (another Candela may have migrated it)
        cfg.setdefault("state", {"sqlite_path": str(tmp_path / "state.db")})
        cfg.setdefault("audit", {"sqlite_path": str(tmp_path / "audit.db")})
        return build_runtime(parse_config(cfg), command)

    return make


def make_flow(path: str, body=None, method: str = "POST", headers=None, raw: bytes | None = None):
    f = tflow.tflow()
    f.request.method = method
    f.request.path = path
    f.request.host = "127.0.0.1"
    f.request.port = 8181
    f.request.headers.clear()
    for k, v in (headers or {}).items():
        f.request.headers[k] = v
    if raw is not None:
        f.request.raw_content = raw
    elif body is not None:
        f.request.content = json.dumps(body).encode()
    else:
        f.request.content = b""
    return f


@pytest.fixture
def tctx():
    with taddons.context() as ctx:
        yield ctx
