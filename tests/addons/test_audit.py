"""Audit addon: the wait for an entry's commit (one per request) before the response ends."""

import asyncio
import threading

import pytest

from candela_mitm.addons.audit import CommitWaits, request_entry
from candela_mitm.addons.flowstate import ctx_of
from candela_mitm.errors import StoreUnavailable


def _report_later(committed, seq=None, error=None, delay=0.05):
    threading.Timer(delay, committed, args=(seq, error)).start()  # as the writer thread does


def test_waits_for_the_writer_threads_commit():
    async def main():
        waits = CommitWaits(asyncio.get_running_loop(), 5.0)
        fut, committed = waits.begin()
        _report_later(committed, 7)
        assert not fut.done()
        assert await fut is True
        fut, committed = waits.begin()
        committed(1, None)  # committed before anyone awaits
        assert await fut is True

    asyncio.run(main())


def test_a_failed_commit_raises():
    async def main():
        waits = CommitWaits(asyncio.get_running_loop(), 5.0)
        fut, committed = waits.begin()
        _report_later(committed, error=StoreUnavailable("queue full"))
        with pytest.raises(StoreUnavailable):
            await fut

    asyncio.run(main())


def test_a_burst_of_commits_wakes_the_loop_once():
    async def main():
        loop = asyncio.get_running_loop()
        waits = CommitWaits(loop, 5.0)
        pairs = [waits.begin() for _ in range(100)]
        wakes = 0
        threadsafe = loop.call_soon_threadsafe

        def counting(cb, *args):
            nonlocal wakes
            wakes += 1
            return threadsafe(cb, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        done = threading.Event()

        def writer():
            for seq, (_, committed) in enumerate(pairs):
                committed(seq, None)
            done.set()

        threading.Thread(target=writer).start()
        results = await asyncio.gather(*(f for f, _ in pairs))
        assert results == [True] * 100
        assert done.is_set() and 1 <= wakes < 100
        # a commit reported after a delivery ran is delivered too
        fut, committed = waits.begin()
        threading.Thread(target=committed, args=(101, None)).start()
        assert await asyncio.wait_for(fut, 5) is True

    asyncio.run(main())


def test_a_stuck_ledger_times_out_and_a_late_commit_is_harmless():
    async def main():
        loop = asyncio.get_running_loop()
        waits = CommitWaits(loop, 0.05, sweep_s=0.02)
        slow, late = waits.begin()
        quick, on_time = waits.begin()
        on_time(2, None)
        assert await quick is True
        assert await slow is False
        assert 0.04 <= loop.time() - t0 < 1.0
        assert not waits._open and waits._sweeper is None  # nothing left to sweep
        late(3, None)  # the wait ended: ignored
        await asyncio.sleep(0.01)
        return late

    t0 = 0.0

    async def timed():
        nonlocal t0
        t0 = asyncio.get_running_loop().time()
        return await main()

    late = asyncio.run(timed())
    late(4, None)  # the loop is closed by now: the writer's callback must not fail


# --- the entry starts before the other response hooks and is waited for last ------------------
def _proxied_flow():
    from mitmproxy import http
    from mitmproxy.test import tflow

    from candela_mitm.context import RequestContext
    from candela_mitm.observability.spans import TraceContext

    f = tflow.tflow()
    f.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
    c = RequestContext(kind="proxy", provider="openai", rest="/v1/chat/completions",
                       trace=TraceContext.from_headers(None))
    f.metadata["candela"] = c
    return f, c


def _runtime(runtime, tmp_path):
    return runtime({
        "providers": {"openai": {"base_url": "http://upstream.test:8080"}},
        "state": {"sqlite_path": str(tmp_path / "state.db")},
        "audit": {"sqlite_path": str(tmp_path / "audit.db")},
    })


class _Writer:
    """The audit writer's record_then, committing when the test says so."""

    healthy = True
    journaling = False  # (the real writer's with durability power_loss)

    def __init__(self):
        self.entries = []
        self.callbacks = []

    def record_then(self, action, committed, /, **fields):
        self.entries.append((action, fields))
        self.callbacks.append(committed)
        return True

    def record_here(self, action, committed, /, **fields):
        """Committed at once on the caller's thread, as the real writer does when idle."""
        self.entries.append((action, fields))
        self.here = True
        committed(len(self.entries), None)
        return True


def test_the_entry_commits_while_the_other_response_hooks_run(runtime, tmp_path):
    from candela_mitm.addons import pipeline
    from candela_mitm.addons.audit import Audit, AuditStart

    rt = _runtime(runtime, tmp_path)
    members = pipeline(rt)
    with_response = [type(m).__name__ for m in members if callable(getattr(m, "response", None))]
    assert with_response[0] == "AuditStart" and with_response[-1] == "Audit"
    [start] = [m for m in members if isinstance(m, AuditStart)]
    [audit] = [m for m in members if isinstance(m, Audit)]
    assert start.audit is audit

    writer = _Writer()
    real, rt.audit = rt.audit, writer
    seen: list[str] = []
    audit.under_way = lambda: 2  # another request under way: the writer thread commits

    class Between:
        """Stands for Metrics, Budget, Spans: runs between the start and the wait."""

        async def response(self, flow):
            seen.append(f"between: {len(writer.entries)} entry queued")
            writer.callbacks[0](1, None)  # the writer thread commits meanwhile

    async def main():
        f, c = _proxied_flow()
        for addon in (AuditStart(audit), Between(), audit):  # the response hooks, in order
            res = addon.response(f)
            if res is not None:
                await res
        return c

    c = asyncio.run(main())
    assert seen == ["between: 1 entry queued"]
    [(action, fields)] = writer.entries  # once, though start and response both ran
    assert action == "llm_request" and fields["status"] == 200 and fields["decision"] == "allowed"
    assert c.audited and c.audit_commit is None  # queued once, waited for and let go
    assert not hasattr(writer, "here")
    rt.audit = real
    rt.close()


@pytest.mark.parametrize(("under_way", "here"), [(1, True), (0, True), (2, False), (5, False)])
def test_a_request_alone_commits_its_entry_on_the_event_loop(runtime, tmp_path, under_way, here):
    """Alone in the process (ConnLimits counts requests under way, this one included), the entry
    is committed by AuditStart itself, before the other response hooks: no thread hand-off."""
    from candela_mitm.addons.audit import Audit, AuditStart

    rt = _runtime(runtime, tmp_path)
    writer = _Writer()
    real, rt.audit = rt.audit, writer
    audit = Audit(rt, under_way=lambda: under_way)

    async def main():
        f, c = _proxied_flow()
        AuditStart(audit).response(f)
        committed_before_the_others = c.audit_commit is not None and c.audit_commit.done()
        if not here:
            writer.callbacks[0](1, None)
        await audit.response(f)
        return c, committed_before_the_others

    c, early = asyncio.run(main())
    assert early is here and getattr(writer, "here", False) is here
    assert len(writer.entries) == 1 and c.audit_commit is None
    rt.audit = real
    rt.close()


@pytest.mark.parametrize("under_way", [1, 5])
def test_with_the_entry_journal_every_request_records_its_entry_at_once(runtime, tmp_path, under_way):
    """With the writer's entry journal, a request under load takes record_here too: its entry
    is durable once appended, and the answer waits for no group commit."""
    from candela_mitm.addons.audit import Audit, AuditStart

    rt = _runtime(runtime, tmp_path)
    writer = _Writer()
    writer.journaling = True
    real, rt.audit = rt.audit, writer
    audit = Audit(rt, under_way=lambda: under_way)

    async def main():
        f, c = _proxied_flow()
        AuditStart(audit).response(f)
        done_at_once = c.audit_commit is not None and c.audit_commit.done()
        await audit.response(f)
        return c, done_at_once

    c, at_once = asyncio.run(main())
    assert at_once and writer.here and writer.callbacks == []
    assert len(writer.entries) == 1 and c.audit_commit is None
    rt.audit = real
    rt.close()


def test_an_error_is_recorded_and_waited_for_at_the_end(runtime, tmp_path):
    from candela_mitm.addons.audit import Audit

    rt = _runtime(runtime, tmp_path)
    writer = _Writer()
    real, rt.audit = rt.audit, writer
    audit = Audit(rt)

    async def main():
        f, c = _proxied_flow()
        f.response = None
        c.error = "upstream_unreachable"
        task = asyncio.ensure_future(audit.error(f))
        await asyncio.sleep(0.01)
        assert not task.done()  # waiting for the commit
        writer.callbacks[0](1, None)
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    [(_, fields)] = writer.entries
    assert fields["decision"] == "error" and fields["reason"] == "upstream_unreachable"
    rt.audit = real
    rt.close()


def _planned(runtime, path, body=None, method="POST"):
    from candela_mitm.addons.router import Router

    from .conftest import make_flow

    rt = runtime()
    f = make_flow(path, body=body, method=method)
    router = Router(rt)
    router.requestheaders(f)
    asyncio.run(router.request(f))
    return ctx_of(f), f


def test_a_forwarded_requests_entry_names_method_path_and_operation(tctx, runtime):
    c, f = _planned(runtime, "/proxy/openai/v1/chat/completions?api-version=1&key=secret", {"model": "gpt-4o", "messages": []})
    c.forwarded = True
    e = request_entry(c, f)
    assert (e["method"], e["path"], e["operation"]) == ("POST", "/v1/chat/completions", "chat.completions")


def test_the_audited_path_is_bounded(tctx, runtime):
    long = "/v1/models/" + "m" * 2000
    c, f = _planned(runtime, "/proxy/openai" + long, method="GET")
    c.forwarded = True
    e = request_entry(c, f)
    assert e["operation"] == "models.get"
    assert len(e["path"].encode()) == 512 and long.startswith(e["path"])


def test_the_head_of_a_forwarded_requests_entry_is_made_while_its_upstream_works(
    tctx, runtime, tmp_path
):
    """Audit.meanwhile makes the fields fixed once a request is forwarded; its entry takes
    them and adds what its end decided: the same entry as one made whole at the end."""
    from candela_mitm.addons.audit import Audit

    c, f = _planned(runtime, "/proxy/openai/v1/chat/completions?key=secret", {"model": "gpt-4o"})
    c.forwarded = True
    Audit(_runtime(runtime, tmp_path), under_way=lambda: 5).meanwhile(f)
    head = c.entry_head
    assert head is not None and head["path"] == "/v1/chat/completions" and "status" not in head
    c.status_code, c.cost_usd, c.usage_source = 200, 0.25, "reported"
    entry = request_entry(c, f)
    assert entry is head and c.entry_head is None  # taken once
    whole = request_entry(c, f)  # made at the end, as for a request never forwarded
    assert {**entry, "duration_ms": 0} == {**whole, "duration_ms": 0}
    assert (entry["status"], entry["cost_usd"], entry["usage_source"]) == (200, 0.25, "reported")
    assert entry["decision"] == "allowed" and entry["operation"] == "chat.completions"
    c.audited = True  # queued already: nothing is made for it
    Audit(_runtime(runtime, tmp_path), under_way=lambda: 5).meanwhile(f)
    assert c.entry_head is None


def test_a_refused_requests_entry_names_its_method_and_path(tctx, runtime):
    c, f = _planned(runtime, "/proxy/openai/v1/files?purpose=x", method="GET")
    e = request_entry(c, f)
    assert (e["method"], e["path"], e["operation"], e["reason"]) == ("GET", "/v1/files", None, "endpoint_not_governed")


def test_refusals_of_unknown_callers_are_sampled_and_the_rest_counted(tctx, runtime, tmp_path):
    from candela_mitm.addons.audit import Audit
    from candela_mitm.addons.auth import Auth
    from candela_mitm.addons.router import Router

    from .conftest import ALICE_KEY, BASE, audit_entries, make_flow, run_hooks

    rt = runtime({**BASE, "audit": {"unauthenticated_per_minute": 2,
                                    "sqlite_path": str(tmp_path / "sampled.db")}})
    audit = Audit(rt)

    def one(headers):
        f = make_flow("/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini"}, headers=headers)
        asyncio.run(run_hooks([Router(rt), Auth(rt)], f, "requestheaders", "request"))
        if f.response is None:  # authenticated: refused here, as a gate would
            from candela_mitm import errors
            from candela_mitm.addons.flowstate import deny

            deny(f, errors.forbidden("test"))
        asyncio.run(audit.response(f))
        return f

    for _ in range(5):
        assert one({}).response.status_code == 401
    for _ in range(3):  # a known caller's refusals are never sampled
        assert one({"Authorization": f"Bearer {ALICE_KEY}"}).response.status_code == 403
    assert rt.audit.flush(10)
    entries = audit_entries(rt, "llm_request")
    unknown = [e for e in entries if e.get("decision") == "denied" and not e.get("user_id")]
    assert len(entries) - len(unknown) == 3
    assert len(unknown) == 2 and [e.get("unsampled_before") for e in unknown] == [0, 0]


