"""Issue 15 end to end: WebSocket sessions through a real candela-server to a fake provider.

OpenAI Realtime, the Responses API's WebSocket mode and Gemini Live, each spoken by
tests/fakes/realtime.py: models checked at the upgrade and frame by frame, every usage frame
settled, a session cut when the budget runs out, a dropped session charged its reservation.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from candela_mitm.audit.query import query_entries
from candela_mitm.config import State, parse_config
from candela_mitm.governance.ledger import Ledger
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.usage import Usage
from candela_mitm.state import open_state_store
from tests.fakes.candela import CandelaProcess
from tests.fakes.google_oauth import FakeTokenServer
from tests.fakes.realtime import Closed, FakeRealtime, RtUsage, WsClient
from tests.fakes.upstream import OPENAI_KEY
from tests.required import require
from tests.wait import WAIT_S

from .conftest import ALICE_KEY, BOB_KEY, base_config, candela_env

pytestmark = pytest.mark.e2e
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
BOB = {"Authorization": f"Bearer {BOB_KEY}"}
USER = "alice@example.com"
SLICE = 0.05
PRICES = PricingTable.from_config(parse_config({}))
REALTIME = "/proxy/openai/v1/realtime?model=gpt-realtime"
RESPONSES = "/proxy/openai/v1/responses"
LIVE = "/proxy/google/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
LIVE_MODEL = "gemini-live-2.5-flash-preview"
VERTEX_LIVE = "/proxy/anthropic-vertex/ws/google.cloud.aiplatform.v1.LlmBidiService/BidiGenerateContent"


def cost(model: str, u: RtUsage, protocol: str) -> float:
    price = PRICES.get(model)
    assert price is not None
    usage = Usage(u.input_text + u.input_audio, u.output_text + u.output_audio, u.cached)
    if protocol != "openai-responses":
        usage.input_audio_tokens = u.input_audio
        usage.output_audio_tokens = u.output_audio
    return price.cost(usage)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRealtime]:
    with FakeRealtime() as f:
        yield f


@pytest.fixture(autouse=True)
def _reset(fake: FakeRealtime) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, fake: FakeRealtime) -> Iterator[CandelaProcess]:
    tmp = tmp_path_factory.mktemp("candela-ws")
    with FakeTokenServer() as tokens:
        cfg = base_config(
            fake.url,
            users={
                USER: {"tenants": ["research-team"], "requests_per_minute": 100_000},
                "bob@example.com": {"daily_budget_usd": 0.05},
            },
            governance={
                # `settled` waits until nothing of the user is held, a budget slice of its plain
                # requests included: returned a second after its last use here (default 30 s)
                "budgets": {"default_daily_usd": 1000.0, "slices": {"idle_s": 1.0}},
                "websocket": {"reserve_usd": SLICE, "max_sessions_per_user": 3},
                "models": {
                    "mode": "blocklist",
                    "blocked": ["gpt-4o-realtime-preview", "gemini-2.5-pro", "gpt-4o"],
                },
            },
        )
        with CandelaProcess(tmp, cfg, env=candela_env(tokens, tmp)) as c:
            yield c


def ledger_of(c: CandelaProcess) -> Ledger:
    state = yaml.safe_load(c.config_path.read_text())["state"]
    return Ledger(open_state_store(State(**state)))


def settled(led: Ledger, user: str = USER, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while led.status(user, 1000.0).reserved_usd > 0:
        if time.monotonic() > deadline:
            raise AssertionError("the session's slice was never settled nor released")
        time.sleep(0.05)


def session_entry(c: CandelaProcess, client: WsClient, timeout: float = WAIT_S) -> dict[str, Any]:
    """The llm_session entry of the session `client` opened (its upgrade's span id)."""
    deadline = time.monotonic() + timeout
    while True:
        for r in query_entries(c.tmp / "audit.db", action="llm_session", limit=1000):
            if r["fields"].get("span_id") == client.span_id:
                return dict(r["fields"])
        if time.monotonic() > deadline:
            raise AssertionError("no llm_session entry")
        time.sleep(0.05)


def is_type(name: str) -> Any:
    return lambda e: e.get("type") == name


# --- model policy --------------------------------------------------------------------------


def test_a_url_named_model_denied_is_refused_before_the_upgrade(proxy, fake):
    client = WsClient(proxy.port, "/proxy/openai/v1/realtime?model=gpt-4o-realtime-preview", ALICE)
    assert client.status == 403
    assert client.rejection["error"] == "model_not_allowed"
    time.sleep(0.2)
    assert fake.sessions == []  # nothing reached the provider


def test_an_upgrade_without_a_credential_is_refused(proxy, fake):
    client = WsClient(proxy.port, REALTIME, {})
    assert client.status == 401 and fake.sessions == []


def test_a_denied_model_in_the_setup_frame_ends_the_session_before_it_is_forwarded(proxy, fake):
    client = WsClient(proxy.port, LIVE, ALICE)
    assert client.status == 101
    client.send({"setup": {"model": "models/gemini-2.5-pro"}})
    err = client.recv()
    assert err["error"]["status"] == "PERMISSION_DENIED"
    assert err["error"]["details"][0]["reason"] == "model_not_allowed"
    with pytest.raises(Closed) as closed:
        client.recv()
    assert closed.value.code == 1008
    s = fake.last()
    assert s.ended.wait(WAIT_S)
    assert s.frames == [] and s.close_code == 1008  # the setup frame never left Candela
    e = session_entry(proxy, client)
    assert e["ended_by"] == "policy" and e["error"] == "model_not_allowed"
    assert e["cost_usd"] == 0  # nothing reached a model: the slice is given back


def test_a_frame_before_the_setup_is_refused(proxy, fake):
    client = WsClient(proxy.port, LIVE, ALICE)
    client.send({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "hi"}]}]}})
    err = client.recv()
    assert err["error"]["details"][0]["reason"] == "websocket_model_required"
    with pytest.raises(Closed):
        client.recv()
    s = fake.last()
    assert s.ended.wait(WAIT_S) and s.frames == []


