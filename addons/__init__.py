"""Candela's mitmproxy addons; `pipeline` lists them in request order."""

from __future__ import annotations

from typing import Any

from candela_mitm.runtime import Runtime


def pipeline(rt: Runtime) -> list[Any]:
    """The request path, in order: read this list to learn what happens to a request."""
    from .accounting import Accounting
    from .admin import Admin
    from .audit import Audit, AuditStart
    from .auth import Auth
    from .budget import Budget
    from .console import Console
    from .localapi import Health, LocalApi
    from .localui import LocalUi
    from .metrics import Metrics
    from .modelpolicy import ModelPolicy
    from .ratelimit import RateLimit
    from .router import Router
    from .sni import Sni
    from .spans import Spans
    from .telemetry import Telemetry
    from .upstream import Upstream

    audit = Audit(rt)
    return [
        Sni(rt),  # transparent mode: SNI -> provider route, sandbox attribution (421/403)
        Router(rt),  # route name, body, forwarding plan (or 400/404/413/415)
        Health(),  # /healthz, before authentication
        Console(),  # /admin/ page and assets, before authentication (its calls are authenticated)
        AuditStart(audit),  # first of the response hooks: the entry commits while they run
        Metrics(rt),  # /metrics; request counters at the end
        Auth(rt),  # principal (401) and tenant (403 tenant_not_allowed)
        Admin(rt),  # /admin/v1 (admin-api.md): admin-only routes 403 for developers
        ModelPolicy(rt),  # 403 model_not_allowed, audited allowed or denied (spec 002)
        RateLimit(rt),  # 429 rate_limited
        Budget(rt),  # 402 budget_exceeded / model_price_unknown; reserve, then settle
        LocalUi(rt),  # candela: /_local/ page and API; local models listed before routing
        LocalApi(rt),  # /v1/models, traces; 404 for anything unclaimed
        Upstream(rt),  # provider URL and credentials; the last gate before the network
        Accounting(rt),  # streamed usage, cost
        Spans(rt),  # one span per proxied request
        Telemetry(rt),  # that span exported over OTLP (GenAI conventions), fail-open
        audit,  # one ledger entry per proxied request, durable before the response ends
    ]
