"""Router: names each request's route, reads its body, and plans where it goes."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.context import RequestContext, classify
from candela_mitm.governance.estimate import LARGE_BODY_BYTES, scan_sliced
from candela_mitm.observability.spans import TraceContext
from candela_mitm.providers.catalogue import find
from candela_mitm.providers.encoding import DECODABLE
from candela_mitm.providers.forwarding import (
    ForwardPlan,
    plan_chat_completion,
    plan_provider_request,
)
from candela_mitm.providers.jsonbody import dumps_sliced, loads_sliced
from candela_mitm.providers.target import target_problem
from candela_mitm.runtime import Runtime

from .flowstate import (
    KEY,
    answer_json,
    answered,
    ctx_of,
    decoded_body,
    deny,
    fail_closed,
    head_values,
    header_str,
    sliced,
)

log = logging.getLogger("candela.router")

_LEADING_SPACE = re.compile(rb"[ \t\r\n]*")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def framing_problem(headers: http.Headers) -> str | None:
    """What in a request head could frame its body two ways (request smuggling), or None.

    mitmproxy refuses Content-Length with Transfer-Encoding and Content-Lengths that disagree;
    it accepts a folded header (joining its lines) and any Transfer-Encoding ending in chunked,
    which would reach the upstream as sent."""
    te: list[bytes] = []  # one pass over the fields (Headers.get_all is a pass of its own)
    for k, v in headers.fields:
        if b"\n" in v or b"\r" in v:
            return "a header continued on the next line (obs-fold) is not accepted"
        if k.lower() == b"transfer-encoding":
            te.append(v)
    if te and [header_str(t).strip().lower() for t in te] != ["chunked"]:
        return "Transfer-Encoding other than a single 'chunked' is not accepted"
    return None


_HEAD = frozenset({b"traceparent", b"content-length", b"content-encoding", b"upgrade"})


async def _encodable(body: object, large: bool) -> bool:
    if not large:
        return encodable(body)
    try:
        await sliced(dumps_sliced(body))
    except UnicodeEncodeError:
        return False
    return True


def encodable(body: object) -> bool:
    """Whether a parsed body can be sent as UTF-8 (a lone surrogate escape cannot)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True



def _loads(raw: bytes) -> Any:
    """json.loads(raw), for a body whose first byte is `{` or ASCII white space: its encoding is
    UTF-8 unless the second byte is NUL (json.detect_encoding's rule, its BOMs excluded by that
    first byte), so it is decoded as json.loads decodes it without the detection."""
    if raw[1:2] != b"\x00":
        return json.loads(raw.decode("utf-8", "surrogatepass"))
    return json.loads(raw)


def route_served(rt: Runtime, provider: str | None) -> bool:
    """candela-server serves a local runtime's route only when `providers:` configures it."""
    up = rt.upstreams.get(provider or "")
    if up is None:
        return False
    return not up.spec.local or rt.command == "local" or up.name in rt.config.providers


def is_websocket_upgrade(headers: http.Headers) -> bool:
    return "websocket" in (head_values(headers, _UPGRADE).get(b"upgrade") or "").lower()


_UPGRADE = frozenset({b"upgrade"})