def test_a_model_switched_mid_session_is_checked_again(proxy, fake):
    client = WsClient(proxy.port, REALTIME, ALICE)
    assert client.status == 101
    assert client.recv()["type"] == "session.created"
    client.send({"type": "session.update", "session": {"type": "realtime", "instructions": "x"}})
    assert client.recv()["type"] == "session.updated"  # no model named: forwarded
    client.send({"type": "session.update", "session": {"model": "gpt-4o-realtime-preview"}})
    err = client.recv()
    assert err["type"] == "error" and err["error"]["code"] == "model_not_allowed"
    with pytest.raises(Closed) as closed:
        client.recv()
    assert closed.value.code == 1008
    s = fake.last()
    assert s.ended.wait(WAIT_S)
    assert [f["type"] for f in s.frames] == ["session.update"]  # the switch never reached it
    assert s.close_code == 1008


def test_responses_websocket_checks_the_model_of_each_response_create(proxy, fake):
    client = WsClient(proxy.port, RESPONSES, ALICE)
    client.send({"type": "response.create", "model": "gpt-4o-mini", "input": "hi"})
    got = client.recv_until(is_type("response.completed"))
    assert got[-1]["response"]["usage"]["input_tokens"] == 100
    client.send({"type": "response.create", "model": "gpt-4o", "input": "hi"})
    err = client.recv()
    assert (err["type"], err["code"], err["param"]) == ("error", "model_not_allowed", None)
    assert err["model"] == "gpt-4o"  # the refusal's fields, as the HTTP denial carries them
    with pytest.raises(Closed):
        client.recv()
    s = fake.last()
    assert s.ended.wait(WAIT_S)
    assert [f["model"] for f in s.frames] == ["gpt-4o-mini"]


