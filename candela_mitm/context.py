"""Request context: the one per-flow record every addon reads and writes (flow.metadata["candela"])."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from candela_mitm.observability.spans import TraceContext, new_span_id
from candela_mitm.providers.forwarding import ForwardPlan
from candela_mitm.providers.usage import Usage

RouteKind = Literal[
    "health", "models", "chat", "proxy", "traces", "local", "admin", "metrics", "not_found"
]


@dataclass
class RequestContext:
    kind: RouteKind
    provider: str | None  # route name for /proxy/<provider>/...
    rest: str  # the path after /proxy/<provider>, query included
    trace: TraceContext
    span_id: str = field(default_factory=new_span_id)
    started: float = field(default_factory=time.monotonic)
    client_address: str | None = None
    intercepted: bool = False  # arrived through the transparent listener (SNI-routed)
    principal: Any = None  # identity.Principal once authenticated
    settings: Any = None  # users.UserSettings of the principal
    tenant: str | None = None
    body: dict[str, Any] | None = None  # the parsed JSON request body
    plan: ForwardPlan | None = None
    reservation: Any = None  # ledger.Reservation while one is held
    estimate_usd: float = 0.0
    denial_code: str | None = None  # set when Candela answered with a denial
    forwarded: bool = False
    # forwarded, then failed before a connection to the upstream was made: nothing left
    upstream_unreached: bool = False
    first_byte_at: float | None = None
    processor: Any = None  # streaming.ResponseProcessor on proxied responses
    feed_pending: Any = None  # a whole (unstreamed) body still to run through the processor
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    # how cost_usd was found (governance/accounting.py): "reported", "observed", "reserved";
    # None when nothing was charged (never forwarded, never reached, refused by the provider)
    usage_source: str | None = None
    finished: bool = False  # accounting done (response or error), exactly once
    error: str | None = None
    status_code: int | None = None
    policy: dict[str, Any] | None = None  # the model policy decision, for audit
    audited: bool = False  # the request's audit entry is queued (addons/audit.py), exactly once
    audit_commit: Any = None  # the loop future that tells when that entry is committed

    @property
    def model(self) -> str | None:
        return self.plan.model if self.plan else None

    @property
    def user(self) -> str | None:
        return getattr(self.principal, "user", None)

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
