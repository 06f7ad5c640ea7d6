"""Addon tests: mitmproxy's taddons context and tflow, as mitmproxy tests its own addons."""

from __future__ import annotations

import inspect
import json
import sqlite3

import pytest
from mitmproxy.test import taddons, tflow

from candela_mitm.addons.flowstate import ctx_of, run_later
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
    """build_runtime(cfg or BASE, command); state and audit in this test's own folder, never in
    ~/.candela (shared by every checkout on the machine)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    made = []

    def make(cfg=None, command="server"):
        cfg = dict(cfg or BASE)
        cfg.setdefault("state", {"sqlite_path": str(tmp_path / f"state{len(made)}.db")})
        cfg.setdefault("audit", {"sqlite_path": str(tmp_path / f"audit{len(made)}.db")})
        rt = build_runtime(parse_config(cfg), command)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


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


@pytest.fixture
def make_runtime(tmp_path, monkeypatch):
    """build_runtime(BASE with these auth keys, command) on files of its own; closed after."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    made = []

    def make(command, **auth):
        cfg = {
            **BASE,
            "auth": {**BASE["auth"], **auth},
            "state": {"sqlite_path": str(tmp_path / "state.db")},
            "audit": {"sqlite_path": str(tmp_path / "audit.db")},
        }
        rt = build_runtime(parse_config(cfg), command)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()
async def run_hooks(addons, flow, *names: str) -> None:
    """Run hooks as mitmproxy does: one hook name at a time, across the addons in list order.
    A request the request hooks let through then leaves: what the addons deferred until then
    is run (as Upstream does once its bytes are written: flowstate.run_later)."""
    for name in names:
        for addon in addons:
            fn = getattr(addon, name, None)
            if callable(fn):
                result = fn(flow)
                if inspect.isawaitable(result):
                    await result
        c = ctx_of(flow)
        if name == "request" and c is not None and flow.response is None:
            run_later(c)


def audit_entries(rt, action: str) -> list[dict]:
    """The committed audit entries of one action, oldest first, their fields as recorded."""
    assert rt.audit.flush(10)
    with sqlite3.connect(rt.config.audit.sqlite_path) as db:
        rows = db.execute(
            "SELECT fields FROM audit_log WHERE action = ? ORDER BY seq", (action,)
        ).fetchall()
    return [json.loads(f) for (f,) in rows]