# --- metering ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, first, work, done, model, protocol",
    [
        (REALTIME, None, {"type": "response.create"}, "response.done", "gpt-realtime",
         "openai-realtime"),
        (LIVE, {"setup": {"model": f"models/{LIVE_MODEL}"}},
         {"realtimeInput": {"text": "hi"}}, "usageMetadata", LIVE_MODEL, "gemini-live"),
        (VERTEX_LIVE,
         {"setup": {"model": f"projects/proj/locations/us-east5/publishers/google/models/{LIVE_MODEL}"}},
         {"clientContent": {"turns": [], "turnComplete": True}}, "usageMetadata", LIVE_MODEL,
         "gemini-live"),
    ],
)
def test_an_allowed_session_is_metered_per_usage_frame(proxy, fake, path, first, work, done, model, protocol):
    fake.usage = RtUsage(input_text=300, input_audio=2000, output_text=50, output_audio=1200)
    led = ledger_of(proxy)
    spent = led.spent_today(USER)
    client = WsClient(proxy.port, path, ALICE)
    if first is None:
        client.recv()  # session.created
    else:
        client.send(first)
        client.recv()  # setupComplete
    for _ in range(2):
        client.send(work)
        client.recv_until(lambda e: e.get("type") == done or done in e)
    client.close()
    s = fake.last()
    # forwarded with the organisation's credential, never the caller's Candela key
    assert s.headers["authorization"].startswith("Bearer ")
    assert ALICE_KEY not in " ".join(s.headers.values())
    if protocol == "openai-realtime":
        assert s.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    e = session_entry(proxy, client)
    settled(led)
    one = cost(model, fake.usage, protocol)
    assert e["cost_usd"] == pytest.approx(2 * one, rel=1e-6)
    assert led.spent_today(USER) - spent == pytest.approx(2 * one, rel=1e-6)
    assert e["usage_source"] == "reported" and e["ended_by"] == "client"
    assert e["usage_frames"] == 2 and e["models"] == [model]
    assert e["tokens"]["input_audio"] == 4000 and e["tokens"]["output_audio"] == 2400
    assert e["tokens"]["input_text"] == 600 and e["tokens"]["output_text"] == 100
    assert e["frames_from_client"] == (2 if first is None else 3)


def test_a_session_is_cut_when_the_budget_runs_out(proxy, fake):
    # bob's budget is $0.05 and a slice $0.05: each response costs about a third of it
    fake.usage = RtUsage(input_text=1000, output_audio=200)
    one = cost("gpt-realtime", fake.usage, "openai-realtime")
    assert 0.05 / 3 < one * 1.01 and one * 2 < 0.05
    led = ledger_of(proxy)
    client = WsClient(proxy.port, REALTIME, BOB)
    assert client.status == 101
    client.recv()
    done = 0
    error = None
    with pytest.raises(Closed) as closed:
        while True:
            client.send({"type": "response.create"})
            for ev in client.recv_until(lambda e: e.get("type") in ("response.done", "error")):
                if ev["type"] == "response.done":
                    done += 1
                elif ev["type"] == "error":
                    error = ev
                    client.recv()  # the close follows the error event
    assert closed.value.code == 1008
    assert error is not None and error["error"]["code"] == "budget_exceeded"
    s = fake.last()
    assert s.ended.wait(WAIT_S) and s.close_code == 1008
    # every frame the fake got was answered and paid for: nothing after the cut reached it
    assert len(s.frames) == done
    e = session_entry(proxy, client)
    assert e["ended_by"] == "budget" and e["error"] == "budget_exceeded"
    settled(led, "bob@example.com")
    assert led.spent_today("bob@example.com") == pytest.approx(done * one, rel=1e-6)
    assert led.spent_today("bob@example.com") >= 0.05
    # and the next upgrade is refused at the door
    again = WsClient(proxy.port, REALTIME, BOB)
    assert again.status == 402 and again.rejection["error"] == "budget_exceeded"


def test_a_session_dropped_by_the_client_is_charged_its_reservation(proxy, fake):
    led = ledger_of(proxy)
    spent = led.spent_today(USER)
    client = WsClient(proxy.port, REALTIME, ALICE)
    client.recv()
    # audio sent, no response yet: work the provider may bill, and no usage frame will tell
    client.send({"type": "input_audio_buffer.append", "audio": "AAAA"})
    s = fake.last()
    deadline = time.monotonic() + WAIT_S
    while not s.frames and time.monotonic() < deadline:
        time.sleep(0.02)
    client.drop()
    e = session_entry(proxy, client)
    settled(led)
    assert e["ended_by"] == "client" and e["usage_source"] == "reserved"
    assert e["cost_usd"] == pytest.approx(SLICE)
    assert led.spent_today(USER) - spent == pytest.approx(SLICE)


def test_a_session_the_upstream_cuts_mid_response_is_charged_its_reservation(proxy, fake):
    fake.cut_mid_response = True
    led = ledger_of(proxy)
    spent = led.spent_today(USER)
    client = WsClient(proxy.port, REALTIME, ALICE)
    client.recv()
    client.send({"type": "response.create"})
    assert client.recv()["type"] == "response.created"
    with pytest.raises(Closed):
        client.recv()
    e = session_entry(proxy, client)
    settled(led)
    assert e["ended_by"] == "upstream" and e["usage_source"] == "reserved"
    assert led.spent_today(USER) - spent == pytest.approx(SLICE)


