"""Candela's mitmproxy addons; `pipeline` lists them in request order."""

from __future__ import annotations

from typing import Any

from candela_mitm.runtime import Runtime


def pipeline(rt: Runtime) -> list[Any]:
    """The request path, in order: read this list to learn what happens to a request.

    mitmproxy runs one hook at a time across the whole chain, in list order: every addon's
    `requestheaders`, then every addon's `request`, and so on. So an addon's place in the list
    orders each of its hooks among the other addons' hooks of the same name, and an addon
    placed early for one hook is early for all of them. tests/addons/test_pipeline.py derives
    the order in which each hook runs from these classes and compares it with a written table.

    Every hook after the first answer stands aside (`answered(flow)`): an addon that answers a
    request itself (a denial, /healthz, /metrics, the admin API, the local page) ends its path.
    """
    from .accounting import Accounting
    from .admin import Admin
    from .audit import Audit, AuditStart
    from .auth import Auth
    from .budget import Budget
    from .connlimits import ConnLimits
    from .console import Console
    from .jobs import Jobs
    from .localapi import Health, LocalApi
    from .localguard import LocalGuard
    from .localui import LocalUi
    from .metrics import Metrics
    from .modelpolicy import ModelPolicy
    from .ratelimit import RateLimit
    from .router import Router
    from .sni import Sni
    from .spans import Spans
    from .telemetry import Telemetry
    from .upstream import Upstream
    from .websocket import WebSocket

    conns = ConnLimits(rt)
    audit = Audit(rt, under_way=conns.requests_under_way)
    accounting = Accounting(rt)
    # -- the edge: what the request is, before anyone knows who sent it ----------------------
    edge = [
        Sni(rt),  # transparent mode: SNI -> provider route, sandbox attribution (421/403)
        Router(rt),  # route name, body, forwarding plan (or 400/404/413/415)
        # candela (laptop): a loopback Host on Candela's port, JSON bodies, the UI token
        LocalGuard(rt),
        Health(),  # /healthz, before authentication, as load balancers expect
        Console(),  # /admin/ page and assets, before authentication (its calls are authenticated)
        # AuditStart has only a response hook, and it is here for that hook alone: ahead of
        # every other addon with one, it queues the request's audit entry first, so the entry's
        # commit (an fsync on the writer thread) runs while Metrics, Budget, Accounting and
        # Spans do their response work; `audit`, last of all, waits for that commit.
        AuditStart(audit),
        # the per-address connection cap and the deadlines on a request's head and body
        # (429/408, close); after AuditStart, whose response hook must come first
        conns,
        # Metrics answers GET /metrics in its request hook, after Auth's requestheaders: to
        # admins only (Prometheus sends an admin's key as its bearer). Its request counters are kept by its response and error
        # hooks, which therefore run early too: they call account() like every response hook
        # that reads the usage (it computes once, in whichever hook comes first).
        Metrics(rt),
    ]
    # -- governance gates: who, then may they, then can they afford it ----------------------
    gates = [
        Auth(rt),  # principal (401) and tenant (403 tenant_not_allowed)
        Admin(rt),  # /admin/v1 (admin-api.md): admin-only routes 403 for developers
        ModelPolicy(rt),  # 403 model_not_allowed, audited allowed or denied (spec 002)
        # async jobs: a job's result only to its creator (403 job_not_owned); records a job at
        # its creation and trues it up when its result is read, its response hook before
        # Budget's (which settles the creation's reservation)
        Jobs(rt),
        # WebSocket upgrades: 429 websocket_sessions_exceeded (a lease per session on the
        # store, every process counted) before anything is reserved; once
        # open, governs the session frame by frame (models, budget slice, bounds) to its end
        WebSocket(rt),
        RateLimit(rt),  # 429 rate_limited; makes Budget's reservation in the same store trip
        Budget(rt),  # 402 budget_exceeded / model_price_unknown; reserve, then settle on response
    ]
    # -- what Candela answers itself, once the caller is known ------------------------------
    local = [
        # `candela` only (inert in candela-server). Claims /_local/ (page and API, whose model
        # pull is checked by the same audited model policy as ModelPolicy's). Its
        # requestheaders hook runs before Router's request hook: local models are listed
        # before a chat completion is routed by model name.
        LocalUi(rt),
        # Claims /v1/models and /_local/api/traces, and answers 404 for any route nobody before
        # it claimed or planned: it must stay after every addon that answers a route (Health,
        # Metrics, Admin, LocalUi).
        LocalApi(rt),
    ]
    # -- forwarding: the last gate before the network ---------------------------------------
    forwarding = [
        # provider URL and credentials; denies what nobody planned (503); once a request is
        # on its way, the work its answer need not wait for is done meanwhile: what the
        # addons before deferred (flowstate.defer), its answer's processor, its entry's head
        Upstream(rt, meanwhile=(accounting.meanwhile, audit.meanwhile)),
    ]
    # -- after the response: what it cost and what happened ---------------------------------
    after = [
        accounting,  # streams the response through its usage reader; prices the usage
        Spans(rt),  # one span per proxied request
        Telemetry(rt),  # that span exported over OTLP (GenAI conventions), fail-open
        audit,  # one ledger entry per proxied request, durable before the response ends
    ]
    return [*edge, *gates, *local, *forwarding, *after]
