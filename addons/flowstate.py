"""Flow state: the RequestContext on a flow, and the one way an addon answers a request itself."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, get_args

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.context import RequestContext, RouteKind
from candela_mitm.errors import Denial, StoreUnavailable
from candela_mitm.providers.encoding import TooLarge, decode_body, needs_work

log = logging.getLogger("candela")
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

KEY = "candela"


def ctx_of(flow: http.HTTPFlow) -> RequestContext | None:
    return flow.metadata.get(KEY)


ROUTE_KINDS: frozenset[str] = frozenset(get_args(RouteKind))


def for_routes(*kinds: RouteKind, but: tuple[RouteKind, ...] = ()) -> Callable[[F], F]:
    """Mark a flow hook that does nothing for a flow of another route kind, nor for one without
    Candela's context: the hook table (mitm_patches.HookTable) does not call it for those (a
    call that returns at once costs a few µs with the caches cold; issue 21). `but`: every
    kind but those. The hook keeps its own check: it is called directly by tests, and by
    mitmproxy's own chain without the table."""
    routes = frozenset(kinds or ROUTE_KINDS) - frozenset(but)
    unknown = routes - ROUTE_KINDS
    if unknown:
        raise ValueError(f"no such route kind: {sorted(unknown)}")

    def mark(fn: F) -> F:
        fn.candela_routes = routes  # type: ignore[attr-defined]
        return fn

    return mark


def answered(flow: http.HTTPFlow) -> bool:
    """True once Candela (or anything before it) has set the response: later hooks stand aside."""
    return flow.response is not None


def trace_headers(ctx: RequestContext | None) -> dict[str, str]:
    if ctx is None:
        return {}
    return {"X-Candela-Span-Id": ctx.span_id, "X-Candela-Trace-Id": ctx.trace.trace_id}


def workload_headers(ctx: RequestContext | None) -> dict[str, str]:
    """For an admin's intercepted request, the process it came from as the kernel named it
    (X-Candela-Workload-Pid, -Exe, -Exe-SHA256, -Uid, -Cgroup, ...); nothing for anyone else."""
    if ctx is None or not ctx.workload or ctx.principal is None or ctx.principal.role != "admin":
        return {}
    return {
        "X-Candela-" + k.replace("_", "-").title().replace("Sha256", "SHA256"): str(v)
        for k, v in ctx.workload.items()
        if v is not None
    }


