"""RateLimit addon: requests per user per minute (429), with Budget's reservation in the same store trip."""

from __future__ import annotations

import asyncio
import time

import pytest

from candela_mitm.addons.auth import Auth
from candela_mitm.addons.budget import Budget
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.addons.ratelimit import RateLimit
from candela_mitm.addons.router import Router
from candela_mitm.governance.ledger import BudgetRefusal, Reservation
from tests.wait import WAIT_S, until_async

from .conftest import ALICE_KEY, BASE, make_flow, run_hooks

ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
USER = "alice@example.com"


def config(rpm=None, budget=None, default_rpm=None):
    user = {"tenants": ["research-team"]}
    if rpm is not None:
        user["requests_per_minute"] = rpm
    if budget is not None:
        user["daily_budget_usd"] = budget
    gov = {"rate_limits": {"default_requests_per_minute": default_rpm}} if default_rpm is not None else {}
    return {**BASE, "users": {USER: user}, "governance": gov}


def chat(model="gpt-4o-mini", path="/proxy/openai/v1/chat/completions"):
    body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    return make_flow(path, body, headers=ALICE)


async def send(rt, flows, with_budget=False):
    addons = [Router(rt), Auth(rt), RateLimit(rt)] + ([Budget(rt)] if with_budget else [])
    for f in flows:
        await run_hooks(addons, f, "requestheaders", "request")
    return flows


def statuses(flows):
    return [f.response.status_code if f.response else None for f in flows]


# the user's limit, the default, requests in the same minute -> what each got
@pytest.mark.parametrize(
    "rpm, default_rpm, n, expected",
    [
        (2, None, 3, [None, None, 429]),
        (1, None, 2, [None, 429]),
        (0, None, 1, [429]),  # a limit of 0 admits nothing
        (None, 3, 4, [None, None, None, 429]),  # the default applies to a user without one
        (5, 1, 3, [None, None, None]),  # the user's own limit wins over the default
    ],
)
def test_the_window_admits_the_limit_and_refuses_the_rest(tctx, runtime, rpm, default_rpm, n, expected):
    rt = runtime(config(rpm, default_rpm=default_rpm))
    flows = asyncio.run(send(rt, [chat() for _ in range(n)]))
    assert statuses(flows) == expected
    limit = rpm if rpm is not None else default_rpm
    for f in flows:
        if f.response is None:
            continue
        body = f.response.json()
        assert body["error"] == "rate_limited" and body["limit"] == limit
        assert f.response.headers["Retry-After"] == str(body["retry_after_s"])
        assert 0 <= body["retry_after_s"] <= 60
        assert ctx_of(f).denial_code == "rate_limited"
    assert rt.metrics.rate_limited.labels("research-team")._value.get() == expected.count(429)


def test_the_window_is_per_user(tctx, runtime):
    bob_key = "cdl_bob_example_key_0123456789"
    import hashlib

    cfg = config(rpm=1)
    cfg["auth"] = {"api_keys": [*BASE["auth"]["api_keys"],
                                {"sha256": hashlib.sha256(bob_key.encode()).hexdigest(), "user": "bob@example.com"}]}
    cfg["users"]["bob@example.com"] = {"requests_per_minute": 1}
    rt = runtime(cfg)
    bob = make_flow("/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"},
                    headers={"Authorization": f"Bearer {bob_key}"})
    flows = asyncio.run(send(rt, [chat(), bob, chat()]))
    assert statuses(flows) == [None, None, 429]


def test_an_admitted_request_carries_budgets_reservation(tctx, runtime):
    rt = runtime(config(rpm=5, budget=10.0))
    [f] = asyncio.run(send(rt, [chat()]))
    c = ctx_of(f)
    assert f.response is None
    assert isinstance(c.reservation, Reservation) and c.reserve_result is c.reservation
    assert c.reservation.user_id == USER and c.reservation.amount_usd == pytest.approx(c.estimate_usd)
    assert c.estimate_usd > 0
    status = rt.ledger.status(USER, 10.0)
    assert status.reserved_usd == pytest.approx(c.estimate_usd)
    assert "candela" in f.metadata and set(f.metadata) == {"candela"}  # no side channel


