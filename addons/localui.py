"""LocalUi: `candela`'s management page (/_local/) and API (health, pull, start, stop, config, spend)."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import date
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.context import RequestContext
from candela_mitm.errors import StoreUnavailable
from candela_mitm.local.discovery import Discovery
from candela_mitm.local.guard import token_path, ui_token, with_token
from candela_mitm.local.process import RuntimeActionError
from candela_mitm.local.settings import LocalSettings
from candela_mitm.providers.encoding import TooLarge
from candela_mitm.providers.forwarding import plan_local_pull
from candela_mitm.runtime import Runtime

from .flowstate import (
    answer_json,
    answered,
    ctx_of,
    decode_request_body,
    deny,
    fail_closed,
    for_routes,
    only_when,
)
from .modelpolicy import check_model

log = logging.getLogger("candela.localui")

# candela-server has no local UI: these hooks of it do nothing there (LocalUi.idle_hooks)
IDLE = frozenset({"requestheaders", "request", "response"})

ASSETS = {
    "local.html": "text/html; charset=utf-8",
    "base.css": "text/css; charset=utf-8",  # shared with the admin console
    "local.css": "text/css; charset=utf-8",
    "local.js": "text/javascript; charset=utf-8",
}
# The page loads nothing from elsewhere and may not be framed (its buttons start processes).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
MAX_BODY = 64 * 1024
ROUTES = {  # path under /_local -> (method, handler name)
    "": ("GET", "page"),
    "/": ("GET", "page"),
    "/api/health": ("GET", "health"),
    "/api/pull": ("POST", "pull"),
    "/api/start": ("POST", "start"),
    "/api/stop": ("POST", "stop"),
    "/api/config": ("GET", "config"),
    "/api/spend": ("GET", "spend"),
}


def load_assets() -> dict[str, bytes]:
    folder = resources.files("candela_mitm").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


async def _json_body(flow: http.HTTPFlow) -> Any:
    """The JSON body, its Content-Encoding undone with MAX_BODY as the ceiling (TooLarge past
    it, ValueError for what cannot be decoded or parsed)."""
    raw = await decode_request_body(flow, MAX_BODY)
    text = raw.decode("utf-8")
    return json.loads(text) if text.strip() else {}


class LocalUi:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.local = rt.local  # None in candela-server: nothing here answers there
        # (mitm_patches.HookTable calls none of them there)
        self.idle_hooks = IDLE if self.local is None else frozenset()
        self.assets = load_assets() if self.local is not None else {}
        if self.local is not None:  # the page carries the token its script sends with writes
            token = ui_token(token_path(rt.config.audit.sqlite_path))
            self.assets["local.html"] = with_token(self.assets["local.html"], token)
        self._refreshing: asyncio.Future[Discovery] | None = None

    async def refresh(self, force: bool = False) -> Discovery:
        """The runtimes' models into rt.local_models; concurrent callers share one lookup."""
        assert self.local is not None
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.rt.blocking(self.local.discover, force))
        d = await asyncio.shield(self._refreshing)
        self.rt.local_models = d.models  # assigned on the event loop: the Router never sees half
        return d

    @for_routes("models", "chat")
    @only_when(lambda self, flow: self.local is not None)  # `candela` (the laptop) only
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if self.local is None or c is None or answered(flow) or c.kind not in ("models", "chat"):
            return
        if self.local.stale():
            try:
                await self.refresh()
            except Exception:  # the last list stays: cloud models route without it
                log.exception("local model discovery failed")

    @only_when(lambda self, flow: self.local is not None)
    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if self.local is None or c is None:
            return
        if c.denial_code == "model_not_found" and c.kind == "chat":
            self.local.invalidate(older_than_s=2.0)  # perhaps pulled since: look on the next one
        if answered(flow):
            return
        if c.plan is not None and c.kind in ("chat", "proxy"):
            multiplier = self.local.cached_multiplier(c.plan.upstream.name)
            if multiplier is not None:
                c.cached_multiplier = multiplier
            return
        if c.kind != "local":
            return
        path = c.rest.split("?", 1)[0]
        if path.startswith("/static/"):
            self.static(flow, path[len("/static/") :])
            return
        route = ROUTES.get(path)
        if route is None:
            return  # LocalApi answers 404
        method = flow.request.method.upper()
        allowed = ("GET", "POST") if path == "/api/config" else (route[0],)
        if method not in allowed:
            deny(flow, errors.method_not_allowed(method, "/_local" + path, allowed))
            return
        if method == "POST" and not self._same_origin(flow):
            deny(flow, errors.forbidden("Cross-origin requests to the management API are refused"))
            return
        name = "set_config" if (path, method) == ("/api/config", "POST") else route[1]
        await getattr(self, name)(flow, c)

    @for_routes("local")
    def response(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if self.local is not None and c is not None and c.kind == "local" and c.forwarded:
            self.local.invalidate()  # a pull ended: the new model is listed on the next lookup

    def done(self) -> None:
        if self.local is not None:
            self.local.close()

    # -- the page --

    def static(self, flow: http.HTTPFlow, name: str) -> None:
        if name not in self.assets:
            deny(flow, errors.not_found("/_local/static/" + name))
            return
        flow.response = http.Response.make(
            200, self.assets[name], {"Content-Type": ASSETS[name], **PAGE_HEADERS}
        )

    async def page(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        self.static(flow, "local.html")

    @staticmethod
    def _same_origin(flow: http.HTTPFlow) -> bool:
        # browsers send Origin on every cross-site POST: a page elsewhere may not drive this API
        origin = flow.request.headers.get("origin")
        return origin is None or urlsplit(origin).netloc == flow.request.headers.get("host", "")

    # -- the API --

    async def health(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        assert self.local is not None
        body = await self.rt.blocking(self.local.health)
        self.rt.local_models = self.local.cached.models if self.local.cached else {}
        answer_json(flow, 200, body)

    async def pull(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        """Forwarded to Ollama's /api/pull, so its NDJSON progress streams back as it comes."""
        try:
            body = await _json_body(flow)
        except TooLarge:
            deny(flow, errors.payload_too_large(MAX_BODY))
            return
        except ValueError as e:
            deny(flow, errors.bad_request(f"the body is not a JSON object: {e}"))
            return
        model = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(model, str) or not model.strip() or len(model) > 256:
            deny(flow, errors.bad_request('\'model\' is required, e.g. {"model": "llama3.2:3b"}'))
            return
        # the model policy check of every planned request, audited the same way (ModelPolicy
        # ran before this, but a pull has no plan until here)
        if not check_model(self.rt, flow, c, model, "ollama"):
            return
        c.body = {"model": model, "stream": True}
        c.plan = plan_local_pull(self.rt.upstreams["ollama"], c.body)  # the Upstream addon sends it on
        self.rt.audit.record("local_pull", actor=c.user, model=model, runtime="ollama")

    async def start(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        await self._process(flow, c, "start")

    async def stop(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        await self._process(flow, c, "stop")

    async def _process(self, flow: http.HTTPFlow, c: RequestContext, action: str) -> None:
        assert self.local is not None
        try:
            result = await self.rt.blocking(getattr(self.local, action))
        except RuntimeActionError as e:
            self.rt.audit.record(
                f"local_runtime_{action}",
                actor=c.user,
                outcome="failed",
                reason=str(e),
                runtime=self.local.runtime,
            )
            deny(flow, errors.runtime_action_failed(e.status, str(e)))
            return
        self.rt.audit.record(
            f"local_runtime_{action}",
            actor=c.user,
            outcome="ok",
            runtime=self.local.runtime,
            result=result,
        )
        answer_json(flow, 200, result)

    async def config(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        assert self.local is not None
        answer_json(flow, 200, self.local.settings.to_json())

    async def set_config(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        assert self.local is not None
        rt = self.rt

        def commit(before: LocalSettings, after: LocalSettings) -> None:
            # durable before the change applies: an unaudited change is never made
            rt.audit.record_durable(
                "local_config_change", actor=c.user, before=before.to_json(), after=after.to_json()
            ).result(10)

        try:
            changes = await _json_body(flow)
            _, after = await rt.blocking(self.local.update_settings, changes, commit)
        except TooLarge:
            deny(flow, errors.payload_too_large(MAX_BODY))
            return
        except ValueError as e:
            deny(flow, errors.bad_request(f"invalid config: {e}"))
            return
        except (StoreUnavailable, TimeoutError):
            deny(flow, errors.governance_unavailable("the audit trail cannot be written"))
            return
        answer_json(flow, 200, after.to_json())

    async def spend(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        assert self.local is not None and c.settings is not None
        user = c.settings.user_id
        st = await self.rt.blocking(self.rt.ledger.status, user, c.settings.daily_budget_usd)
        hourly = await self.rt.blocking(self.local.hourly_spend, user, date.fromisoformat(st.day))
        answer_json(
            flow,
            200,
            {
                "user": user,
                "day": st.day,
                "budget_usd": st.budget_usd,
                "spent_usd": st.spent_usd,
                "reserved_usd": st.reserved_usd,
                "remaining_usd": st.remaining_usd,
                "resets_at": st.resets_at,
                "hourly_usd": [round(v, 10) for v in hourly],  # UTC hours 0..23
            },
        )