@pytest.mark.parametrize("streamed", [False, True])
def test_a_forwarded_answer_whose_entry_fails_does_not_complete(runtime, tmp_path, streamed):
    from candela_mitm.addons.audit import Audit

    rt = _runtime(runtime, tmp_path)
    writer = _Writer()
    real, rt.audit = rt.audit, writer
    audit = Audit(rt)

    async def main():
        f, c = _proxied_flow()
        c.forwarded = True
        f.response.stream = streamed
        task = asyncio.ensure_future(audit.response(f))
        await asyncio.sleep(0)
        writer.callbacks[0](None, StoreUnavailable("disk full"))  # the commit failed
        await task
        return f

    f = asyncio.run(main())
    if streamed:  # its end is never sent
        assert f.error is not None and f.error.msg == "Connection killed."
    else:
        assert f.response.status_code == 503
        assert f.response.json()["error"] == "governance_unavailable"
    rt.audit = real


def test_nothing_is_forwarded_while_the_ledger_fails(tctx, runtime):
    from candela_mitm.addons.router import Router
    from candela_mitm.addons.upstream import Upstream

    from .conftest import BASE, make_flow

    rt = runtime(BASE)
    f = make_flow("/proxy/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []})
    router = Router(rt)
    router.requestheaders(f)
    asyncio.run(router.request(f))
    assert ctx_of(f).plan is not None
    rt.audit.healthy = False  # as the writer sets it when a commit fails
    asyncio.run(Upstream(rt).request(f))
    assert f.response.status_code == 503 and f.response.json()["error"] == "governance_unavailable"
    assert not ctx_of(f).forwarded
    rt.audit.healthy = True


@pytest.mark.parametrize(("under_way", "looks"), [(0, 1), (1, 1), (2, 0), (5, 0)])
def test_meanwhile_prepares_the_queued_entries_of_a_request_alone(
    runtime, tmp_path, under_way, looks
):
    """While a request alone in its process waits for its upstream, the entries queued before
    its own (its policy check) are prepared then; under load the writer thread keeps that work
    (the loop has none to spare)."""
    from candela_mitm.addons.audit import Audit

    from .conftest import make_flow

    rt = _runtime(runtime, tmp_path)
    audit = Audit(rt, under_way=lambda: under_way)
    assert rt.audit.record("model_policy_check", user_id="alice@example.com", result="allowed")
    before = rt.audit.prepare_queued

    def counted() -> int:
        n = before()
        calls.append(n)
        return n

    calls: list[int] = []
    rt.audit.prepare_queued = counted
    audit.meanwhile(make_flow("/proxy/openai/v1/models", method="GET"))  # (no context)
    # (the one it finds, unless the writer thread's batch took it first)
    assert len(calls) == looks and sum(calls) <= looks
    rt.close()


def test_deferred_work_of_a_request_that_never_left_is_run_by_the_last_hook(
    tctx, runtime, tmp_path
):
    """Work deferred until a request is on its way (flowstate.defer) runs once even when the
    request is refused before it leaves: Audit's response hook, the last of every flow."""
    from candela_mitm.addons.audit import Audit
    from candela_mitm.addons.flowstate import defer, deny
    from candela_mitm.errors import bad_request

    rt = _runtime(runtime, tmp_path)
    c, f = _planned(runtime, "/proxy/openai/v1/chat/completions", {"model": "gpt-4o"})
    ran: list[str] = []
    defer(c, lambda: ran.append("deferred"))
    deny(f, bad_request("refused before it left"))
    asyncio.run(Audit(rt).response(f))
    assert ran == ["deferred"] and c.later is None
    asyncio.run(Audit(rt).response(f))
    assert ran == ["deferred"]  # once
    rt.close()