def test_a_refused_reservation_is_left_for_budget_to_answer(tctx, runtime):
    rt = runtime(config(rpm=5, budget=0.0))
    [alone] = asyncio.run(send(rt, [chat()]))
    c = ctx_of(alone)
    assert alone.response is None  # RateLimit admits it; the 402 is Budget's to answer
    assert isinstance(c.reserve_result, BudgetRefusal) and c.reservation is None
    [judged] = asyncio.run(send(rt, [chat()], with_budget=True))
    assert judged.response.status_code == 402
    assert judged.response.json()["error"] == "budget_exceeded"
    assert ctx_of(judged).reserve_result is None  # taken by Budget


def test_a_rate_limited_request_reserves_nothing(tctx, runtime):
    rt = runtime(config(rpm=1, budget=10.0))
    flows = asyncio.run(send(rt, [chat(), chat()], with_budget=True))
    assert statuses(flows) == [None, 429]
    limited = ctx_of(flows[1])
    assert limited.reservation is None and limited.reserve_result is None
    assert limited.estimate_usd == 0.0  # an unreserved request audits no estimate
    assert rt.ledger.status(USER, 10.0).reserved_usd == pytest.approx(ctx_of(flows[0]).estimate_usd)


def test_a_local_model_is_limited_but_reserves_nothing(tctx, runtime):
    cfg = config(rpm=1)  # candela-server routes to Ollama only where providers: configures it
    cfg["providers"] = {**cfg["providers"], "ollama": {"base_url": "http://127.0.0.1:11434"}}
    rt = runtime(cfg)
    flows = asyncio.run(send(rt, [chat("llama3.2", "/proxy/ollama/api/chat") for _ in range(2)]))
    assert statuses(flows) == [None, 429]
    assert ctx_of(flows[0]).reservation is None and ctx_of(flows[0]).reserve_result is None


# -- concurrency, tokens per minute, IETF headers -------------------------------------------------


def limits_config(**user_limits):
    cfg = config(rpm=100)
    cfg["users"][USER].update(user_limits)
    return cfg


