"""WebSocket addon: the upgrade's session bound, and a session's frames governed one by one."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from mitmproxy import http, websocket
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from candela_mitm.addons import websocket as ws_addon
from candela_mitm.addons.auth import Auth
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.router import Router
from candela_mitm.addons.websocket import WebSocket
from candela_mitm.governance.ledger import Reservation
from tests.wait import WAIT_S

from .conftest import ALICE_KEY, BASE, make_flow

UPGRADE = {"Authorization": f"Bearer {ALICE_KEY}", "upgrade": "websocket", "connection": "Upgrade",
           "X-Candela-Tenant": "research-team"}
CFG = {
    **BASE,
    "governance": {
        "models": {"mode": "blocklist", "blocked": ["gpt-4o-realtime-preview"]},
        "websocket": {"reserve_usd": 0.5, "max_sessions_per_user": 1},
    },
}


@pytest.fixture
def sent(monkeypatch):
    """What the addon sends the client and how it closes, instead of a live connection."""
    got: dict[str, list] = {"client": [], "close": []}
    monkeypatch.setattr(
        ws_addon.mitm_patches, "send_to_client", lambda f, b: got["client"].append(json.loads(b))
    )
    monkeypatch.setattr(
        ws_addon.mitm_patches, "close_websocket", lambda f, code, why: got["close"].append(code)
    )
    return got


async def upgraded(rt, path="/proxy/openai/v1/realtime?model=gpt-realtime"):
    """An upgrade planned, authenticated, holding its first slice, answered 101."""
    f = make_flow(path, method="GET", headers=UPGRADE)
    Router(rt).requestheaders(f)
    await Auth(rt).requestheaders(f)
    await Router(rt).request(f)
    c = ctx_of(f)
    assert f.response is None and c.plan.session, f.response and f.response.content
    res = rt.ledger.reserve(c.settings.user_id, c.tenant, 0.5, 100.0, c.span_id)
    assert isinstance(res, Reservation)
    c.reservation = res
    f.response = http.Response.make(101)
    f.websocket = websocket.WebSocketData()
    return f


def frame(f, obj, from_client=True):
    f.websocket.messages.append(WebSocketMessage(Opcode.TEXT, from_client, json.dumps(obj).encode()))
    return f.websocket.messages[-1]


async def planned(rt):
    f = make_flow("/proxy/openai/v1/realtime?model=gpt-realtime", method="GET", headers=UPGRADE)
    Router(rt).requestheaders(f)
    await Auth(rt).requestheaders(f)
    await Router(rt).request(f)
    return f


def test_a_user_at_the_session_limit_is_refused_before_reserving(tctx, runtime, sent):
    rt = runtime(CFG)
    addon = WebSocket(rt)

    async def main():
        f = await planned(rt)
        await addon.request(f)
        assert f.response is None and ctx_of(f).session_lease is not None
        f.response = http.Response.make(101)
        f.websocket = websocket.WebSocketData()
        await addon.response(f)  # a 101 keeps the lease: the session takes it
        addon.websocket_start(f)
        assert ctx_of(f).session.lease is not None and ctx_of(f).session_lease is None
        second = await planned(rt)
        await addon.request(second)
        assert second.response.status_code == 429
        assert json.loads(second.response.content)["error"] == "websocket_sessions_exceeded"
        await addon.websocket_end(f)
        third = await planned(rt)
        await addon.request(third)
        assert third.response is None  # the first one ended
        # a later gate (or the provider) answers the upgrade with no 101: the place is free
        third.response = http.Response.make(402)
        await addon.response(third)
        fourth = await planned(rt)
        await addon.request(fourth)
        assert fourth.response is None
        await addon.error(fourth)  # an upgrade that failed frees its place too
        fifth = await planned(rt)
        await addon.request(fifth)
        assert fifth.response is None
        # a session that could not start (websocket_start failed) frees it at its end
        fifth.response = http.Response.make(101)
        fifth.websocket = websocket.WebSocketData()
        await addon.websocket_end(fifth)
        sixth = await planned(rt)
        await addon.request(sixth)
        assert sixth.response is None

    asyncio.run(main())


def test_a_denied_model_switch_is_dropped_and_the_session_cut(tctx, runtime, sent):
    rt = runtime(CFG)
    addon = WebSocket(rt)

    async def main():
        f = await upgraded(rt)
        addon.websocket_start(f)
        ok = frame(f, {"type": "session.update", "session": {"instructions": "x"}})
        await addon.websocket_message(f)
        assert not ok.dropped
        bad = frame(f, {"type": "session.update", "session": {"model": "gpt-4o-realtime-preview"}})
        await addon.websocket_message(f)
        assert bad.dropped
        assert sent["client"][0]["error"]["code"] == "model_not_allowed" and sent["close"] == [1008]
        late = frame(f, {"type": "response.create"})
        await addon.websocket_message(f)
        assert late.dropped  # nothing passes once the session is cut
        s = ctx_of(f).session
        assert s.tally.ended_by == "policy" and s.tally.models == ["gpt-realtime"]
        await addon.websocket_end(f)

    asyncio.run(main())


def test_a_usage_frame_settles_its_cost(tctx, runtime, sent):
    rt = runtime(CFG)
    addon = WebSocket(rt)

    async def main():
        f = await upgraded(rt)
        c = ctx_of(f)
        addon.websocket_start(f)
        frame(f, {"type": "response.create"})
        await addon.websocket_message(f)
        usage = {"input_tokens": 1000, "output_tokens": 100,
                 "input_token_details": {"text_tokens": 1000, "audio_tokens": 0},
                 "output_token_details": {"text_tokens": 100, "audio_tokens": 0}}
        done = frame(f, {"type": "response.done", "response": {"usage": usage}}, from_client=False)
        await addon.websocket_message(f)
        assert not done.dropped and sent["client"] == []
        f.websocket.closed_by_client = True
        await addon.websocket_end(f)
        price = rt.pricing.get("gpt-realtime", "openai")
        expected = price.cost(rt_usage(1000, 100))
        assert c.cost_usd == pytest.approx(expected) and c.usage_source == "reported"
        assert rt.ledger.spent_today(c.settings.user_id) == pytest.approx(expected)
        assert c.session.tally.ended_by == "client"

    asyncio.run(main())


def rt_usage(inp, out):
    from candela_mitm.providers.usage import Usage

    return Usage(inp, out)


@pytest.mark.parametrize("place_left", [True, False])
def test_a_lost_session_lease_is_taken_again_or_the_session_cut(tctx, runtime, sent, place_left):
    from candela_mitm.governance.sessions import SessionLeases, session_lease_key

    rt = runtime(CFG)  # one session per user
    addon = WebSocket(rt)
    addon.leases.ttl_us = 30_000  # renewed every 10 ms

    async def main():
        f = await planned(rt)
        await addon.request(f)
        f.response = http.Response.make(101)
        f.websocket = websocket.WebSocketData()
        addon.websocket_start(f)
        s = ctx_of(f).session
        user = s.user
        # the store forgot it (it expired while the store could not be reached)
        assert rt.store.lease_release(session_lease_key(user), s.lease)
        if not place_left:  # and another process gave the place to another session
            other = SessionLeases(rt.store, "elsewhere:1", ttl_s=60)
            assert other.acquire(user, 1) is not None
        # the renewal runs every 10 ms: waited for up to 30 s (a loaded machine), not 1 s
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            held = [x for x in rt.store.leases() if x.key == session_lease_key(user)]
            if s.cut or (place_left and any(x.lease_id == s.lease for x in held)):
                break
        if place_left:
            assert not s.cut and any(x.lease_id == s.lease for x in held)
        else:
            assert s.cut and s.tally.end_code == "websocket_sessions_exceeded"
            assert sent["client"][0]["error"]["code"] == "websocket_sessions_exceeded"
            assert sent["close"] == [1008]
        await addon.websocket_end(f)

    asyncio.run(main())
