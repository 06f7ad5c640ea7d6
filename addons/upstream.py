"""Upstream: points a planned request at its provider with the provider's credentials, never the client's."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.providers.headers import client_response_fields
from candela_mitm.providers.jsonbody import dumps_sliced
from candela_mitm.providers.target import STRIPPED_HEADERS
from candela_mitm.providers.upstream_auth import CredentialsUnavailable, header_names_to_strip
from candela_mitm.runtime import Runtime

from . import mitm_patches
from .flowstate import answered, ctx_of, deny, fail_closed, run_later, sliced

log = logging.getLogger("candela.upstream")


# json.dumps(obj, ensure_ascii=False) without making an encoder per call (it is stateless)
_JSON = json.JSONEncoder(ensure_ascii=False)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # as mitmproxy's Headers encodes a value


def replaces_provider_key(setting: bool | list[str], route: str) -> bool:
    """interception.replace_provider_keys: true, false, or the routes where Candela replaces it."""
    return setting if isinstance(setting, bool) else route in setting


class Upstream:
    def __init__(
        self, rt: Runtime, meanwhile: Sequence[Callable[[http.HTTPFlow], None]] = ()
    ) -> None:
        self.rt = rt
        # run once a request's bytes are on their way (call_soon: after this step writes them),
        # after the request's own deferred work (flowstate.run_later)
        self.meanwhile = tuple(meanwhile)
        # lower-case header names as mitmproxy keeps them (bytes)
        # what would make the upstream answer another operation or shape (providers/target.py)
        reshaping = frozenset(n.encode() for n in STRIPPED_HEADERS)
        self.strip = frozenset(n.encode() for n in header_names_to_strip()) | reshaping
        self.strip_kept_key: frozenset[bytes] = reshaping
        # set by Candela on every forwarded request (the body's: only when it sends its own)
        self.replace = frozenset({b"host", b"traceparent", b"accept-encoding"})
        self.replace_with_body = self.replace | {b"content-encoding", b"content-type", b"content-length"}
        self.timeout_s = rt.config.limits.upstream_timeout_s
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if answered(flow):
            return
        if c is None or c.plan is None:
            # the last gate: a request nobody answered and nobody planned never leaves
            deny(flow, errors.governance_unavailable("no forwarding decision was made"))
            return
        if not self.rt.audit.healthy:
            # the ledger is failing (a full disk, an I/O error): nothing is forwarded that
            # could not be recorded; the writer keeps retrying, and forwarding resumes with it
            deny(flow, errors.governance_unavailable("the audit trail cannot be written"))
            return
        plan = c.plan
        up = plan.upstream
        req = flow.request
        # an intercepted app keeps its own provider key only where config says Candela leaves it
        keep_key = c.intercepted and not replaces_provider_key(
            self.rt.config.interception.replace_provider_keys, up.name
        )
        body_obj = plan.body if plan.body is not None else c.body
        content: bytes | None = None
        if body_obj is not None and not (keep_key and plan.body is None):
            # the upstream gets exactly the JSON Candela checked: no second reading of the bytes
            # (an app that signs its own request, kept as sent, was read from these same bytes)
            if c.scan is not None:  # a large body (router.py): written in slices, as it was read
                content = await sliced(dumps_sliced(body_obj))
            else:
                content = _JSON.encode(body_obj).encode()
        # One pass over the caller's headers (each Headers edit rescans them all): its
        # credentials and Candela's own never go upstream; the ones Candela sets are replaced.
        strip = self.strip_kept_key if keep_key else self.strip
        replace = self.replace_with_body if content is not None else self.replace
        fields = [
            (k, v)
            for k, v in req.headers.fields
            if (low := k.lower()) not in strip and low not in replace and not low.startswith(b"x-candela-")
        ]
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in fields)
        if content is not None:
            req.data.content = content
            fields.append((b"content-type", b"application/json"))
            if not chunked:  # as Message.content does: no length beside a transfer-encoding
                fields.append((b"content-length", str(len(content)).encode()))
        fields.append((b"traceparent", _b(c.trace.traceparent_for(c.span_id))))
        # usage is read from the bytes as they pass: ask for them uncompressed
        fields.append((b"accept-encoding", b"identity"))
        fields.insert(0, (b"host", _b(up.host_header)))
        req.headers.fields = tuple(fields)
        req.path = plan.path
        if not keep_key and "?" in plan.path and "key" in req.query:
            # ?key= is a credential (the Gemini SDK sends Candela's key there): it never goes
            # upstream. (A path without a query has none: `req.query` parses the path on every
            # read, about 20 µs a request.)
            del req.query["key"]
        # the target, set on the request's data: the host/port setters would each rewrite the
        # Host header again (it is already the upstream's, above)
        data = req.data
        data.scheme = up.scheme.encode()
        data.host = up.host
        data.port = up.port
        data.path = up.base_path.encode() + data.path
        if data.authority:  # HTTP/2 or absolute-form: the authority names the upstream too
            req.authority = up.host_header
        if keep_key:
            self._forward(flow)
            return
        try:
            if self.rt.credentials.reads_request(up):
                creds = await self.rt.credentials.headers_for(
                    up, req.method, req.url, dict(req.headers), req.raw_content or b""
                )
            else:
                creds = await self.rt.credentials.headers_for(up, req.method, "", {}, b"")
        except CredentialsUnavailable as e:
            # the details (which variable, which file) are for the operator's log, not the caller
            log.warning("no credential for %s: %s", up.name, e)
            deny(flow, errors.upstream_credentials(up.name))
            return
        except Exception:  # fail closed: never forward without the provider's credential
            log.exception("credential error for %s", up.name)
            deny(flow, errors.upstream_credentials(up.name))
            return
        if creds:  # replacing any header of the same name (anthropic-version)
            set_ = {_b(k.lower()): _b(v) for k, v in creds.items()}
            req.headers.fields = tuple(
                (k, v) for k, v in req.headers.fields if k.lower() not in set_
            ) + tuple(set_.items())
        self._forward(flow)

    def _forward(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        assert c is not None and c.plan is not None
        c.forwarded = True
        timeout = c.plan.upstream.timeout_s or self.timeout_s
        loop = asyncio.get_running_loop()
        self._timers[flow.id] = loop.call_later(timeout, self._on_timeout, flow, timeout)
        loop.call_soon(self._on_its_way, flow)

    def _on_its_way(self, flow: http.HTTPFlow) -> None:
        """The request's bytes are written: while the upstream works, the event loop (idle at
        concurrency 1) does what the answer need not wait for."""
        c = ctx_of(flow)
        if c is not None:
            run_later(c)
        for work in self.meanwhile:
            try:
                work(flow)
            except Exception:
                log.exception("work done while the upstream answers failed")

    def _cancel(self, flow: http.HTTPFlow) -> None:
        t = self._timers.pop(flow.id, None)
        if t is not None:
            t.cancel()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)
        c = ctx_of(flow)
        if c is not None and c.forwarded and flow.response is not None:
            run_later(c)  # done already unless the answer came first (its RateLimit headers)
            # the provider's answer: only the headers a client needs (org ids and org-wide
            # rate-limit state stay here), and Candela's own rate limit headers (a streamed
            # answer's headers leave before any later hook)
            resp = flow.response
            resp.headers.fields = client_response_fields(
                resp.headers.fields, switching_protocols=resp.status_code == 101, own=c.rate_headers
            )

    def error(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)

    def done(self) -> None:
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()

    def _on_timeout(self, flow: http.HTTPFlow, seconds: float) -> None:
        """No response headers in time: answer 504 JSON to the client and drop the upstream."""
        self._timers.pop(flow.id, None)
        c = ctx_of(flow)
        if flow.response is not None or not flow.live or c is None:
            return
        denial = errors.upstream_timeout(c.plan.upstream.name if c.plan else "?", seconds)
        c.error = "upstream_timeout"
        c.status_code = 504
        c.denial_code = None
        body = denial.body()
        raw: bytes | None = None
        if flow.request.http_version.startswith("HTTP/1"):
            head = (
                f"HTTP/1.1 504 Gateway Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n"
                f"x-candela-span-id: {c.span_id}\r\nx-candela-trace-id: {c.trace.trace_id}\r\n\r\n"
            ).encode()
            raw = head + body
        mitm_patches.abort_flow(flow, raw, "upstream timeout")