def big_chat(max_tokens):
    body = {"model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    return make_flow("/proxy/openai/v1/chat/completions", body, headers=ALICE)


async def end(rt, flows):
    """The requests end (a response each, as Candela's own answer would be)."""
    from mitmproxy import http

    for f in flows:
        if f.response is None:
            f.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
        await run_hooks([RateLimit(rt)], f, "response")


def test_concurrency_limit_counts_requests_in_flight(tctx, runtime):
    rt = runtime(limits_config(max_concurrent_requests=2))
    flows = asyncio.run(send(rt, [chat() for _ in range(3)]))
    assert statuses(flows) == [None, None, 429]
    body = flows[2].response.json()
    assert (body["limit_kind"], body["limit"], body["retry_after_s"]) == ("concurrency", 2, 1)
    assert flows[2].response.headers["Retry-After"] == "1"
    assert 'concurrency";q=2' in flows[2].response.headers["RateLimit-Policy"]
    assert len(rt.store.leases()) == 2
    asyncio.run(end(rt, flows[:1]))  # one ends: its place is free at once
    assert len(rt.store.leases()) == 1
    [again] = asyncio.run(send(rt, [chat()]))
    assert again.response is None
    asyncio.run(end(rt, [flows[1], again]))
    assert rt.store.leases() == []


def test_token_limit_refuses_an_estimate_that_does_not_fit(tctx, runtime):
    rt = runtime(limits_config(output_tokens_per_minute=1000))
    flows = asyncio.run(send(rt, [big_chat(600), big_chat(600), big_chat(400)]))
    assert statuses(flows) == [None, 429, None]
    body = flows[1].response.json()
    assert body["error"] == "rate_limited" and body["limit_kind"] == "output_tokens"
    assert body["limit"] == 1000 and 1 <= body["retry_after_s"] <= 60
    assert flows[1].response.headers["Retry-After"] == str(body["retry_after_s"])
    # what the window held: the admitted estimates, nothing of the refused one
    assert ctx_of(flows[0]).admission.estimated == {"output_tokens": 600}


def test_an_estimate_above_the_limit_waits_a_whole_window(tctx, runtime):
    rt = runtime(limits_config(total_tokens_per_minute=100))
    [f] = asyncio.run(send(rt, [big_chat(500)]))
    body = f.response.json()
    assert (body["limit_kind"], body["retry_after_s"]) == ("total_tokens", 60)


def test_settlement_corrects_the_estimate_to_the_usage(tctx, runtime):
    rt = runtime(limits_config(output_tokens_per_minute=1000))
    [first] = asyncio.run(send(rt, [big_chat(900)]))
    assert first.response is None
    c = ctx_of(first)
    # the request used 20 output tokens, not 900: its entry is corrected at the end
    rt.limiter.finish(c.admission, (10, 20))
    c.admission = None
    [second] = asyncio.run(send(rt, [big_chat(900)]))
    assert second.response is None
    # a request that ends with nothing read (never forwarded) gives its whole estimate back
    asyncio.run(end(rt, [second]))
    [third] = asyncio.run(send(rt, [big_chat(980)]))
    assert third.response is None


def test_token_refusal_gives_the_concurrency_lease_back(tctx, runtime):
    rt = runtime(limits_config(max_concurrent_requests=5, input_tokens_per_minute=1))
    [f] = asyncio.run(send(rt, [chat()]))
    assert f.response.json()["limit_kind"] == "input_tokens"
    assert rt.store.leases() == []


def test_ratelimit_headers_on_admitted_and_denied_answers(tctx, runtime):
    rt = runtime(limits_config(requests_per_minute=3, max_concurrent_requests=4,
                               total_tokens_per_minute=10_000, daily_budget_usd=0.0))
    flows = asyncio.run(send(rt, [chat() for _ in range(4)], with_budget=True))
    assert statuses(flows) == [402, 402, 402, 429]  # budget 0: each admitted one is a 402
    asyncio.run(end(rt, flows))
    first = flows[0].response.headers
    assert first["RateLimit-Policy"] == (
        '"requests";q=3;w=60, "concurrency";q=4, "total_tokens";q=10000;w=60'
    )
    assert first["RateLimit"].startswith('"requests";r=2;t=60, "concurrency";r=3, "total_tokens";r=')
    assert flows[2].response.headers["RateLimit"].startswith('"requests";r=0;t=60')
    limited = flows[3].response.headers
    assert limited["RateLimit-Policy"] == '"requests";q=3;w=60'
    assert limited["RateLimit"] == '"requests";r=0;t=60'


def test_tenant_token_limit_refuses_with_scope_tenant(tctx, runtime):
    cfg = limits_config()
    cfg["governance"] = {"tenants": {"research-team": {"output_tokens_per_minute": 500}}}
    rt = runtime(cfg)
    flows = asyncio.run(send(rt, [big_chat(400), big_chat(400)]))
    assert statuses(flows) == [None, 429]
    body = flows[1].response.json()
    assert (body["limit_kind"], body["scope"], body["limit"]) == ("output_tokens", "tenant", 500)
    assert '"tenant_output_tokens";q=500;w=60' in flows[1].response.headers["RateLimit-Policy"]


def test_tenant_concurrency_limit_refuses_with_scope_tenant(tctx, runtime):
    cfg = limits_config(max_concurrent_requests=5)
    cfg["governance"] = {"tenants": {"research-team": {"max_concurrent_requests": 2}}}
    rt = runtime(cfg)
    flows = asyncio.run(send(rt, [chat() for _ in range(3)], with_budget=True))
    assert statuses(flows) == [None, None, 429]
    body = flows[2].response.json()
    assert (body["error"], body["limit_kind"], body["scope"], body["limit"]) == (
        "rate_limited", "concurrency", "tenant", 2
    )
    assert body["retry_after_s"] == 1 and flows[2].response.headers["Retry-After"] == "1"
    assert flows[2].response.headers["RateLimit-Policy"] == (
        '"requests";q=100;w=60, "concurrency";q=5, "tenant_concurrency";q=2'
    )
    assert ctx_of(flows[2]).reservation is None  # refused before anything was reserved
    # two requests hold a user's and a tenant's place each; the refused one gave its user's back
    assert len(rt.store.leases()) == 4
    asyncio.run(end(rt, flows[:1]))  # one ends: its places are free at once
    [again] = asyncio.run(send(rt, [chat()]))
    assert again.response is None
    asyncio.run(end(rt, [flows[1], again]))
    assert rt.store.leases() == []


def large_chat():
    pad = "x " * 200_000  # over LARGE_BODY_BYTES
    body = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": pad}]}
    return make_flow("/proxy/openai/v1/chat/completions", body, headers=ALICE)


def test_a_large_body_is_rate_limited_from_its_head_before_it_is_parsed(tctx, runtime, monkeypatch):
    from candela_mitm.addons import router

    parsed: list[int] = []
    real_loads, real_sliced = router.json.loads, router.loads_sliced
    monkeypatch.setattr(router.json, "loads", lambda raw: parsed.append(len(raw)) or real_loads(raw))
    # a large body is read in slices (providers/jsonbody.py)
    monkeypatch.setattr(
        router, "loads_sliced", lambda raw: parsed.append(len(raw)) or real_sliced(raw)
    )
    rt = runtime(config(rpm=1))
    first, second = large_chat(), large_chat()
    addons = [Router(rt), Auth(rt), RateLimit(rt)]
    asyncio.run(run_hooks(addons, first, "requestheaders"))
    assert first.response is None and ctx_of(first).rate_decided  # counted from the head
    asyncio.run(run_hooks(addons, first, "request"))
    assert first.response is None and ctx_of(first).plan is not None  # not counted twice
    assert ctx_of(first).scan is not None and ctx_of(first).scan.chars >= 400_000  # in slices
    asyncio.run(run_hooks(addons, second, "requestheaders", "request"))
    assert second.response.status_code == 429 and second.response.json()["error"] == "rate_limited"
    assert len([n for n in parsed if n > 100_000]) == 1  # the refused one's body was never parsed


def test_a_small_body_is_rate_limited_with_its_reservation(tctx, runtime):
    rt = runtime(config(rpm=5))
    f = chat()
    asyncio.run(send(rt, [f]))
    assert not ctx_of(f).rate_decided and ctx_of(f).scan is None


def _first_poll(rt):
    """Wait for the settings watch's first poll, which forgets what was read before it: past
    it, a settings read would be a store call the counting tests did not make (on a loaded
    machine the poller's thread may come late)."""
    poller = rt.settings_poller
    deadline = time.monotonic() + WAIT_S
    while poller is not None and poller.polls + poller.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.005)


