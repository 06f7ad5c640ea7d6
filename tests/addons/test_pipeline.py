"""The pipeline: the order in which each mitmproxy hook really runs, derived from the addon classes.

mitmproxy runs one hook at a time across the whole chain, in list order (AddonManager.trigger_event
walks `traverse(chain)` and calls each addon's attribute of the hook's name). So the order that
matters is not the list's but, for each hook, the order of the addons that define it. The table
below writes that order down; the test derives it from `pipeline()` and compares.
"""

from __future__ import annotations

import pytest
from mitmproxy import addonmanager, hooks

from candela_mitm.addons import pipeline

# hook name -> the pipeline addons that define it, in the order mitmproxy calls them
HOOK_ORDER: dict[str, list[str]] = {
    # connection events: Sni for transparent connections, LocalGuard (laptop mode) for the
    # owner of every other one (read from the kernel's socket table before its first request)
    # ConnLimits counts every connection per address, refusing those past the cap
    "client_connected": ["Sni", "LocalGuard", "ConnLimits"],
    "client_disconnected": ["Sni", "LocalGuard", "ConnLimits"],
    # TLS events: only Sni looks at them
    "next_layer": ["Sni"],
    # Sni decides by the server name; ConnLimits, after it, stops bounding what Sni relays untouched
    "tls_clienthello": ["Sni", "ConnLimits"],
    "tls_start_client": ["Sni"],
    "tcp_message": ["Sni"],  # a shared edge's relayed bytes: every request's Host read
    # the head of a request: classified (Sni, Router), then the routes answered before anyone
    # is authenticated (/healthz, /metrics), then who is calling; LocalGuard (laptop mode)
    # refuses foreign Hosts, non-JSON bodies and token-less UI writes before any of them;
    # LocalUi refreshes the local model list here, before Router's `request` hook routes a
    # chat completion by model name
    "requestheaders": [
        "Sni",
        "Router",
        "LocalGuard",
        "Health",
        "Console",  # the /admin/ page, before Auth (its API calls are authenticated)
        "ConnLimits",  # the head arrived: its deadline is met; the body's deadline starts
        "Auth",
        "RateLimit",  # a large (or chunked) body is rate limited from its head, before it is read
        "LocalUi",
    ],
    # the whole request: body and plan, then the gates, then the routes Candela answers itself,
    # and Upstream last: nothing reaches the network that a gate refused or nobody planned
    "request": [
        "Router",
        "Metrics",  # GET /metrics, once Auth has said who asks: admins only
        "Admin",
        "ModelPolicy",
        "Jobs",  # a job's result only to its creator (403 job_not_owned)
        "WebSocket",
        "RateLimit",
        "Budget",
        "LocalUi",
        "LocalApi",
        "Upstream",
    ],
    # response headers: RateLimit's IETF headers join the answer before it can stream; the
    # upstream timeout is cancelled before the stream is set up; Telemetry wraps the stream
    # Accounting set up, to read the model a stream names
    "responseheaders": ["Upstream", "Accounting", "Telemetry"],
    # the response: AuditStart queues the audit entry first, Audit waits for its commit last;
    # RateLimit gives back the lease and corrects the token windows before Budget settles;
    # Telemetry exports the span Spans made, before Audit waits for the entry's commit
    "response": [
        "AuditStart",
        "ConnLimits",  # the exchange ended: the connection's idle deadline starts
        "Metrics",
        "Jobs",  # records a job under its reservation before Budget settles it; trues up reads
        "WebSocket",  # an upgrade answered with anything but 101 gives its session lease back
        "RateLimit",
        "Budget",
        "LocalUi",
        "Accounting",
        "Spans",
        "Telemetry",
        "Audit",
    ],
    # a failed flow: the lease and the reservation are released before the entry that records
    # the failure
    "error": [
        "ConnLimits",
        "Metrics",
        "WebSocket",  # so does an upgrade that failed before its session started
        "RateLimit",
        "Budget",
        "Upstream",
        "Accounting",
        "Spans",
        "Telemetry",
        "Audit",
    ],
    "done": ["ConnLimits", "LocalUi", "Upstream", "Telemetry"],
    "running": ["ConnLimits"],  # starts its deadline sweeper
    # a WebSocket session after its upgrade: only WebSocket reads its frames
    "websocket_start": ["ConnLimits", "WebSocket"],  # a session has no request deadline
    "websocket_message": ["WebSocket"],
    "websocket_end": ["WebSocket"],
}


