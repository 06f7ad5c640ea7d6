"""Local API: the endpoints Candela answers itself (health, model list, traces, unknown routes)."""

from __future__ import annotations

import time

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.observability.spans import traces_payload
from candela_mitm.runtime import Runtime

from .flowstate import answer_json, answered, ctx_of, deny, fail_closed, for_routes


class Health:
    """GET /healthz: answered before authentication, as load balancers expect."""

    @for_routes("health")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None and c.kind == "health" and not answered(flow):
            answer_json(flow, 200, {"status": "ok"})


class LocalApi:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.started = int(time.time())

    def models_payload(self) -> dict:
        """Local runtime models first (they win a name clash), then every priced cloud model."""
        data = []
        local = self.rt.local_models
        for model, runtime in sorted(local.items()):
            data.append(
                {
                    "id": model,
                    "object": "model",
                    "created": self.started,
                    "owned_by": runtime,
                    "provider": runtime,
                }
            )
        for p in self.rt.pricing.models():
            if p.model in local:
                continue
            provider = self.rt.provider_for_model(p.model) or p.provider
            data.append(
                {
                    "id": p.model,
                    "object": "model",
                    "created": self.started,
                    "owned_by": provider or "candela",
                    "provider": provider,
                }
            )
        return {"object": "list", "data": data}

    @fail_closed
    @for_routes(but=("proxy", "chat"))
    def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow):
            return
        method = flow.request.method.upper()
        if c.kind == "models":
            if method != "GET":
                deny(flow, errors.method_not_allowed(method, "/v1/models"))
            else:
                answer_json(flow, 200, self.models_payload())
        elif c.kind == "traces":
            # candela-server: a developer sees their own spans, an admin everyone's. On a laptop
            # (no credential required) the OS user is the only user and sees all.
            p = c.principal
            if not self.rt.auth_required or (p is not None and p.role == "admin"):
                viewer = None
            else:
                viewer = p.user if p is not None else ""  # "" matches no span: fail closed
            payload = traces_payload(self.rt.spans, flow.request.query.get("limit"), viewer)
            answer_json(flow, 200, payload)
        elif c.kind not in ("proxy", "chat") and c.plan is None:
            # nothing before this claimed or planned the route (admin, UI and metrics come earlier)
            deny(flow, errors.not_found(flow.request.path.split("?", 1)[0]))