def _counted_runtime(runtime, cfg):
    """A runtime with slices and blocks of 8, and the names of its hot-path store calls."""
    cfg["governance"] = {
        "budgets": {"slices": {"enabled": True, "requests": 8}},
        "rate_limits": {"leases": {"enabled": True, "requests": 8}},
    }
    rt = runtime(cfg)
    _first_poll(rt)
    calls = []
    real = rt.calls.call

    async def counted(fn, *args):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args)

    rt.calls.call = counted
    return rt, calls


def test_with_slices_and_leases_a_request_makes_no_store_call_before_it_leaves(tctx, runtime):
    """Issue 21: after one request checked and reserved in the store, the next ones are
    admitted from this process's rate block with their hold carved from its budget slice:
    nothing in the store until the flushes (governance/slices.py, rate_leases.py)."""
    rt, calls = _counted_runtime(runtime, config(rpm=1000, budget=100.0))  # every hot-path store call
    real_blocking = rt.blocking

    async def counted_blocking(fn, *args):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real_blocking(fn, *args)

    rt.blocking = counted_blocking  # and every other call off the loop (settings reads)

    async def go():
        rl, budget = RateLimit(rt), Budget(rt)
        addons = [Router(rt), Auth(rt), rl, budget]
        for first in (chat(), chat()):  # a budget used twice within idle_s is sliced
            await run_hooks(addons, first, "requestheaders", "request")
            assert first.response is None and not ctx_of(first).reservation.slice
        # the slice and the block, taken in the background (a pool thread: waited for, up to
        # 30 s on a loaded machine, not 0.2 s)
        await until_async(lambda: bool(rt.slices.held() and rt.rate_leases.held()),
                          what="a slice and a rate block held")
        assert rt.slices.held() == 1 and rt.rate_leases.held() == 1
        before = len(calls)
        later = [chat() for _ in range(5)]
        for f in later:
            await run_hooks(addons, f, "requestheaders", "request")
        # not one store call (the background flushes of the slices and blocks aside)
        assert [c for c in calls[before:] if c != "flush"] == []
        assert statuses(later) == [None] * 5
        for f in later:
            c = ctx_of(f)
            assert c.reservation.slice and c.slice_id == c.reservation.slice
            assert c.rate_headers["RateLimit-Policy"] == '"requests";q=1000;w=60'
        return later

    later = asyncio.run(go())
    assert len(later) == 5
    status = rt.ledger.status(USER, 100.0)
    assert status.reserved_usd > 0  # the first request's hold and the slice


