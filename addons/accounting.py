"""Accounting: streams each proxied response through its processor and prices the usage read from it."""

from __future__ import annotations

import time
from collections.abc import Mapping

from mitmproxy import http

from candela_mitm.context import RequestContext
from candela_mitm.governance.accounting import account
from candela_mitm.providers.streaming import ResponseProcessor, is_stream, make_processor
from candela_mitm.providers.usage import BEDROCK_TOKEN_HEADERS
from candela_mitm.runtime import Runtime

from .flowstate import (
    ctx_of,
    head_values,
    note_failure,
    set_headers,
    trace_headers,
    workload_headers,
)


def account_flow(rt: Runtime, flow: http.HTTPFlow, c: RequestContext) -> None:
    """account() of a flow, once: a failure is noted on the context first, so that whichever
    response or error hook accounts it first (Metrics, Budget, ...) charges it the same."""
    note_failure(flow)
    account(c, rt.pricing, rt.config.governance.unknown_model_price)


_CONTENT_TYPE = frozenset({b"content-type"})
_TYPE_KEPT = 200  # longest content type remembered (the upstream's: bounded all the same)
_TYPES_KEPT = 256  # (upstream, streamed) pairs remembered
_BEDROCK_COUNTS = frozenset(n.encode() for n in BEDROCK_TOKEN_HEADERS)


def metered_headers(headers: http.Headers) -> Mapping[str, str]:
    """The response headers the meter reads usage from: Bedrock's token counts, when the answer
    has any (a name that is not ASCII could lower-case to one as text: kept too), else none
    (the meter would look every name up through Headers to find none; it is given the content
    type, so it reads nothing else from them)."""
    for k, _ in headers.fields:
        if k.lower() in _BEDROCK_COUNTS or not k.isascii():
            return headers
    return {}


class Accounting:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # the content type of the last answer of each upstream, streamed and not (a few keys:
        # the configured upstreams), to make the next answer's processor ahead of it
        self._last_type: dict[tuple[str, bool], str] = {}

    def meanwhile(self, flow: http.HTTPFlow) -> None:
        """Run by Upstream once a request is on its way: the processor its answer will most
        likely need (the content type its upstream's last answer had, a status below 400 and
        no Bedrock token headers: all it is chosen by) is made while the upstream works;
        `responseheaders` takes it only if the answer is that, else makes its own."""
        c = ctx_of(flow)
        if c is None or c.plan is None or not c.forwarded:
            return
        ctype = self._last_type.get((c.plan.upstream.name, c.plan.stream))
        if ctype is not None:
            c.processor_ahead = (ctype, make_processor(c.plan, 200, ctype, {}))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or flow.response is None:
            return
        # the trace ids, and for an admin's intercepted request the process it came from
        # (after Upstream's allowlist)
        set_headers(flow.response.headers, {**trace_headers(c), **workload_headers(c)})
        if not c.forwarded or c.plan is None:
            return
        c.first_byte_at = time.monotonic()
        resp = flow.response
        c.status_code = resp.status_code
        ctype = head_values(resp.headers, _CONTENT_TYPE).get(b"content-type", "")
        metered = metered_headers(resp.headers)
        ahead, c.processor_ahead = c.processor_ahead, None
        if ahead is not None and ahead[0] == ctype and resp.status_code < 400 and not metered:
            proc = ahead[1]  # made for this answer while the upstream worked (meanwhile)
        else:
            proc = make_processor(c.plan, resp.status_code, ctype, metered)
            key = (c.plan.upstream.name, c.plan.stream)
            if len(ctype) <= _TYPE_KEPT and (key in self._last_type or len(self._last_type) < _TYPES_KEPT):
                self._last_type[key] = ctype
        c.processor = proc
        if c.plan.translate:
            resp.headers.pop("content-encoding", None)
        if is_stream(ctype, c.plan.stream, resp.status_code):
            # Streams pass through as they arrive. Without a length the body ends with the chunked
            # terminator, sent only after the response hooks: after the audit entry is durable.
            resp.headers.pop("content-length", None)
            resp.stream = proc
        else:
            # A JSON answer is read whole (it comes at once anyway), so every hook sees it before
            # the client gets a byte.
            c.feed_pending = lambda: self._feed_buffered(flow, proc)

    @staticmethod
    def _feed_buffered(flow: http.HTTPFlow, proc: ResponseProcessor) -> None:
        resp = flow.response
        if resp is None:
            return
        body = resp.raw_content or b""
        out = proc.feed(body) + proc.finish() if body else proc.finish()
        c = ctx_of(flow)
        if c is not None and c.plan is not None and c.plan.translate:
            resp.content = out

    def response(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            account_flow(self.rt, flow, c)

    def error(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            account_flow(self.rt, flow, c)  # notes flow.error on the context first