def test_a_session_held_by_a_proxy_that_died_is_charged_its_slice_at_the_next_start(
    tmp_path, fake
):
    with FakeTokenServer() as tokens:
        cfg = base_config(
            fake.url,
            users={USER: {"tenants": ["research-team"], "requests_per_minute": 100_000}},
            governance={"websocket": {"reserve_usd": SLICE}},
        )
        c = CandelaProcess(tmp_path, cfg, env=candela_env(tokens, tmp_path)).start()
        try:
            client = WsClient(c.port, REALTIME, ALICE)
            client.recv()
            client.send({"type": "input_audio_buffer.append", "audio": "AAAA"})
            s = fake.last()
            deadline = time.monotonic() + WAIT_S
            while not s.frames and time.monotonic() < deadline:
                time.sleep(0.02)
            c.stop(kill=True)  # the proxy dies mid-session: no websocket_end, no settle
            client.drop()
            led = ledger_of(c)
            assert led.status(USER, 1000.0).reserved_usd == pytest.approx(SLICE)
            c.start()  # the next start settles the dead process's slice at its amount
            assert led.status(USER, 1000.0).reserved_usd == 0
            assert led.spent_today(USER) == pytest.approx(SLICE)
        finally:
            c.stop()


# --- bounds --------------------------------------------------------------------------------


def test_sessions_per_user_are_bounded(proxy, fake):
    open_ = [WsClient(proxy.port, REALTIME, ALICE) for _ in range(3)]
    assert all(c.status == 101 for c in open_)
    for c in open_:
        c.recv()
    fourth = WsClient(proxy.port, REALTIME, ALICE)
    assert fourth.status == 429
    assert fourth.rejection["error"] == "websocket_sessions_exceeded"
    for c in open_:
        c.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_sessions_per_user_are_counted_across_proxies_on_one_store(tmp_path, fake, backend, request):
    state: dict[str, Any] = {"sqlite_path": str(tmp_path / "state.db")}
    if backend == "redis":
        state = {"backend": "redis", "redis_url": request.getfixturevalue("redis_server_factory")().url}
    with FakeTokenServer() as tokens:
        cfg = base_config(
            fake.url,
            users={USER: {"tenants": ["research-team"], "requests_per_minute": 100_000}},
            governance={"websocket": {"reserve_usd": SLICE, "max_sessions_per_user": 2}},
            state=state,
        )
        procs = []
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            procs.append(CandelaProcess(d, cfg, env=candela_env(tokens, d)).start())
        a, b = procs
        try:
            one, two = WsClient(a.port, REALTIME, ALICE), WsClient(b.port, REALTIME, ALICE)
            assert one.status == 101 and two.status == 101
            for proxy in (a, b):  # each proxy holds one: the user has two, the most allowed
                third = WsClient(proxy.port, REALTIME, ALICE)
                assert third.status == 429
                assert third.rejection["error"] == "websocket_sessions_exceeded"
            assert len(fake.sessions) == 2  # the refused upgrades never reached the provider
            two.close()  # a session ended on b frees a place a can give
            deadline = time.monotonic() + WAIT_S
            while True:
                again = WsClient(a.port, REALTIME, ALICE)
                if again.status == 101 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert again.status == 101
            assert WsClient(b.port, REALTIME, ALICE).status == 429
            # a dies holding both places: its next start frees them
            a.stop(kill=True)
            one.drop()
            again.drop()
            assert WsClient(b.port, REALTIME, ALICE).status == 429
            a.start()
            three, four = WsClient(b.port, REALTIME, ALICE), WsClient(a.port, REALTIME, ALICE)
            assert three.status == 101 and four.status == 101
            three.close()
            four.close()
        finally:
            for proxy in procs:
                proxy.stop()


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, fake: FakeRealtime) -> Iterator[CandelaProcess]:
    """A proxy with small session bounds: 2 KB messages, 5 messages a second, 1 s idle."""
    tmp = tmp_path_factory.mktemp("candela-ws-tight")
    with FakeTokenServer() as tokens:
        cfg = base_config(
            fake.url,
            users={USER: {"tenants": ["research-team"], "requests_per_minute": 100_000}},
            governance={
                "budgets": {"default_daily_usd": 1000.0},
                "websocket": {
                    "reserve_usd": SLICE,
                    "max_frame_bytes": 2048,
                    "frames_per_second": 5,
                    "idle_timeout_s": 1.0,
                },
            },
        )
        with CandelaProcess(tmp, cfg, env=candela_env(tokens, tmp)) as c:
            yield c


