"""Metrics: Candela's Prometheus series, in one registry per process, served at /metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Distinct values a client-influenced label (model, tenant) may take in one process; past it
# a value is counted as "other". Every series is kept until restart: this bounds their number.
MAX_LABEL_VALUES = 256
MAX_LABEL_CHARS = 128


class WatchView(Protocol):
    """What the metrics show of the settings watch (governance.settings_watch.WatchState)."""

    @property
    def current(self) -> bool: ...

    @property
    def seen(self) -> int | None: ...


def safe_label(value: str) -> str:
    """A label value that can always be exported: what UTF-8 cannot encode (a lone surrogate,
    as mitmproxy decodes a raw non-UTF-8 byte of a path) escaped, and at most MAX_LABEL_CHARS."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")[:MAX_LABEL_CHARS]


class BoundedLabel:
    """The first MAX_LABEL_VALUES distinct values of a label pass (made safe); later ones are
    "other", so no client can add series without end."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        v = safe_label(value)
        if v in self.seen:
            return v
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(v)
        return v


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, providers: tuple[str, ...] = ()) -> None:
        r = self.registry = CollectorRegistry()
        self.providers = frozenset(providers)  # the provider label's values; "unknown" otherwise
        self.model_label = BoundedLabel()
        self.tenant_label = BoundedLabel()
        self.unauthenticated = Counter(
            "candela_unauthenticated_total",
            "Requests refused with nobody authenticated (no valid credential, or refused before "
            "it was looked at), by route kind: every one; the audit ledger holds a bounded sample",
            ["route"],
            registry=r,
        )
        self.requests = Counter(
            "candela_requests_total",
            "Proxied requests by provider, model, tenant and outcome status",
            ["provider", "model", "tenant", "status"],
            registry=r,
        )
        self.policy_denied = Counter(
            "candela_policy_model_denied_total",
            "Requests denied by the model access policy",
            ["model", "tenant", "policy"],
            registry=r,
        )
        self.shadow_decisions = Counter(
            "candela_shadow_decisions_total",
            "Verdicts of the shadow policy (governance.shadow): allowed, denied, error; never enforced",
            ["decision"],
            registry=r,
        )
        self.budget_denied = Counter(
            "candela_budget_denied_total", "Requests denied by the budget gate", ["tenant", "reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "candela_rate_limited_total", "Requests denied by the rate limiter", ["tenant"], registry=r
        )
        self.denials = Counter(
            "candela_denials_total", "Every denial by error code", ["error"], registry=r
        )
        self.cost = Counter(
            "candela_cost_usd_total", "Spend in USD", ["provider", "model", "tenant"], registry=r
        )
        self.charged = Counter(
            "candela_charged_requests_total",
            "Forwarded requests charged, by how the amount was found: reported (the answer's "
            "usage), observed (what passed, above the reservation), reserved (the reservation)",
            ["provider", "source"],
            registry=r,
        )
        self.estimate_exceeded = Counter(
            "candela_estimate_exceeded_total",
            "Requests whose actual cost was above the reservation made for them (a bug in the "
            "estimate: it is meant to be an upper bound)",
            ["provider", "model"],
            registry=r,
        )
        self.tokens = Counter(
            "candela_tokens_total",
            "Tokens by direction (input, output, cached)",
            ["provider", "model", "tenant", "direction"],
            registry=r,
        )
        self.duration = Histogram(
            "candela_request_duration_seconds",
            "Time from request to the end of the response",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "candela_time_to_first_token_seconds",
            "Time from request to the first upstream response byte",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "candela_upstream_errors_total",
            "Upstream failures (unreachable, timeout, 5xx)",
            ["provider", "kind"],
            registry=r,
        )
        # Read from the audit ledger (follow_audit), not counted where the refusal is seen:
        # `candela run` audits its sandbox's refusals from its own process.
        self.bypass_attempts = Counter(
            "candela_bypass_attempts_total",
            "Connections the kernel refused because they tried to go around the proxy",
            ["kind"],
            registry=r,
        )
        self.sessions_open = Gauge(
            "candela_websocket_sessions_open", "WebSocket sessions open now", ["provider"],
            registry=r,
        )
        self.sessions = Counter(
            "candela_websocket_sessions_total",
            "WebSocket sessions ended, by how: client, upstream, or a cut (budget, policy, "
            "frame_too_large, rate_limited, idle, error)",
            ["provider", "ended_by"],
            registry=r,
        )
        self.session_cutoffs = Counter(
            "candela_websocket_cutoffs_total",
            "WebSocket sessions Candela ended itself, by reason",
            ["provider", "reason"],
            registry=r,
        )
        self.observability_errors = Counter(
            "candela_observability_errors_total",
            "Tracing, metrics or mirror failures that were ignored (fail open)",
            ["component"],
            registry=r,
        )
        self.audit_backlog = Gauge(
            "candela_audit_backlog", "Audit entries queued, not yet committed", registry=r
        )
        self.audit_sink_errors = Gauge(
            "candela_audit_sink_errors", "Mirror sink write failures since start", ["sink"], registry=r
        )
        self.audit_sync_errors = Gauge(
            "candela_audit_sync_errors",
            "Failed fsyncs of the audit log since start (audit.durability process_crash)",
            registry=r,
        )
        self.audit_unsynced = Gauge(
            "candela_audit_unsynced_seconds",
            "How long the oldest audit commit not yet fsynced has waited (0: all on the disk)",
            registry=r,
        )
        self.audit_mirror_lag = Gauge(
            "candela_audit_mirror_lag_entries",
            "Entries committed to SQLite not yet in the mirror",
            ["sink"],
            registry=r,
        )
        self.store_calls = Counter(
            "candela_state_store_calls_total",
            "Hot-path state store calls, by where they ran: event_loop (the store could answer "
            "at once) or pool (its lock was taken: another worker, thread or tool writing)",
            ["where"],
            registry=r,
        )
        self.store_on_loop = self.store_calls.labels("event_loop")
        self.store_on_pool = self.store_calls.labels("pool")
        self.budget_utilization = Gauge(
            "candela_budget_utilization",
            "Settled spend over the budget in the current period (1 = all of it), by scope (user, "
            "tenant, key) and id: only configured or admin-created ones and minted keys, at most "
            "256 ids per scope",
            ["scope", "id"],
            registry=r,
        )
        self.alerts = Counter(
            "candela_budget_alerts_total",
            "Budget threshold alert posts by outcome: sent, failed (given up after retries or "
            "the queue was full), dropped (a settlement not looked at: too many budgets waiting)",
            ["outcome"],
            registry=r,
        )
        self.settings_polls = Counter(
            "candela_settings_polls_total",
            "Reads of the state store's settings generation by outcome: ok, failed (remembered "
            "settings are then used for the short TTL only)",
            ["outcome"],
            registry=r,
        )
        self.settings_changes = Counter(
            "candela_settings_changes_total",
            "Changes to users, tenants, grants or keys made through another process that the "
            "settings poll saw and forgot (those made through this one are forgotten as made)",
            registry=r,
        )
        self.settings_watch_current = Gauge(
            "candela_settings_watch_current",
            "1 while the settings generation polls succeed (settings reused up to the long "
            "TTL), 0 while they fail or lag (the short TTL)",
            registry=r,
        )
        self.settings_generation_seen = Gauge(
            "candela_settings_generation_seen",
            "The state store's settings generation as this process last read it (-1: not yet)",
            registry=r,
        )
        self._refreshers: list[Callable[[], None]] = []

    def provider_label(self, name: str | None) -> str:
        return name if name in self.providers else "unknown"

    def note_cost(self, provider: str, model: str, estimate_usd: float, cost_usd: float) -> None:
        """Count a request that cost more than it reserved (no reservation: nothing to compare)."""
        if estimate_usd > 0 and cost_usd > estimate_usd * (1 + 1e-9):
            self.estimate_exceeded.labels(provider, model).inc()

    def on_scrape(self, fn: Callable[[], None]) -> None:
        """Gauges read from elsewhere (audit backlog, mirror lag) are refreshed at each scrape
        (`refresh`)."""
        self._refreshers.append(fn)

    def watch_settings(self, state: Callable[[], WatchView]) -> None:
        """Show the settings watch at each scrape (a failing read is counted, as every refresher)."""

        def refresh() -> None:
            s = state()
            self.settings_watch_current.set(1 if s.current else 0)
            self.settings_generation_seen.set(-1 if s.seen is None else s.seen)

        self.on_scrape(refresh)

    def follow_audit(self, db_path: str | Path) -> AuditCounter:
        """Count candela_bypass_attempts_total from the audit ledger's `bypass_attempt` entries
        (by their `reason`), reading the new ones at each scrape."""
        from candela_mitm.audit.actions import BYPASS_ATTEMPT

        follower = AuditCounter(self.bypass_attempts, db_path, BYPASS_ATTEMPT, "reason")
        self.on_scrape(follower.refresh)
        return follower

    def refresh(self) -> None:
        """Run the scrape-time refreshers. Blocking (one reads the audit SQLite file): the proxy
        runs it on a worker thread, never on the event loop. A failing one is counted, not raised."""
        for fn in self._refreshers:
            try:
                fn()
            except Exception:
                self.observability_errors.labels("metrics").inc()

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, as it is now (in memory, no refresh)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


    def render(self) -> tuple[bytes, str]:
        """Refresh, then the text format: for callers that may block (CLI, tests)."""
        self.refresh()
        return self.exposition()


class AuditCounter:
    """A Counter kept equal to the number of audit entries of one action, by one of their fields.

    Every process that writes to the ledger is counted (the proxy's workers, `candela run`), each
    entry once, and every worker and every restart reports the same total: the whole ledger's.
    `refresh` reads only the entries after the last seq it saw (one indexed query, a read-only
    connection: WAL readers never wait for the writer).
    """

    def __init__(self, counter: Counter, db_path: str | Path, action: str, key: str) -> None:
        self.counter = counter
        self.db_path = Path(db_path)
        self.action = action
        self.key = key
        self.seq = 0  # the newest entry counted
        self._lock = threading.Lock()  # two scrapes at once must not count an entry twice

    def refresh(self) -> None:
        from candela_mitm.audit.chain import connect_readonly
        from candela_mitm.audit.sqlite_sink import count_by_field

        with self._lock:
            try:
                conn = connect_readonly(self.db_path)
            except FileNotFoundError:
                return  # nothing recorded yet
            try:
                seq, counts = count_by_field(conn, self.action, self.key, self.seq)
            finally:
                conn.close()
            for value, n in counts.items():
                self.counter.labels(value or "unknown").inc(n)
            self.seq = seq
