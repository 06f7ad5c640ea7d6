"""Request context: the one per-flow record every addon reads and writes (flow.metadata["candela"])."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from candela_mitm.observability.spans import TraceContext, new_span_id
from candela_mitm.providers.forwarding import ForwardPlan
from candela_mitm.providers.specs import Upstream
from candela_mitm.providers.usage import Usage

if TYPE_CHECKING:  # types only: the context is the vocabulary those modules speak, not a user
    import asyncio

    from candela_mitm.governance.admission import Hold, PriceUnknown
    from candela_mitm.governance.estimate import BodyScan
    from candela_mitm.governance.identity import Principal
    from candela_mitm.governance.ledger import BudgetRefusal, Reservation
    from candela_mitm.governance.ratelimit import Admission
    from candela_mitm.governance.sessions import Session
    from candela_mitm.governance.shadow import ShadowVerdicts
    from candela_mitm.governance.users import UserSettings
    from candela_mitm.observability.otel import StreamModel
    from candela_mitm.observability.spans import Span
    from candela_mitm.providers.streaming import ResponseProcessor
    from candela_mitm.state.ports import JobRecord

RouteKind = Literal[
    "health", "models", "chat", "proxy", "traces", "local", "admin", "metrics", "not_found"
]


@dataclass(slots=True)
class RequestContext:
    """Everything the addons know about one request; no addon keeps per-flow state elsewhere.
    Slotted: its ~60 fields are set in place at creation, once per request, not grown into a
    dict."""

    kind: RouteKind
    provider: str | None  # route name for /proxy/<provider>/...
    rest: str  # the path after /proxy/<provider>, query included
    trace: TraceContext
    span_id: str = field(default_factory=new_span_id)
    started: float = field(default_factory=time.monotonic)
    client_address: str | None = None
    intercepted: bool = False  # arrived through the transparent listener (SNI-routed)
    # the process behind an intercepted connection, from the kernel (workload_pid, workload_exe,
    # workload_exe_sha256, workload_uid, ...), and the governance.workloads rule it matched
    workload: dict[str, Any] | None = None
    workload_rule: int | None = None
    # HMAC fingerprint of the provider key an intercepted app sent (never the key), and whether
    # it is one of the organisation's
    provider_key_fingerprint: str | None = None
    provider_key_ours: bool | None = None
    principal: Principal | None = None  # once authenticated (or attributed by Sni)
    settings: UserSettings | None = None  # the principal's, read by Auth
    tenant: str | None = None
    body: dict[str, Any] | None = None  # the parsed JSON request body
    # decided from the head, before a large body is read and parsed (RateLimit.requestheaders)
    rate_decided: bool = False
    scan: BodyScan | None = None  # a large body's estimate scan, made off the event loop
    plan: ForwardPlan | None = None
    # intercepted for a provider host other than the route's (a data-residency host, another
    # region): the route's upstream at that host (Sni), which the plan forwards to (Router)
    upstream: Upstream | None = None
    # what the request reserves on its budget (governance/admission.py), decided once by
    # whichever of RateLimit and Budget comes first; hold_decided tells None from not yet
    hold: Hold | PriceUnknown | None = None
    hold_decided: bool = False
    # Budget's reserve as RateLimit made it in its own store trip, for Budget to judge
    reserve_result: Reservation | BudgetRefusal | None = None
    reservation: Reservation | None = None  # while one is held: Budget settles or releases it
    # what RateLimit holds beyond the request count (a concurrency lease, a token-window entry)
    # until the request ends, and the IETF RateLimit headers its decisions give every answer
    admission: Admission | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)
    estimate_usd: float = 0.0
    # laptop mode: Gemini's cached input priced at this share of the input price (LocalUi sets
    # it from the local settings when the request is planned; accounting reads it)
    cached_multiplier: float | None = None
    denial_code: str | None = None  # set when Candela answered with a denial
    forwarded: bool = False
    # forwarded, then failed before a connection to the upstream was made: nothing left
    upstream_unreached: bool = False
    first_byte_at: float | None = None
    processor: ResponseProcessor | None = None  # on proxied responses: reads their usage
    # the processor made while the upstream worked, for the content type it most likely
    # answers with (Accounting.meanwhile), and that type: taken only for an answer of it
    processor_ahead: tuple[str, ResponseProcessor] | None = None
    # a whole (unstreamed) body still to run through the processor, run by account()
    feed_pending: Callable[[], None] | None = None
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    # how cost_usd was found (governance/accounting.py): "reported", "observed", "reserved";
    # None when nothing was charged (never forwarded, never reached, refused by the provider)
    usage_source: str | None = None
    finished: bool = False  # accounting done (response or error), exactly once
    error: str | None = None
    status_code: int | None = None
    policy: dict[str, Any] | None = None  # the model policy decision, for audit
    counted: bool = False  # the request's metrics are counted (addons/metrics.py), exactly once
    span: Span | None = None  # the request's span once recorded (addons/spans.py)
    stream_model: StreamModel | None = None  # the model a stream names, read as it passes (OTLP)
    exported: bool = False  # the span went to the OTLP exporter (response, then error: once)
    audited: bool = False  # the request's audit entry is queued (addons/audit.py), exactly once
    # the fields of that entry fixed once the request is forwarded, made while the upstream
    # works (Audit.meanwhile); the entry takes them (and clears this)
    entry_head: dict[str, Any] | None = None
    # what records the answer once the response hooks' round is over (Spans, Metrics,
    # Telemetry: flowstate.after_answer), run in one loop callback; None when none waits
    records_after_answer: list[Callable[[Any], None]] | None = None
    # work the request's answer does not wait for (RateLimit's next rate block, the read-ahead
    # of its tenant's settings, its RateLimit headers): run once the request is on its way to
    # the upstream, while the upstream works (Upstream), or at its end when it never went
    # (flowstate.run_later); None when nothing waits
    later: list[Callable[[], None]] | None = None
    # what follows the entry once its commit is known (True: durable), called once by Audit:
    # Budget's settlement, so that no spend is recorded without its entry
    after_entry: Callable[[bool], None] | None = None
    # the budget slice its hold was carved from (governance/slices.py), named in its audit
    # entry: a restart after a crash settles the slice's spend from those entries
    slice_id: str | None = None
    # the loop future that tells when that entry is committed (True) or timed out (False)
    audit_commit: asyncio.Future[bool] | None = None
    session: Session | None = None  # a WebSocket session, from its start (addons/websocket.py)
    # governance.shadow: the candidate policy's verdicts, audited, never enforced
    shadow: ShadowVerdicts | None = None
    # the user's session lease taken at the upgrade, until the session holds it (or it is refused)
    session_lease: str | None = None
    job: JobRecord | None = None  # the async job a job_result read asks for (addons/jobs.py)
    # the Host the client named, kept by Jobs before Upstream names the provider's: a Message
    # Batch's results_url is pointed back at it
    client_host: str | None = None
    # a batch's input file (addons/jobs.py): at its upload, what is recorded once it is stored
    # (owner, models, the most its requests cost); at the batch's creation, that record
    job_input: dict[str, Any] | None = None

    @property
    def model(self) -> str | None:
        return self.plan.model if self.plan else None

    @property
    def user(self) -> str | None:
        return self.principal.user if self.principal is not None else None

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0

    def ttft_ms(self) -> float | None:
        if self.first_byte_at is None:
            return None
        return (self.first_byte_at - self.started) * 1000.0


def classify(path: str) -> tuple[RouteKind, str | None, str]:
    """Which of Candela's routes a request path is: (kind, provider, rest of path)."""
    bare, _, query = path.partition("?")
    q = ("?" + query) if query else ""
    if bare.startswith("/proxy/"):
        provider, slash, rest = bare[len("/proxy/") :].partition("/")
        return "proxy", provider, ("/" + rest if slash else "/") + q
    if bare in ("/healthz", "/healthz/"):
        return "health", None, q
    if bare in ("/v1/models", "/v1/models/"):
        return "models", None, q
    if bare in ("/v1/chat/completions", "/v1/chat/completions/"):
        return "chat", None, q
    if bare in ("/_local/api/traces", "/_local/api/traces/"):
        return "traces", None, q
    if bare == "/_local" or bare.startswith("/_local/"):
        return "local", None, bare[len("/_local") :] + q
    if bare.startswith("/admin/"):
        return "admin", None, bare + q
    if bare == "/metrics":
        return "metrics", None, q
    return "not_found", None, bare + q