def hook_order(addons: list[object]) -> dict[str, list[str]]:
    """For every mitmproxy hook, the class names of the addons that define it, in call order."""
    order: dict[str, list[str]] = {}
    for name in sorted(hooks.all_hooks):
        defined = [
            type(a).__name__
            for a in addonmanager.traverse(addons)
            if callable(getattr(a, name, None))
        ]
        if defined:
            order[name] = defined
    return order


@pytest.mark.parametrize("command", ["server", "local"])
def test_each_hook_runs_in_the_written_order(runtime, command):
    addons = pipeline(runtime(command=command))
    assert hook_order(addons) == HOOK_ORDER


def test_every_addon_is_in_the_pipeline_once(runtime):
    names = [type(a).__name__ for a in pipeline(runtime())]
    assert len(names) == len(set(names))
    # each one has at least one hook, or it would be dead weight in the chain
    hooked = {n for order in HOOK_ORDER.values() for n in order}
    assert set(names) == hooked


def test_audit_start_and_audit_share_one_entry(runtime):
    from candela_mitm.addons.audit import Audit, AuditStart

    addons = pipeline(runtime())
    [start] = [a for a in addons if isinstance(a, AuditStart)]
    [audit] = [a for a in addons if isinstance(a, Audit)]
    assert start.audit is audit


def test_the_derivation_sees_a_misplaced_hook():
    class First:
        def response(self, flow): ...

    class Second:
        def request(self, flow): ...

        def response(self, flow): ...

    assert hook_order([Second(), First()])["response"] == ["Second", "First"]
    assert hook_order([First(), Second()]) == {"request": ["Second"], "response": ["First", "Second"]}


# Who answers what, through the whole pipeline (requestheaders then request), in candela-server:
# (method, path, with Alice's key) -> status, error code (None: forwarded to the provider)
ANSWERS = [
    ("GET", "/healthz", False, 200, None),  # Health, before Auth
    ("GET", "/metrics", False, 401, "unauthenticated"),  # Auth first: admins only
    ("GET", "/metrics", True, 403, "forbidden"),  # Metrics: a developer
    ("GET", "/v1/models", False, 401, "unauthenticated"),
    ("GET", "/v1/models", True, 200, None),  # LocalApi
    ("GET", "/_local/api/traces", True, 200, None),  # LocalApi
    ("GET", "/admin/v1/me", False, 401, "unauthenticated"),
    ("GET", "/admin/v1/me", True, 200, None),  # Admin
    ("GET", "/admin/v1/users", True, 403, "forbidden"),
    ("GET", "/_local/", True, 404, "not_found"),  # LocalUi is inert in candela-server: LocalApi
    ("GET", "/nothing", False, 401, "unauthenticated"),  # a stranger learns nothing of routes
    ("GET", "/nothing", True, 404, "not_found"),  # LocalApi, for what nobody claimed
    ("POST", "/proxy/nowhere/v1/x", False, 404, "not_found"),  # Router, before Auth
    ("POST", "/proxy/openai/v1/chat/completions", True, None, None),  # Upstream forwards it
]


@pytest.mark.parametrize("method, path, keyed, status, error", ANSWERS)
def test_who_answers_what(tctx, runtime, method, path, keyed, status, error):
    import asyncio

    from .conftest import ALICE_KEY, make_flow, run_hooks

    rt = runtime()
    addons = pipeline(rt)
    headers = {"Authorization": f"Bearer {ALICE_KEY}"} if keyed else {}
    body = {"model": "gpt-4o-mini", "messages": []} if method == "POST" else None
    flow = make_flow(path, body, method=method, headers=headers)

    async def main():
        await run_hooks(addons, flow, "requestheaders", "request")
        for a in addons:
            if hasattr(a, "done"):
                a.done()

    asyncio.run(main())
    if status is None:
        assert flow.response is None and flow.request.host == "upstream.test"
        assert flow.request.headers["authorization"] == "Bearer sk-upstream"  # Candela's, not Alice's
    else:
        assert flow.response.status_code == status
        assert flow.request.host == "127.0.0.1"  # answered here, never pointed upstream
        if error:
            assert flow.response.json()["error"] == error