@pytest.mark.parametrize(
    "fields, large",
    [
        ([], False),
        ([(b"Content-Length", b"10")], False),
        ([(b"content-length", str(300 * 1024).encode())], True),
        ([(b"Transfer-Encoding", b"Chunked")], True),
        ([(b"Content-Length", b"nope")], False),
        ([(b"Content-Length", b"10"), (b"content-length", b"10")], False),  # "10, 10": Router's 400
    ],
)
def test_large_body_reads_the_head(fields, large) -> None:
    from mitmproxy.test import tflow

    from candela_mitm.addons.ratelimit import large_body

    f = tflow.tflow()
    f.request.headers.fields = tuple(fields)
    assert large_body(f.request.headers) is large


def test_the_next_slice_and_block_are_taken_before_these_run_out(tctx, runtime):
    """Issue 21 (ahead): with slices and blocks of 8, 40 requests in a row: after the first two
    none makes a store call before it leaves (the next slice and block were taken in the
    background while the ones in use still had room), every hold carved."""
    # the admission's store call is `call`; the asks `reserve`, `take`
    rt, calls = _counted_runtime(runtime, config(rpm=100_000, budget=100.0))

    async def go():
        addons = [Router(rt), Auth(rt), RateLimit(rt), Budget(rt)]
        flows = []
        for _ in range(40):
            f = chat()
            before = len(calls)
            await run_hooks(addons, f, "requestheaders", "request")
            assert f.response is None
            flows.append((f, calls[before:]))
            # the background asks, when one was made, are store calls (a pool thread: waited
            # for, not 0.1 s at most)
            await until_async(lambda: not rt.slices._taking and not rt.rate_leases._taking,
                              what="the background asks answered")
        return flows

    flows = asyncio.run(go())
    assert [c for c in flows[0][1] + flows[1][1] if c == "call"] == ["call", "call"]
    on_path = [(i, c) for i, (_, got) in enumerate(flows[2:], 2) for c in got if c == "call"]
    assert on_path == []
    assert all(ctx_of(f).reservation.slice for f, _ in flows[2:])
    assert len({ctx_of(f).reservation.slice for f, _ in flows[2:]}) >= 2  # more than one slice
    assert "take" in calls and calls.count("reserve") >= 2  # the blocks and slices asked


def test_the_tenants_settings_are_read_ahead_so_requests_stay_in_memory(tctx, runtime):
    """The tenant's settings (remembered 1 s) are read again in the background before they
    expire: over 4 s of the settings cache's clock no request after the first two makes a store
    call before it leaves (without the read ahead, the first request after each expiry finds no
    tenant settings at hand and reserves and checks in the store)."""
    cfg = config(rpm=100_000, budget=100.0)
    cfg["governance"] = {
        "budgets": {"slices": {"enabled": True, "requests": 8}},
        "rate_limits": {"leases": {"enabled": True, "requests": 8}},
    }
    rt = runtime(cfg)
    now = [1000.0]
    rt.users.clock = lambda: now[0]
    calls = []
    real = rt.calls.call

    async def counted(fn, *args):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args)

    rt.calls.call = counted

    async def go():
        addons = [Router(rt), Auth(rt), RateLimit(rt), Budget(rt)]
        flows = []
        for _ in range(40):
            f = chat()
            before = len(calls)
            await run_hooks(addons, f, "requestheaders", "request")
            flows.append((f, calls[before:]))
            # the background asks and reads (a pool thread: waited for, not 0.1 s at most)
            await until_async(
                lambda: not rt.slices._taking and not rt.rate_leases._taking
                and not rt._reading_ahead,
                what="the background asks answered",
            )
            now[0] += 0.1  # ten requests a second of the cache's clock
        return flows

    flows = asyncio.run(go())
    assert ctx_of(flows[0][0]).tenant == "research-team"
    on_path = [(i, c) for i, (_, got) in enumerate(flows[2:], 2) for c in got if c == "call"]
    assert on_path == []
    assert all(ctx_of(f).reservation.slice for f, _ in flows[2:])