def _refused_with(client: WsClient, code: str, close: int = 1008) -> None:
    err = client.recv()
    assert err["type"] == "error" and err["error"]["code"] == code
    with pytest.raises(Closed) as closed:
        client.recv()
    assert closed.value.code == close


def test_a_frame_over_the_size_limit_closes_the_session_unforwarded(tight, fake):
    client = WsClient(tight.port, REALTIME, ALICE)
    client.recv()
    client.send({"type": "input_audio_buffer.append", "audio": "A" * 4096})
    _refused_with(client, "websocket_frame_too_large", close=1009)
    s = fake.last()
    assert s.ended.wait(WAIT_S) and s.frames == []
    assert session_entry(tight, client)["ended_by"] == "frame_too_large"


def test_too_many_frames_a_second_close_the_session(tight, fake):
    client = WsClient(tight.port, REALTIME, ALICE)
    client.recv()  # session.created: one frame of this second, or of the one before
    # 12 at once: whichever second boundary falls among them, one second holds more than 5
    for _ in range(12):
        client.send({"type": "input_audio_buffer.append", "audio": "AAAA"})
    events = client.recv_until(is_type("error"))
    assert events[-1]["error"]["code"] == "websocket_rate_limited"
    with pytest.raises(Closed):
        client.recv()
    s = fake.last()
    assert s.ended.wait(WAIT_S) and len(s.frames) < 12  # the refused frames never left
    assert session_entry(tight, client)["ended_by"] == "rate_limited"


def test_an_idle_session_is_closed(tight, fake):
    client = WsClient(tight.port, REALTIME, ALICE)
    client.recv()
    _refused_with(client, "websocket_idle_timeout")  # nothing sent: the session times out
    e = session_entry(tight, client)
    # nothing was forwarded: the slice is given back, nothing is charged
    assert e["ended_by"] == "idle" and e["usage_source"] is None and e["cost_usd"] == 0


# --- requests and tokens per minute ----------------------------------------------------------


def _key(name: str) -> str:
    return f"cdl_{name}_key"


LIMITED_USERS = {
    # requests_per_minute 3: the upgrade, then two requests for work
    "rpm-rt@example.com": {"requests_per_minute": 3},
    "rpm-resp@example.com": {"requests_per_minute": 3},
    "rpm-live@example.com": {"requests_per_minute": 3},
    "vad@example.com": {"requests_per_minute": 3},
    "tpm@example.com": {"requests_per_minute": 1000, "output_tokens_per_minute": 50},
    "voice-a@example.com": {"requests_per_minute": 1000, "tenants": ["voice"]},
    "voice-b@example.com": {"requests_per_minute": 1000, "tenants": ["voice"]},
    # the user's budget is the default $1000; the tenant's $0.05 a month
    "pennies@example.com": {"requests_per_minute": 1000, "tenants": ["pennies"]},
}