def header_str(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # as mitmproxy's Headers decodes a value


def head_values(headers: http.Headers, names: frozenset[bytes]) -> dict[bytes, str]:
    """`headers.get(name)` for each of `names` (lower-case) that the head holds, in one pass
    over its fields: each Headers.get is a pass of its own through the Mapping ABC (~3 µs),
    and the request hooks read a head for several names."""
    found: dict[bytes, str] = {}
    for k, v in headers.fields:
        low = k.lower()
        if low in names:
            found[low] = found[low] + ", " + header_str(v) if low in found else header_str(v)
    return found


def has_field(headers: http.Headers, name: str) -> bool:
    """`name in headers`, in one pass over the fields (through the Mapping ABC it is a
    __getitem__, a get_all and a KeyError when absent: ~10 µs of a request's CPU at c1)."""
    low = name.encode("utf-8", "surrogateescape").lower()
    for k, _ in headers.fields:
        if k.lower() == low:
            return True
    return False


_CONTENT_ENCODING = frozenset({b"content-encoding"})


def set_headers(headers: http.Headers, values: dict[str, str]) -> None:
    """`headers[name] = value` for each of `values`, in one pass over the fields (each
    Headers assignment is a pass of its own): a name already there keeps its place and
    spelling and its later repeats go, a new one is added at the end, in `values`' order."""
    if not values:
        return
    new = {k.lower().encode(): (k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in values.items()}
    out: list[tuple[bytes, bytes]] = []
    done: set[bytes] = set()
    for k, v in headers.fields:
        low = k.lower()
        if low in new:
            if low not in done:
                out.append((k, new[low][1]))
                done.add(low)
        else:
            out.append((k, v))
    out.extend(pair for low, pair in new.items() if low not in done)
    headers.fields = tuple(out)


def answer_json(
    flow: http.HTTPFlow, status: int, payload: Any, headers: dict[str, str] | None = None
) -> None:
    ctx = ctx_of(flow)
    h = {
        "Content-Type": "application/json",
        **trace_headers(ctx),
        **workload_headers(ctx),
        **(headers or {}),
    }
    flow.response = http.Response.make(status, json.dumps(payload).encode(), h)
    if ctx is not None:
        ctx.status_code = status


def deny(flow: http.HTTPFlow, denial: Denial) -> None:
    """Answer with a denial: JSON with its code, never forwarded upstream."""
    ctx = ctx_of(flow)
    answer_json(flow, denial.status, denial.payload(), denial.headers)
    if ctx is not None:
        ctx.denial_code = denial.error


def after_answer(record: Callable[[http.HTTPFlow], None], flow: http.HTTPFlow) -> None:
    """Observability work of a finished request (its span, metrics, OTLP export), run on the
    event loop once the current hook round is over: a buffered answer (or a stream's end) is
    written by mitmproxy as soon as the response hooks return, so this runs after the client
    has it, or while the answer waits for its audit commit; never before. The next event of
    any connection comes after it (the loop's ready queue is first in, first out), so a
    /metrics scrape or a trace read sent after an answer sees that answer counted. Without a
    running loop (a hook called directly) it runs at once.

    A flow's records of one round (Spans, Metrics, Telemetry) run in one loop callback, in the
    order they came: one call_soon per answer instead of three."""
    c = ctx_of(flow)
    if c is not None and c.records_after_answer is not None:
        c.records_after_answer.append(record)
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        record(flow)
        return
    if c is None:
        loop.call_soon(record, flow)
        return
    c.records_after_answer = [record]
    loop.call_soon(_run_after_answer, flow, c)


def _run_after_answer(flow: http.HTTPFlow, c: RequestContext) -> None:
    records, c.records_after_answer = c.records_after_answer or [], None
    for record in records:
        try:
            record(flow)
        except Exception:  # as the loop would log a callback's: the next record still runs
            log.exception("recording a finished request failed")


def defer(c: RequestContext, work: Callable[[], None]) -> None:
    """Leave `work` until the request is on its way to the upstream (run_later): pre-forward
    work that decides nothing for this request should not hold up its bytes. At concurrency 1
    the event loop is idle while the upstream works, and an idle loop's turn is free."""
    if c.later is None:
        c.later = [work]
    else:
        c.later.append(work)


def run_later(c: RequestContext) -> None:
    """Run (once, in order) what was deferred for the request: by Upstream once its bytes are
    written, else by the first response or error hook that needs it done (RateLimit's, for
    its headers) and at the latest by Audit's, the last hook of every flow."""
    later, c.later = c.later, None
    if later is None:
        return
    for work in later:
        try:
            work()
        except Exception:
            log.exception("deferred work of span %s failed", c.span_id)


def nothing_sent(server_conn: Any) -> bool:
    """No byte of the request can have reached the upstream: the connection (or its TLS
    handshake) was never set up. A reused or established connection may have carried it."""
    if getattr(server_conn, "timestamp_tcp_setup", None) is None:
        return True
    return bool(server_conn.tls) and server_conn.timestamp_tls_setup is None


def note_failure(flow: http.HTTPFlow) -> None:
    """Put how a failed flow failed on its context, before anything accounts it."""
    c = ctx_of(flow)
    if c is None or flow.error is None:
        return
    if c.error is None:
        c.error = flow.error.msg
    if c.finished:
        return  # accounted already (a response that ended, then failed on its way out)
    if c.forwarded and c.first_byte_at is None and nothing_sent(flow.server_conn):
        c.upstream_unreached = True


# Decompression runs here, off the event loop (zlib, brotli and zstd release the GIL while they
# work); two threads: a burst of compressed bodies queues instead of taking every core.
_DECODER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="candela-decode")


# Work that grows with a body runs SLICE_S at a time, then leaves the loop to every other flow
# for PAUSE_S: a request needs a few dozen turns of the loop (read, each hook, write), which
# behind a bare sleep(0) would each wait for a slice; in the pause they run together. A large
# body costs its own request a few times its CPU time in wall time, no one else's.
SLICE_S = 0.002
PAUSE_S = 0.006


async def sliced(work: Generator[None, None, T]) -> T:
    """Run work that yields often (providers/jsonbody.py, the estimate's scan) on the event
    loop, SLICE_S at a time, every other flow taking its turn in between. Not on a thread: a
    C call that builds Python objects (parsing or writing JSON) holds the GIL throughout, and
    a CPU-bound thread makes each turn of the loop wait for the GIL (up to 5 ms a turn)."""
    deadline = time.perf_counter() + SLICE_S
    while True:
        try:
            next(work)
        except StopIteration as done:
            return done.value
        if time.perf_counter() >= deadline:
            await asyncio.sleep(PAUSE_S)
            deadline = time.perf_counter() + SLICE_S


async def decode_request_body(flow: http.HTTPFlow, limit: int) -> bytes:
    """The request body with its Content-Encoding undone (at most `limit` bytes out, TooLarge
    past it; ValueError when it cannot be decoded), decompressed off the event loop."""
    raw = flow.request.raw_content or b""
    enc = head_values(flow.request.headers, _CONTENT_ENCODING).get(b"content-encoding", "")
    if raw and needs_work(enc):
        return await asyncio.get_running_loop().run_in_executor(
            _DECODER, decode_body, raw, enc, limit
        )
    return decode_body(raw, enc, limit)


async def decoded_body(flow: http.HTTPFlow, limit: int) -> bytes | None:
    """The request body, Content-Encoding undone with a ceiling; None once a denial is answered."""
    try:
        return await decode_request_body(flow, limit)
    except TooLarge:
        deny(flow, errors.payload_too_large(limit))
    except ValueError as e:
        deny(flow, errors.bad_request(f"the body cannot be decoded: {e}"))
    return None


def _deny_on(flow: http.HTTPFlow, exc: BaseException, hook: str) -> None:
    if isinstance(exc, StoreUnavailable):
        reason = "the state store is unavailable"
    else:
        reason = "an internal error"
        log.exception("governance hook %s failed; denying", hook)
    if flow.response is None:
        deny(flow, errors.governance_unavailable(reason))
    else:
        c = ctx_of(flow)
        if c is not None and c.error is None:
            c.error = f"{hook}: {type(exc).__name__}"


def only_when(applies: Callable[[Any, http.HTTPFlow], Any]) -> Callable[[F], F]:
    """For an async hook with work for few flows (a route, a mode): `applies(self, flow)`
    decides synchronously, and a flow it does not pick gets no coroutine at all (mitmproxy
    awaits what a hook returns, and a plain None is nothing to await). A coroutine and its
    fail_closed wrapper for each of ~10 such hooks per request were 0.16 µs each warm,
    several times that in a request's cold run. `applies` answers falsy only for a flow the
    hook would do nothing for (the hook keeps its own checks); if it raises, the flow is
    denied as fail_closed denies. Put it above @fail_closed."""

    def decorate(hook: F) -> F:
        @functools.wraps(hook)
        def gate(self: Any, flow: http.HTTPFlow) -> Any:
            try:
                if not applies(self, flow):
                    return None
            except Exception as e:
                _deny_on(flow, e, f"{type(self).__name__}.{hook.__name__}")
                return None
            return hook(self, flow)

        return gate  # type: ignore[return-value]

    return decorate


def fail_closed(hook: F) -> F:
    """mitmproxy forwards a flow whose hook raised: catch every exception and deny with 503."""
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def awrapper(self: Any, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception as e:
                _deny_on(flow, e, f"{type(self).__name__}.{hook.__name__}")

        return awrapper  # type: ignore[return-value]

    @functools.wraps(hook)
    def wrapper(self: Any, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception as e:
            _deny_on(flow, e, f"{type(self).__name__}.{hook.__name__}")

    return wrapper  # type: ignore[return-value]