def test_an_idle_users_settings_are_read_ahead_so_none_is_read_on_its_path(
    tctx, runtime, monkeypatch
):
    """Issue 21 (scenario 3's pattern): a user sending a request every 20 s, with the settings
    watch current (settings remembered 60 s): after its first request neither its settings nor
    its tenant's are read before a request leaves; a request past half their TTL reads them
    again in the background (without that, every request 60 s after the read read both on its
    path, took the exact admission call and broke the user's chain of rate blocks)."""
    import candela_mitm.governance.users as users_mod
    from candela_mitm.governance.settings_watch import SettingsWatch

    monkeypatch.setattr(users_mod, "READ_AHEAD_DELAY_S", 0.01)
    rt = runtime(config(rpm=100_000, budget=100.0))
    _first_poll(rt)
    now = [1000.0]
    watch = SettingsWatch(poll_s=0.25, long_ttl_s=60.0, clock=lambda: now[0])
    rt.users.watch, rt.users.clock = watch, lambda: now[0]
    store = rt.users.store
    reads: list[tuple[str, int | None]] = []  # (what, the request whose path read it, if any)
    on_path: list[int | None] = [None]
    for name in ("get_user", "get_tenant"):
        real = getattr(store, name)

        def counted(*a, _real=real, _name=name, **kw):
            reads.append((_name, on_path[0]))
            return _real(*a, **kw)

        monkeypatch.setattr(store, name, counted)

    async def go():
        addons = [Router(rt), Auth(rt), RateLimit(rt), Budget(rt)]
        for i in range(12):  # 4 minutes of the settings' clock
            watch.confirm(0, now[0])  # a poll that saw no change
            f = chat()
            on_path[0] = i
            await run_hooks(addons, f, "requestheaders", "request")
            on_path[0] = None
            assert f.response is None, i
            await until_async(lambda: not rt._reading_ahead, what="the reads ahead done")
            now[0] += 20.0

    asyncio.run(go())
    assert sorted(r for r in reads if r[1] is not None) == [("get_tenant", 0), ("get_user", 0)]
    # read again in the background, about every other request (at 40 s of a 60 s TTL)
    assert 4 <= reads.count(("get_user", None)) <= 6
    assert 4 <= reads.count(("get_tenant", None)) <= 6


def test_a_take_asked_by_a_request_waits_a_quarter_of_the_users_gap(tctx, runtime):
    """Issue 21 (governance/ahead.py): the rate block and budget slice a request asks for are
    taken a quarter of the gap between the user's requests later (at most 0.5 s), not in the
    event-loop turns that forward the request: with requests 0.4 s apart, no take reaches the
    store within 0.09 s of the request that asked it."""
    rt, calls = _counted_runtime(runtime, config(rpm=100_000, budget=100.0))
    when: list[tuple[str, float]] = []
    counted = rt.calls.call

    async def timed(fn, *args):
        when.append((getattr(fn, "__name__", repr(fn)), time.monotonic()))
        return await counted(fn, *args)

    rt.calls.call = timed

    async def go():
        addons = [Router(rt), Auth(rt), RateLimit(rt), Budget(rt)]
        asked = []
        for _ in range(3):
            f = chat()
            await run_hooks(addons, f, "requestheaders", "request")
            assert f.response is None
            asked.append(time.monotonic())
            await asyncio.sleep(0.4)
        return asked

    asked = asyncio.run(go())
    takes = [t for name, t in when if name in ("take", "reserve")]
    assert takes, calls  # the second request (0.4 s after the first) asked for both
    for t in takes:
        since = max(a for a in asked if a <= t)
        assert t - since >= 0.09, (t - since, when)