def as_user(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {_key(name.split('@')[0])}"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, fake: FakeRealtime) -> Iterator[CandelaProcess]:
    """A proxy whose users have small request and token limits, and a tenant with a token limit."""
    from .conftest import sha

    tmp = tmp_path_factory.mktemp("candela-ws-limits")
    with FakeTokenServer() as tokens:
        cfg = base_config(fake.url, users=LIMITED_USERS)
        cfg["auth"]["api_keys"] += [
            {"sha256": sha(_key(u.split("@")[0])), "user": u} for u in LIMITED_USERS
        ]
        cfg["governance"]["tenants"] = {
            "voice": {"total_tokens_per_minute": 300},
            "pennies": {"budget_usd": 0.05, "period": "monthly"},
        }
        cfg["governance"]["websocket"] = {"reserve_usd": SLICE}
        with CandelaProcess(tmp, cfg, env=candela_env(tokens, tmp)) as c:
            yield c


def _limit_error(protocol: str, event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(code, fields) of a rate-limit error event in each provider's shape."""
    if protocol == "openai-realtime":
        return event["error"]["code"], event["error"]
    if protocol == "openai-responses":
        return event["code"], event
    info = event["error"]["details"][0]
    return info["reason"], info["metadata"]


WORK = {
    "openai-realtime": (REALTIME, None, {"type": "response.create"}),
    "openai-responses": (RESPONSES, None, {"type": "response.create", "model": "gpt-4.1"}),
    "gemini-live": (
        LIVE,
        {"setup": {"model": f"models/{LIVE_MODEL}"}},
        {"clientContent": {"turns": [{"role": "user", "parts": [{"text": "hi"}]}],
                           "turnComplete": True}},
    ),
}


def _open(port: int, protocol: str, headers: dict[str, str]) -> WsClient:
    path, first, _ = WORK[protocol]
    client = WsClient(port, path, headers)
    assert client.status == 101, client.rejection
    if protocol == "openai-realtime":
        assert client.recv()["type"] == "session.created"
    if first is not None:
        client.send(first)
        assert "setupComplete" in client.recv()
    return client


def _work(client: WsClient, protocol: str) -> list[dict[str, Any]]:
    """One request for work; the events up to its usage frame, or to an error event."""
    client.send(WORK[protocol][2])
    return client.recv_until(
        lambda e: "usageMetadata" in e or "error" in e
        or e.get("type") in ("response.done", "response.completed", "error")
    )


def _requests(s: Any) -> list[dict[str, Any]]:
    return [f for f in s.frames if "setup" not in f]


@pytest.mark.parametrize(
    "protocol, user",
    [
        ("openai-realtime", "rpm-rt@example.com"),
        ("openai-responses", "rpm-resp@example.com"),
        ("gemini-live", "rpm-live@example.com"),
    ],
)
def test_each_request_for_work_counts_against_requests_per_minute(limited, fake, protocol, user):
    client = _open(limited.port, protocol, as_user(user))  # the upgrade: 1 of 3
    for _ in range(2):  # 2 and 3 of 3
        assert "error" not in json.dumps(_work(client, protocol)[-1])
    last = _work(client, protocol)[-1]  # the fourth in the minute
    code, fields = _limit_error(protocol, last)
    assert code == "rate_limited" and fields["limit_kind"] == "requests"
    assert str(fields["limit"]) == "3"
    with pytest.raises(Closed) as closed:
        client.recv()
    assert closed.value.code == 1008
    s = fake.last()
    assert s.ended.wait(WAIT_S) and s.close_code == 1008
    assert len(_requests(s)) == 2  # the refused request never reached the provider
    e = session_entry(limited, client)
    assert e["ended_by"] == "rate_limited" and e["error"] == "rate_limited"
    # an HTTP request of the same user shares the minute's window
    again = WsClient(limited.port, WORK[protocol][0], as_user(user))
    assert again.status == 429 and again.rejection["limit_kind"] == "requests"


def test_a_response_the_provider_starts_itself_counts_when_its_usage_arrives(limited, fake):
    # Live audio is answered on its own (voice-activity detection): no client frame asks for
    # the turn, its usage frame counts it; the third such turn in the minute ends the session
    client = _open(limited.port, "gemini-live", as_user("vad@example.com"))  # 1 of 3
    audio = {"realtimeInput": {"audio": {"data": "AAAA", "mimeType": "audio/pcm"}}}
    for _ in range(2):  # turns 2 and 3 of 3
        client.send(audio)
        assert "usageMetadata" in client.recv_until(lambda e: "usageMetadata" in e)[-1]
    client.send(audio)
    events = client.recv_until(lambda e: "error" in e)
    assert "usageMetadata" in events[-2]  # the turn's answer reached the client, then the cut
    code, fields = _limit_error("gemini-live", events[-1])
    assert code == "rate_limited" and fields["limit_kind"] == "requests"
    with pytest.raises(Closed) as closed:
        client.recv()
    assert closed.value.code == 1008
    s = fake.last()
    assert s.ended.wait(WAIT_S) and s.close_code == 1008 and len(_requests(s)) == 3


def test_usage_past_the_token_limit_ends_the_session_after_its_frame(limited, fake):
    fake.usage = RtUsage(input_text=10, output_text=30)
    client = _open(limited.port, "openai-responses", as_user("tpm@example.com"))
    assert _work(client, "openai-responses")[-1]["type"] == "response.completed"  # 30 of 50
    events = _work(client, "openai-responses")  # 60 of 50
    assert events[-1]["type"] == "response.completed"  # the usage frame reaches the client
    err = client.recv()
    code, fields = _limit_error("openai-responses", err)
    assert code == "rate_limited" and fields["limit_kind"] == "output_tokens"
    assert fields["scope"] == "user" and fields["limit"] == 50
    with pytest.raises(Closed) as closed:
        client.recv()
    assert closed.value.code == 1008
    s = fake.last()
    assert s.ended.wait(WAIT_S) and s.close_code == 1008 and len(s.frames) == 2
    e = session_entry(limited, client)
    assert e["ended_by"] == "rate_limited" and e["output_tokens"] == 60
    # the window is past its limit: the next session's request is refused before it leaves
    fake.reset()
    client = WsClient(limited.port, RESPONSES, as_user("tpm@example.com"))
    assert client.status == 429 and client.rejection["limit_kind"] == "output_tokens"
    assert fake.sessions == []


def test_the_tenants_token_limit_counts_every_session_of_its_users(limited, fake):
    fake.usage = RtUsage(input_text=100, output_text=20)  # 120 tokens a turn; the tenant: 300
    a = _open(limited.port, "gemini-live", as_user("voice-a@example.com"))
    b = _open(limited.port, "gemini-live", as_user("voice-b@example.com"))
    sa, sb = fake.sessions[-2], fake.sessions[-1]
    assert "usageMetadata" in _work(a, "gemini-live")[-1]  # 120
    assert "usageMetadata" in _work(b, "gemini-live")[-1]  # 240
    events = _work(a, "gemini-live")  # 360 of 300: a's turn is answered, then a is cut
    assert "usageMetadata" in events[-1]
    code, fields = _limit_error("gemini-live", a.recv())
    assert code == "rate_limited"
    assert (fields["limit_kind"], fields["scope"]) == ("total_tokens", "tenant")
    with pytest.raises(Closed):
        a.recv()
    # b's next turn finds the tenant's window full: refused before it is forwarded
    code, fields = _limit_error("gemini-live", _work(b, "gemini-live")[-1])
    assert code == "rate_limited" and fields["scope"] == "tenant"
    with pytest.raises(Closed) as closed:
        b.recv()
    assert closed.value.code == 1008
    assert sb.ended.wait(WAIT_S) and len(_requests(sb)) == 1
    assert sa.ended.wait(WAIT_S) and len(_requests(sa)) == 2


def test_a_session_is_cut_when_its_tenants_budget_runs_out_though_its_user_has_budget(
    limited, fake
):
    from candela_mitm.governance.periods import BudgetPeriod

    user = "pennies@example.com"
    # the tenant's budget is $0.05 and a slice $0.05: each response costs about a third of it
    fake.usage = RtUsage(input_text=1000, output_audio=200)
    one = cost("gpt-realtime", fake.usage, "openai-realtime")
    assert 0.05 / 3 < one * 1.01 and one * 2 < 0.05
    led = ledger_of(limited)
    client = WsClient(limited.port, REALTIME, as_user(user))
    assert client.status == 101, client.rejection
    client.recv()
    done = 0
    error = None
    with pytest.raises(Closed) as closed:
        for _ in range(10):  # the user's $1000 alone would fund hundreds of thousands
            client.send({"type": "response.create"})
            for ev in client.recv_until(lambda e: e.get("type") in ("response.done", "error")):
                if ev["type"] == "response.done":
                    done += 1
                elif ev["type"] == "error":
                    error = ev
                    client.recv()  # the close follows the error event
    assert closed.value.code == 1008
    assert error is not None
    fields = error["error"]
    assert (fields["code"], fields["scope"], fields["tenant_id"], fields["period"]) == (
        "budget_exceeded", "tenant", "pennies", "monthly"
    )
    assert fields["user_id"] == user and fields["budget_usd"] == 0.05
    assert fields["remaining_usd"] < one and fields["resets_at"].endswith("-01T00:00:00Z")
    s = fake.last()
    assert s.ended.wait(WAIT_S) and s.close_code == 1008
    # every frame the fake got was answered and paid for: nothing after the cut reached it
    assert len(s.frames) == done and done == 3
    e = session_entry(limited, client)
    assert e["ended_by"] == "budget" and e["error"] == "budget_exceeded"
    settled(led, user)
    tenant = led.tenant_status("pennies", 0.05, BudgetPeriod("monthly"))
    assert tenant.spent_usd == pytest.approx(done * one, rel=1e-6) and tenant.reserved_usd == 0
    assert led.status(user, 1000.0).spent_usd == pytest.approx(done * one, rel=1e-6)
    # the next upgrade is refused at the door, by the tenant's budget
    fake.reset()
    again = WsClient(limited.port, REALTIME, as_user(user))
    assert again.status == 402 and again.rejection["error"] == "budget_exceeded"
    assert again.rejection["scope"] == "tenant"
    assert fake.sessions == []


# --- real clients, unchanged ---------------------------------------------------------------

SDK_REALTIME = """
import asyncio, json, os
from openai import AsyncOpenAI

async def main():
    client = AsyncOpenAI(api_key=os.environ["KEY"], base_url=os.environ["BASE"])
    try:
        async with client.realtime.connect(model=os.environ["MODEL"]) as conn:
            first = await conn.recv()
            print(json.dumps({"event": first.type}))
            await conn.response.create()
            async for event in conn:
                print(json.dumps({"event": event.type}))
                if event.type == "response.done":
                    print(json.dumps({"usage": event.response.usage.model_dump()}))
                    break
    except Exception as e:
        print(json.dumps({"refused": type(e).__name__, "detail": str(e)[:300]}))

asyncio.run(main())
"""


def test_the_openai_sdk_realtime_client_works_unchanged(proxy, fake, sdk):
    from .conftest import sdk_json

    fake.usage = RtUsage(input_text=40, input_audio=0, output_text=7, output_audio=0)
    env = {"KEY": ALICE_KEY, "BASE": proxy.url + "/proxy/openai/v1", "MODEL": "gpt-realtime"}
    out = sdk_json(SDK_REALTIME, env=env)
    events = [o["event"] for o in out if "event" in o]
    assert events[0] == "session.created" and events[-1] == "response.done", out
    usage = next(o["usage"] for o in out if "usage" in o)
    assert usage["input_tokens"] == 40 and usage["output_tokens"] == 7
    s = fake.last()
    assert s.query["model"] == ["gpt-realtime"] and [f["type"] for f in s.frames] == ["response.create"]
    assert s.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    # a model the policy denies: refused at the upgrade, the SDK sees the 403
    fake.reset()
    out = sdk_json(SDK_REALTIME, env={**env, "MODEL": "gpt-4o-realtime-preview"})
    assert "refused" in out[0] and "403" in out[0]["detail"], out
    assert fake.sessions == []


NODE_WS = Path(__file__).resolve().parents[2] / ".node-ws" / "node_modules"
NODE_CLIENT = """
const WebSocket = require("ws");
const ws = new WebSocket(process.env.URL, {headers: {Authorization: "Bearer " + process.env.KEY}});
const seen = [];
ws.on("message", (data) => {
  const e = JSON.parse(data.toString());
  seen.push(e.type);
  if (e.type === "session.created") ws.send(JSON.stringify({type: "response.create"}));
  if (e.type === "response.done") {
    console.log(JSON.stringify({seen, usage: e.response.usage}));
    ws.close(1000);
  }
});
ws.on("unexpected-response", (req, res) => { console.log(JSON.stringify({status: res.statusCode})); process.exit(0); });
ws.on("error", (err) => { console.log(JSON.stringify({error: String(err)})); process.exit(1); });
"""


def test_a_node_ws_client_works_unchanged(proxy, fake):
    if not (NODE_WS / "ws" / "package.json").is_file():
        require("the Node ws client: run scripts/node-ws.sh (make test does)")
    fake.usage = RtUsage(input_text=12, input_audio=0, output_text=3, output_audio=0)
    url = f"ws://127.0.0.1:{proxy.port}{REALTIME}"
    env = {**os.environ, "NODE_PATH": str(NODE_WS), "URL": url, "KEY": ALICE_KEY}
    proc = subprocess.run(["node", "-e", NODE_CLIENT], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["seen"][0] == "session.created" and out["seen"][-1] == "response.done"
    assert out["usage"]["input_tokens"] == 12
    assert [f["type"] for f in fake.last().frames] == ["response.create"]
    denied = subprocess.run(
        ["node", "-e", NODE_CLIENT],
        env={**env, "URL": url.replace("gpt-realtime", "gpt-4o-realtime-preview")},
        capture_output=True, text=True, timeout=30,
    )
    assert json.loads(denied.stdout.strip().splitlines()[-1]) == {"status": 403}
    assert len(fake.sessions) == 1  # the denied one never reached the provider