class Router:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.limit = rt.config.limits.max_body_bytes

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        ctx = ctx_of(flow)
        head = head_values(flow.request.headers, _HEAD)
        if ctx is None:  # transparent-mode requests arrive classified by the Sni addon
            kind, provider, rest = classify(flow.request.path)
            ctx = RequestContext(
                kind=kind,
                provider=provider,
                rest=rest,
                trace=TraceContext.from_headers(head.get(b"traceparent")),
                client_address=flow.client_conn.peername[0] if flow.client_conn.peername else None,
            )
            flow.metadata[KEY] = ctx
        if answered(flow):
            return
        if ctx.kind == "proxy" and not route_served(self.rt, ctx.provider):
            deny(flow, errors.not_found(flow.request.path.split("?", 1)[0]))
            return
        problem = framing_problem(flow.request.headers)
        if problem is not None:
            deny(flow, errors.bad_request(problem))
            return
        cl = head.get(b"content-length")
        if cl is not None:
            try:
                if int(cl) > self.limit:
                    deny(flow, errors.payload_too_large(self.limit))
                    return
            except ValueError:
                deny(flow, errors.bad_request("Content-Length is not a number"))
                return
        enc = head.get(b"content-encoding", "").strip().lower()
        if enc not in DECODABLE:
            deny(flow, errors.unsupported_encoding(enc))

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        ctx = ctx_of(flow)
        if ctx is None or answered(flow) or ctx.kind not in ("proxy", "chat"):
            return
        raw = await decoded_body(flow, self.limit)
        if raw is None:
            return
        body = None
        start = _LEADING_SPACE.match(raw)
        first = raw[start.end() : start.end() + 1] if start else raw[:1]
        if first and first != b"{" and self._batch_upload(ctx, flow):
            first = b""  # a batch's input file: Jobs reads the multipart body, off the loop
        if first and first != b"{":  # refused before parsing: a 10 MB array costs nothing
            if first in b"[0123456789-tfn\"":
                deny(flow, errors.bad_request("the JSON body must be an object"))
            else:
                deny(flow, errors.invalid_json("the body is not a JSON object"))
            return
        large = len(raw) > LARGE_BODY_BYTES
        if first:
            try:
                # a large body in slices: one json.loads of 10 MB holds the loop for a second
                body = await sliced(loads_sliced(raw)) if large else _loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                deny(flow, errors.invalid_json(str(e)[:200]))
                return
            except RecursionError:
                deny(flow, errors.invalid_json("the JSON body is nested too deeply"))
                return
            if _SURROGATE_ESCAPE.search(raw) and not await _encodable(body, large):
                deny(flow, errors.invalid_json("the JSON body holds a lone UTF-16 surrogate"))
                return
            if not isinstance(body, dict):
                deny(flow, errors.bad_request("the JSON body must be an object"))
                return
        ctx.body = body
        if body is not None and large:
            ctx.scan = await sliced(scan_sliced(body))  # the estimate's walk, in slices
        method = flow.request.method.upper()
        # after Auth's requestheaders: a refusal here is audited with who asked
        problem = target_problem(flow.request.path)
        if problem is not None:
            deny(flow, errors.invalid_request_target(problem))
            return
        websocket = is_websocket_upgrade(flow.request.headers)
        if websocket and ctx.kind == "chat":
            reason = "no WebSocket operation is governed at this path"
            deny(flow, errors.endpoint_not_governed(method, "/v1/chat/completions", None, reason))
            return
        governance = self.rt.config.governance
        if ctx.kind == "chat":
            if method != "POST":
                deny(flow, errors.method_not_allowed(method, "/v1/chat/completions"))
                return
            model = (body or {}).get("model")
            if not isinstance(model, str) or not model.strip():
                deny(flow, errors.bad_request("'model' is required"))
                return
            route = self.rt.provider_for_model(model)
            if route is None:
                deny(flow, errors.unknown_model(model))
                return
            plan = plan_chat_completion(
                self.rt.upstreams, route, body or {}, governance.async_jobs
            )
        else:
            assert ctx.provider is not None
            configured = self.rt.config.providers.get(ctx.provider)
            plan = plan_provider_request(
                ctx.upstream or self.rt.upstreams[ctx.provider],
                method,
                ctx.rest,
                body,
                allowed=tuple(configured.allow) if configured else (),
                async_jobs=governance.async_jobs,
                websocket=websocket,  # the catalogue's session rows (addons/websocket.py)
            )
        if isinstance(plan, errors.Denial):
            deny(flow, plan)
            return
        ctx.plan = plan
        if plan.operation.billing == "local":
            answer_locally(flow, plan)


    def _batch_upload(self, ctx: RequestContext, flow: http.HTTPFlow) -> bool:
        """A batch's input file uploaded as multipart/form-data (the catalogue's batch_input
        rows): not JSON, read and checked line by line by addons/jobs.py."""
        req = flow.request
        if ctx.kind != "proxy" or req.method.upper() != "POST":
            return False
        if not req.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return False
        up = self.rt.upstreams.get(ctx.provider or "")
        found = find(up.spec.name, "POST", ctx.rest.split("?", 1)[0]) if up else None
        return found is not None and found.operation.billing == "batch_input"


def answer_locally(flow: http.HTTPFlow, plan: ForwardPlan) -> None:
    """An operation Candela answers itself (an agent's reachability probe): nothing forwarded."""
    answer_json(flow, 200, {"candela": plan.operation.name})
    if flow.request.method.upper() == "HEAD":
        assert flow.response is not None
        flow.response.content = b""