def _evalsha_calls(url):
    import redis

    with redis.Redis.from_url(url) as client:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def _redis_runtime(runtime, server, rpm, budget):
    """A runtime on Redis with no rate block nor budget slice (every request asks the store),
    and the names of the calls made on the store's thread pool."""
    cfg = config(rpm=rpm, budget=budget)
    cfg["state"] = {"backend": "redis", "redis_url": server.url}
    cfg["governance"] = {
        "budgets": {"slices": {"enabled": False}},
        "rate_limits": {"leases": {"enabled": False}},
    }
    rt = runtime(cfg)
    pool = []
    real = rt.calls.call

    async def counted(fn, *args):
        pool.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args)

    rt.calls.call = counted
    return rt, pool


def test_an_idle_users_request_on_redis_is_one_script_call(tctx, runtime, redis_server_factory):
    """Issue 21: on Redis, the rate step and the reservation of a request that holds no block nor
    slice are one EVALSHA (they were two round trips), awaited on the event loop (no call on the
    store's thread pool); a rate-limited one reserves nothing."""
    server = redis_server_factory()
    rt, pool = _redis_runtime(runtime, server, rpm=2, budget=10.0)
    asyncio.run(send(rt, [chat()]))  # the scripts loaded (a fresh server knows none)
    rt.users.tenant_settings_cached("research-team")  # as a running proxy has them at hand
    before = _evalsha_calls(server.url)
    pool.clear()
    [admitted] = asyncio.run(send(rt, [chat()]))
    assert _evalsha_calls(server.url) - before == 1
    # on the loop: not the pool's `call` (the user's settings may be read there again, when the
    # settings watch has not polled yet and their 1 s is past: auth's read, not the admission)
    assert "call" not in pool
    c = ctx_of(admitted)
    assert admitted.response is None and isinstance(c.reservation, Reservation)
    assert c.estimate_usd == pytest.approx(c.reservation.amount_usd) and c.estimate_usd > 0
    assert c.rate_headers["RateLimit"] == '"requests";r=0;t=60'
    before = _evalsha_calls(server.url)
    [limited] = asyncio.run(send(rt, [chat()], with_budget=True))
    assert _evalsha_calls(server.url) - before == 1
    assert limited.response.status_code == 429 and limited.response.json()["error"] == "rate_limited"
    assert ctx_of(limited).reservation is None and ctx_of(limited).estimate_usd == 0.0
    assert len(rt.store.active_reservations()) == 2  # the first two's, none of the third
    assert "call" not in pool


def test_a_budget_refusal_on_redis_is_402_and_counts_the_request(tctx, runtime, redis_server_factory):
    server = redis_server_factory()
    rt, _ = _redis_runtime(runtime, server, rpm=2, budget=0.0)
    flows = asyncio.run(send(rt, [chat(), chat(), chat()], with_budget=True))
    assert statuses(flows) == [402, 402, 429]  # each refused by the budget counted on the rate
    assert flows[0].response.json()["error"] == "budget_exceeded"
    assert rt.store.active_reservations() == []


def test_a_tenant_not_at_hand_is_admitted_on_the_pool(tctx, runtime, redis_server_factory):
    """The loop never reads the store but for the admission's script: a request whose tenant's
    settings are not remembered makes its admission on the pool (which reads them)."""
    server = redis_server_factory()
    rt, pool = _redis_runtime(runtime, server, rpm=5, budget=10.0)
    rt.users.cache_ttl_s = 0  # nothing is remembered
    [f] = asyncio.run(send(rt, [chat()]))
    assert f.response is None and isinstance(ctx_of(f).reservation, Reservation)
    assert pool[-1:] == ["call"]  # (after the user's settings read)


def test_past_a_few_admissions_on_the_loop_the_pool_takes_them(tctx, runtime, redis_server_factory):
    """Bounded: while LOOP_ADMISSIONS_MAX admissions are awaited on the event loop, the next
    goes to the store's thread pool (its calls joined there), and the loop's client holds no
    more connections than that. Each is admitted and reserved either way."""
    from candela_mitm.addons import ratelimit

    server = redis_server_factory()
    rt, pool = _redis_runtime(runtime, server, rpm=50, budget=10.0)
    asyncio.run(send(rt, [chat()]))  # the scripts loaded
    rt.users.tenant_settings_cached("research-team")
    n = ratelimit.LOOP_ADMISSIONS_MAX
    real = rt.store.rate_hit_reserve_async
    held: list[int] = []

    async def go():
        release = asyncio.Event()

        async def slow(*args):
            held.append(1)
            await release.wait()  # the first ones wait here, on the loop
            return await real(*args)

        rt.store.rate_hit_reserve_async = slow
        addons = [Router(rt), Auth(rt), RateLimit(rt)]
        flows = [chat() for _ in range(n + 1)]
        tasks = [asyncio.ensure_future(run_hooks(addons, f, "requestheaders", "request")) for f in flows]
        await until_async(lambda: len(held) == n and pool.count("call") == 1)
        release.set()
        await asyncio.gather(*tasks)
        return flows

    pool.clear()
    flows = asyncio.run(go())
    assert len(held) == n and pool.count("call") == 1  # the one past the bound: on the pool
    assert all(f.response is None and isinstance(ctx_of(f).reservation, Reservation) for f in flows)


