"""Candela's mitmproxy addons; `pipeline` lists them in request order."""

from __future__ import annotations

from typing import Any

from candela_mitm.runtime import Runtime


def pipeline(rt: Runtime) -> list[Any]:
    """The request path, in order: read this list to learn what happens to a request."""
    from .accounting import Accounting
    from .auth import Auth
    from .localapi import Health, LocalApi
    from .router import Router
    from .spans import Spans
    from .upstream import Upstream

    return [
        Router(rt),  # route name, body, forwarding plan (or 400/404/413)
        Health(),  # /healthz, before authentication
        Auth(rt),  # principal (401) and tenant (403)
        LocalApi(rt),  # /v1/models, traces; 404 for anything unclaimed
        Upstream(rt),  # provider URL and credentials; the last gate before the network
        Accounting(rt),  # streamed usage, cost
        Spans(rt),  # one span per proxied request
    ]
