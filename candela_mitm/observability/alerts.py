"""Alert notifier: budget threshold alerts looked for and posted to webhooks, off the request path.

Two daemon threads per process. The *checker* takes the budgets settlements touched (coalesced:
one entry per scope, id and period however many requests settled on it), reads each one's
period row, sets `candela_budget_utilization`, and claims the thresholds reached
(governance/alerts.py). The *sender* posts each claimed alert to every webhook, retrying a
failed post with a doubling backoff up to a cap, and audits every alert sent and every one
given up on (`budget_alert`). Nothing here blocks or fails a request: the request path only
puts an entry in a dict under a lock (`settled`), and every failure is counted and logged
(observability fails open). Webhook header values (tokens) and URL paths (Slack's hold the
secret) are never logged nor audited: a webhook is named by its index and host.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from candela_mitm.audit.actions import BUDGET_ALERT
from candela_mitm.audit.writer import AuditWriter
from candela_mitm.config import Alerts, Webhook
from candela_mitm.governance.alerts import (
    AlertRule,
    AlertRuleStore,
    BudgetAlert,
    Watch,
    backoff_s,
    watches,
)
from candela_mitm.governance.ledger import Reservation
from candela_mitm.observability.metrics import Metrics
from candela_mitm.state.ports import rfc3339, utc_now

log = logging.getLogger("candela.alerts")

# Budgets waiting for a look: one per (scope, id, period) however many settlements touched it,
# so the bound is in distinct budgets; past it a settlement is not looked at (counted), and the
# next settlement on that budget looks again.
MAX_PENDING = 10_000
# The checker looks this often (when something is pending), woken by nothing else: the
# settlements in between coalesce into one look per budget (at 800 requests/s on 64 users, a
# look per settlement was 50 µs of CPU per request on the checker thread, competing with the
# event loop for the GIL). A threshold crossed is posted at most this much later; flush()
# looks at once.
CHECK_INTERVAL_S = 0.5
# Ids the utilisation gauge exports per scope (only users, tenants and keys the deployment knows)
MAX_GAUGE_IDS = 256

Post = Callable[[Webhook, bytes, float], int]


def webhook_name(index: int, hook: Webhook) -> str:
    """How logs and the audit trail name a webhook: its place and host, never its path (a Slack
    webhook's path is its secret) nor its headers."""
    return f"{index}:{urlsplit(hook.url).hostname}"


def http_post(hook: Webhook, body: bytes, timeout_s: float) -> int:
    """POST `body` as JSON; the answer's status (an HTTP error status too). Raises OSError when
    no answer came (refused, unreachable, timed out)."""
    req = urllib.request.Request(hook.url, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("User-Agent", "candela-alerts")
    for name, value in hook.headers.items():
        req.add_header(name, value)
    # no proxy from the environment: an alert goes straight to its webhook
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            resp.read(65536)
            return int(resp.status)
    except urllib.error.HTTPError as e:  # an answer, with an error status
        status = int(e.code)
        e.close()
        return status


def body_for(alert: BudgetAlert, hook: Webhook) -> bytes:
    payload = alert.slack() if hook.format == "slack" else alert.to_json()
    return json.dumps(payload).encode()


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    alert: BudgetAlert = field(compare=False)
    index: int = field(compare=False)
    hook: Webhook = field(compare=False)
    attempts: int = field(default=0, compare=False)
    last: str = field(default="", compare=False)  # the last failure: "http 500", "URLError"


class AlertNotifier:
    """Budget alerts of one proxy process: `settled` on the request path, the rest on threads."""

    def __init__(
        self,
        store: AlertRuleStore,
        audit: AuditWriter,
        metrics: Metrics,
        config: Callable[[], Alerts],
        known: Callable[[str, str], bool] = lambda scope, ident: True,
        clock: Callable[[], datetime] = utc_now,
        post: Post = http_post,
        monotonic: Callable[[], float] = time.monotonic,
        check_interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        self.rule = AlertRule(store)
        self.audit = audit
        self.metrics = metrics
        self.config = config  # read at each use: a reload's thresholds and webhooks apply
        self.known = known
        self.clock = clock
        self.post = post
        self.monotonic = monotonic
        self._lock = threading.Condition()
        self._pending: dict[tuple[str, str, str], Watch] = {}
        self._deliveries: list[_Delivery] = []  # a heap by due time
        self._seq = itertools.count()
        self._busy = 0  # looks and posts under way (for flush)
        self._closed = False
        self._check_interval_s = check_interval_s
        self._hurry = 0  # flushes waiting: the checker looks now, not at its next interval
        self._gauge_ids: dict[str, set[str]] = {"user": set(), "tenant": set(), "key": set()}
        # when each exported budget's period ends: a scrape after it shows 0 until the next look
        self._gauge_resets: dict[tuple[str, str], datetime] = {}
        self._gauge_lock = threading.Lock()
        metrics.on_scrape(self._expire_gauges)
        self._threads = [
            threading.Thread(target=self._check_loop, name="candela-alerts-check", daemon=True),
            threading.Thread(target=self._send_loop, name="candela-alerts-send", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- the request path ----------------------------------------------------------------------
    def settled(self, res: Reservation) -> None:
        """A reservation was settled (its transaction committed): look at its budgets soon.
        Never raises, never waits for more than a dict update."""
        try:
            with self._lock:
                if self._closed:
                    return
                for w in watches(res):
                    if w.key not in self._pending and len(self._pending) >= MAX_PENDING:
                        self.metrics.alerts.labels("dropped").inc()
                        continue
                    self._pending[w.key] = w
                # no wake: the checker looks by the clock (a wake per request is a cross-CPU
                # interrupt, the most expensive thing here at one connection)
        except Exception:
            self.metrics.observability_errors.labels("alerts").inc()

    # -- checker -------------------------------------------------------------------------------
    def _check_loop(self) -> None:
        last = -self._check_interval_s
        while True:
            with self._lock:
                # every interval while idle, at once for a flush: the settlements of the
                # moments between two looks join one look
                while not self._closed:
                    left = last + self._check_interval_s - time.monotonic()
                    if self._pending and (self._hurry or left <= 0):
                        break
                    self._lock.wait(left if left > 0 else self._check_interval_s)
                if self._closed:
                    return
                last = time.monotonic()
                batch, self._pending = self._pending, {}
                self._busy += 1
            try:
                for w in batch.values():
                    self._check(w)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._lock.notify_all()

    def _check(self, w: Watch) -> None:
        try:
            cfg = self.config()
            now = self.clock()
            seen = self.rule.observe(w, cfg.thresholds, now, claim=bool(cfg.webhooks))
            if seen.utilization is not None and w.period_key == w.period.key(now):
                self._set_gauge(w, seen.utilization)
            for alert in seen.alerts:
                for index, hook in enumerate(cfg.webhooks):
                    self._enqueue(alert, index, hook, cfg.queue_max)
        except Exception as e:  # the store or a setting: this look is lost, the next one retries
            self.metrics.observability_errors.labels("alerts").inc()
            log.warning("budget alert check of %s %s failed: %s", w.scope, w.scope_id, type(e).__name__)

    def _set_gauge(self, w: Watch, utilization: float) -> None:
        ids = self._gauge_ids[w.scope]
        if w.scope_id not in ids:
            if len(ids) >= MAX_GAUGE_IDS or not self.known(w.scope, w.scope_id):
                return
            ids.add(w.scope_id)
        with self._gauge_lock:
            self.metrics.budget_utilization.labels(w.scope, w.scope_id).set(utilization)
            self._gauge_resets[(w.scope, w.scope_id)] = w.period.resets_at(w.at)

    def _expire_gauges(self) -> None:
        """At a scrape: a budget whose period has ended since its last look is at 0 (nothing
        is spent of a new period until a settlement says so)."""
        now = self.clock()
        with self._gauge_lock:
            for (scope, ident), resets_at in list(self._gauge_resets.items()):
                if resets_at <= now:
                    self.metrics.budget_utilization.labels(scope, ident).set(0.0)
                    del self._gauge_resets[(scope, ident)]

    # -- sender --------------------------------------------------------------------------------
    def _enqueue(self, alert: BudgetAlert, index: int, hook: Webhook, queue_max: int) -> None:
        d = _Delivery(self.monotonic(), next(self._seq), alert, index, hook)
        with self._lock:
            full = len(self._deliveries) >= queue_max
            if not full:
                heapq.heappush(self._deliveries, d)
                self._lock.notify_all()
        if full:
            d.last = "queue_full"
            self._finish(d, sent=False)

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._closed:
                        return
                    if self._deliveries:
                        wait = self._deliveries[0].due - self.monotonic()
                        if wait <= 0:
                            d = heapq.heappop(self._deliveries)
                            self._busy += 1
                            break
                        self._lock.wait(wait)
                    else:
                        self._lock.wait()
            try:
                self._attempt(d)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._lock.notify_all()

    def _attempt(self, d: _Delivery) -> None:
        cfg = self.config()
        d.attempts += 1
        try:
            status = self.post(d.hook, body_for(d.alert, d.hook), cfg.timeout_s)
            ok = 200 <= status < 300
            d.last = f"http {status}"
        except Exception as e:  # refused, unreachable, timed out: its class, never its text
            ok = False
            d.last = type(e).__name__
        if ok:
            self._finish(d, sent=True)
            return
        if d.attempts >= cfg.max_attempts:
            self._finish(d, sent=False)
            return
        wait = backoff_s(d.attempts, cfg.initial_backoff_s, cfg.max_backoff_s)
        log.info(
            "budget alert to webhook %s failed (%s, attempt %d): again in %.1fs",
            webhook_name(d.index, d.hook), d.last, d.attempts, wait,
        )
        d.due = self.monotonic() + wait
        with self._lock:
            closed = self._closed
            if not closed:
                heapq.heappush(self._deliveries, d)
                self._lock.notify_all()
        if closed:  # shut down while it was being posted: no retry will come
            d.last = f"shutdown after {d.last}"
            self._finish(d, sent=False)

    def _finish(self, d: _Delivery, sent: bool) -> None:
        a = d.alert
        outcome = "sent" if sent else "failed"
        self.metrics.alerts.labels(outcome).inc()
        if not sent:
            log.warning(
                "budget alert %s %s %d%% to webhook %s given up after %d attempt(s): %s",
                a.scope, a.scope_id, a.threshold, webhook_name(d.index, d.hook), d.attempts, d.last,
            )
        fields: dict[str, Any] = {
            "outcome": outcome,
            "scope": a.scope,
            "scope_id": a.scope_id,
            "user_id": a.user_id,
            "tenant_id": a.tenant,
            "threshold": a.threshold,
            "period": a.period,
            "period_start": rfc3339(a.period_start),
            "resets_at": rfc3339(a.resets_at),
            "spent_usd": round(a.spent_usd, 9),
            "budget_usd": round(a.budget_usd, 9),
            "webhook": webhook_name(d.index, d.hook),
            "format": d.hook.format,
            "attempts": d.attempts,
            "result": d.last,
        }
        try:
            if not self.audit.record(BUDGET_ALERT, **fields):
                self.metrics.observability_errors.labels("alerts").inc()
        except Exception:
            self.metrics.observability_errors.labels("alerts").inc()

    # -- lifecycle -----------------------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every look and post under way or due is done (tests, shutdown). A post
        waiting for a retry counts: this returns False at the timeout while one does."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._hurry += 1
            self._lock.notify_all()
            try:
                while self._pending or self._deliveries or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._lock.wait(min(left, 0.05))
            finally:
                self._hurry -= 1
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Stop both threads; a post still waiting for its retry is given up, and audited as
        failed (`result: shutdown`): call before the audit writer closes."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
            left, self._deliveries = self._deliveries, []
            self._lock.notify_all()
        for t in self._threads:
            t.join(timeout)
        for d in left:
            d.last = f"shutdown after {d.last}" if d.last else "shutdown"
            self._finish(d, sent=False)