@pytest.mark.parametrize("how", ["stopped", "stalled"])
def test_a_dead_or_stalled_redis_is_503_from_the_loop(tctx, runtime, redis_server_factory, how):
    """Governance fails closed: the admission awaited on the loop answers 503
    governance_unavailable when Redis refuses the connection or does not answer within the
    store's timeout; nothing is forwarded, and the loop went on meanwhile."""
    server = redis_server_factory()
    rt, pool = _redis_runtime(runtime, server, rpm=5, budget=10.0)
    # the settings at hand, as in a running proxy (past the watch's first poll, which forgets
    # what was read before it; stopped, so that no poll forgets them when Redis goes)
    poller = rt.settings_poller
    deadline = time.monotonic() + WAIT_S
    while poller is not None and poller.polls + poller.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    if poller is not None:
        poller.stop()
    rt.users.tenant_settings_cached("research-team")
    rt.users.settings_cached(USER)
    if how == "stopped":
        server.stop()
    else:
        stall = _Stall()
        rt.store._url = stall.url  # the loop's client (made at its first use) meets a mute peer
        rt.store._timeout_s = 0.2
    ticks = []

    async def go():
        async def ticker():
            while True:
                ticks.append(1)
                await asyncio.sleep(0.005)

        t = asyncio.get_running_loop().create_task(ticker())
        try:
            [f] = await send(rt, [chat()], with_budget=True)
        finally:
            t.cancel()
        return f

    f = asyncio.run(go())
    assert f.response.status_code == 503
    assert f.response.json()["error"] == "governance_unavailable"
    assert ctx_of(f).reservation is None
    assert pool == []  # it was the loop's call that failed, not the pool's
    if how == "stalled":
        assert stall.got  # the script was sent, and never answered
        assert len(ticks) > 1  # the loop ran other work while the call waited
        stall.close()


class _Stall:
    """A TCP peer that takes a connection and what is sent on it, and never answers."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.got = b""
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                while data := conn.recv(65536):
                    self.got += data
        except OSError:
            return

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


def test_what_decides_nothing_waits_until_the_request_leaves(tctx, runtime):
    """Issue 21: an admitted request's RateLimit headers, the read-ahead of its tenant and the
    next rate block are deferred (flowstate.defer) until it is on its way; one refused after
    RateLimit (Budget's 402) never leaves, and its answer carries the headers all the same."""
    from candela_mitm.addons.flowstate import run_later

    rt = runtime(config(rpm=5, budget=0.0))

    async def hooks(f, addons):
        for name in ("requestheaders", "request"):
            for addon in addons:
                fn = getattr(addon, name, None)
                if fn is not None and (got := fn(f)) is not None:
                    await got

    async def go():
        rl, budget = RateLimit(rt), Budget(rt)
        admitted = chat()
        await hooks(admitted, [Router(rt), Auth(rt), rl])
        c = ctx_of(admitted)
        assert admitted.response is None and c.later and c.rate_headers == {}
        run_later(c)  # as Upstream does once the request's bytes are written
        assert c.later is None
        assert c.rate_headers["RateLimit-Policy"] == '"requests";q=5;w=60'
        refused = chat()
        await hooks(refused, [Router(rt), Auth(rt), rl, budget])  # a budget of 0: 402
        assert refused.response.status_code == 402 and ctx_of(refused).later
        await rl.response(refused)
        assert ctx_of(refused).later is None
        assert refused.response.headers["RateLimit"] == '"requests";r=3;t=60'

    asyncio.run(go())
