"""Accounting: streams each proxied response through its processor and prices the usage read from it."""

from __future__ import annotations

import time

from mitmproxy import http

from candela_mitm.accounting import account
from candela_mitm.runtime import Runtime
from candela_mitm.streaming import make_processor

from .flowstate import ctx_of, trace_headers


class Accounting:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or flow.response is None:
            return
        for k, v in trace_headers(c).items():
            flow.response.headers[k] = v
        if not c.forwarded or c.plan is None:
            return
        c.first_byte_at = time.monotonic()
        resp = flow.response
        c.status_code = resp.status_code
        proc = make_processor(
            c.plan, resp.status_code, resp.headers.get("content-type"), resp.headers
        )
        c.processor = proc
        if c.plan.translate:
            # the body changes shape: its length is unknown until it has passed
            resp.headers.pop("content-length", None)
            resp.headers.pop("content-encoding", None)
        resp.stream = proc

    def response(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            account(c, self.rt.pricing, self.rt.config.governance.unknown_model_price)

    def error(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is not None:
            if c.error is None and flow.error is not None:
                c.error = flow.error.msg
            account(c, self.rt.pricing, self.rt.config.governance.unknown_model_price)
