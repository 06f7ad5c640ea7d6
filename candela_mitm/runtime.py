"""Runtime: everything built once from the config at start and handed to every addon."""

from __future__ import annotations

import asyncio
import functools
import getpass
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from candela_mitm.audit import AuditWriter
from candela_mitm.config import PROVIDER_ROUTES, Config, load_config
from candela_mitm.errors import ConfigError
from candela_mitm.governance.identity import Authenticator, MintedKeyLookup
from candela_mitm.governance.ledger import Ledger, process_alive
from candela_mitm.governance.policy import ModelPolicy
from candela_mitm.governance.provider_keys import OrganisationKeys
from candela_mitm.governance.provider_keys import from_config as provider_keys_from_config
from candela_mitm.governance.rate_leases import LeaseRules, RateLeases
from candela_mitm.governance.ratelimit import RateLimiter
from candela_mitm.governance.reconcile import (
    StaleSettlement,
    audited_charges,
    reconcile_stale,
    record_stale_entries,
    sliced_charges,
)
from candela_mitm.governance.settings_watch import SettingsPoller, SettingsWatch
from candela_mitm.governance.shadow import Shadow
from candela_mitm.governance.slices import SliceRules, Slices
from candela_mitm.governance.users import UserDirectory
from candela_mitm.local import LocalRuntime
from candela_mitm.observability.alerts import AlertNotifier
from candela_mitm.observability.metrics import Metrics
from candela_mitm.observability.spans import SpanStore
from candela_mitm.providers.forwarding import route_for_model
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.specs import Upstream, resolve_all
from candela_mitm.providers.upstream_auth import UpstreamCredentials
from candela_mitm.state import StateStore, open_state_store
from candela_mitm.state.calls import StoreCalls
from candela_mitm.state.ports import (
    KeyRecord,
    to_us,
    utc_now,
)

log = logging.getLogger("candela.runtime")

Command = Literal["server", "local"]
T = TypeVar("T")

# A reservation older than this with a live owner is still settled at start (a day: longer than
# any request can run, so a live stream is never charged its reservation early).
STALE_RESERVATION_S = 24 * 3600

# How long a proxy process reuses a user's settings read from the store: admin changes made
# through this process apply at once, those made through another process within this bound.
USER_SETTINGS_TTL_S = 1.0
# ... unless it watches the store's settings generation (governance/settings_watch.py): polled
# every SETTINGS_POLL_S off the event loop, a change made through any process is seen within two
# polls (0.5 s), and settings are reused up to SETTINGS_LONG_TTL_S while the polls succeed.
# Why: at a few requests per user per second, reading a user's settings again every second
# was one store call per request before it was forwarded (bench/README.md, issue 21).
SETTINGS_POLL_S = 0.25
SETTINGS_LONG_TTL_S = 60.0

# Config sections a running proxy cannot change: they shape its listeners, stores and processes.
RESTART_SECTIONS = frozenset(
    {"listen", "mode", "workers", "state", "audit", "interception", "limits", "local", "telemetry"}
)


def minted_key_lookup(store: StateStore, calls: StoreCalls) -> MintedKeyLookup:
    """The Authenticator's view of the keys minted through the admin API: one store read per
    request that presents one, so a revocation holds at once in every process."""

    async def lookup(sha256: str) -> KeyRecord | None:
        record = await calls.call(store.api_key, sha256)
        if record is None or not record.valid_at(to_us(utc_now())):
            return None
        return record

    return lookup


@dataclass
class Runtime:
    config: Config
    command: Command
    upstreams: dict[str, Upstream]
    pricing: PricingTable
    policy: ModelPolicy
    spans: SpanStore
    credentials: UpstreamCredentials
    auth_required: bool
    authenticator: Authenticator
    local_user: str
    store: StateStore
    ledger: Ledger
    limiter: RateLimiter
    users: UserDirectory
    audit: AuditWriter
    metrics: Metrics
    executor: ThreadPoolExecutor
    calls: StoreCalls  # hot-path store calls, batched per event-loop turn (store_call)
    local_models: dict[str, str] = field(default_factory=dict)  # model -> ollama | lmstudio
    config_path: str | None = None  # re-read on SIGHUP
    config_overrides: dict[str, Any] = field(default_factory=dict)  # --mode etc., kept on reload
    local: LocalRuntime | None = None  # `candela` only: runtimes, their process, local settings
    extras: dict[str, Any] = field(default_factory=dict)
    # provider keys intercepted apps bring: fingerprinted, the organisation's recognised
    provider_keys: OrganisationKeys = field(default_factory=lambda: OrganisationKeys(None, ()))
    alerts: AlertNotifier | None = None  # budget threshold alerts (started by build_runtime)
    shadow: Shadow | None = None  # governance.shadow: a candidate judged beside the live policy
    # this process's budget slices (governance.budgets.slices; its rules say whether it is on)
    slices: Slices | None = None
    # this process's rate blocks (governance.rate_limits.leases; likewise)
    rate_leases: RateLeases | None = None
    # what this process has seen of the store's settings generation (SettingsPoller updates it)
    settings_watch: SettingsWatch | None = None
    settings_poller: SettingsPoller | None = None
    # settings being read ahead of their expiry (read_ahead): at most one read per key at once
    _reading_ahead: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)

    def read_ahead(
        self, key: tuple[str, str], delay_s: float, fn: Callable[..., object], *args: Any
    ) -> None:
        """fn(*args) on the governance thread pool `delay_s` from now, in the background: a
        remembered setting read again before it expires (UserDirectory.ahead), at most one
        read per key at a time. A failure is logged: the request that finds the setting
        expired reads it on its own path, as without this."""
        if key in self._reading_ahead:
            return

        async def read() -> None:
            try:
                await asyncio.sleep(delay_s)
                await self.blocking(fn, *args)
            except Exception:
                log.exception("could not read the settings of %s %s ahead of their expiry", *key)
            finally:
                self._reading_ahead.pop(key, None)

        self._reading_ahead[key] = asyncio.get_running_loop().create_task(read())

    def forget_settings(self) -> None:
        """What a change to the settings does, made through this process (admin/base.py, through
        SettingsPoller.forget_own_change) or another (seen by the poller): the next request
        reads its settings from the store, and budget slices judged on the budgets as they
        were are returned and taken anew."""
        self.users.forget()
        if self.slices is not None:
            self.slices.retire_all()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call off the event loop, on the governance thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def store_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A hot-path state-store call: on the event loop when the store can answer at once,
        in one transaction with the other calls of this loop turn (state/calls.py)."""
        return await self.calls.call(fn, *args)

    def close(self) -> None:
        if self.settings_poller is not None:
            self.settings_poller.stop()
        if self.rate_leases is not None:
            try:
                self.rate_leases.flush(everything=True)  # the unused requests given back
            except Exception:
                log.exception("could not give back the rate blocks")
        if self.slices is not None:
            try:
                self.slices.flush(everything=True)  # the spend recorded, the slices returned
            except Exception:
                log.exception("could not return the budget slices")
        self.executor.shutdown(wait=True, cancel_futures=False)
        if self.alerts is not None:
            self.alerts.close()  # before the audit writer: its last outcomes are audited
        self.audit.close()

    def reload(self, new: Config) -> list[str]:
        """Apply a re-read config: policy, pricing, users, auth and providers change in place.

        Sections that shape listeners, stores or processes need a restart: a change to one of
        them is refused (ConfigError) and nothing changes. Returns the sections that changed.
        """
        old = self.config
        changed = [k for k in Config.model_fields if getattr(old, k) != getattr(new, k)]
        fixed = [k for k in changed if k in RESTART_SECTIONS]
        if fixed:
            raise ConfigError(f"these sections need a restart to change: {', '.join(fixed)}")
        upstreams = resolve_all(new)
        required = new.auth.required if new.auth.required is not None else self.command == "server"
        authenticator = Authenticator(
            new.auth,
            required,
            local_user=self.local_user,
            minted_keys=minted_key_lookup(self.store, self.calls),
        )
        # build everything first, then swap: a reload either happens whole or not at all
        pricing, policy = (
            PricingTable.from_config(new),
            ModelPolicy(new.governance.models, new.governance.workloads),
        )
        credentials = UpstreamCredentials(upstreams)
        shadow = Shadow.from_config(new)
        self.config = new
        self.shadow = shadow
        self.upstreams = upstreams
        self.credentials = credentials
        self.pricing = pricing
        self.policy = policy
        self.auth_required = required
        self.authenticator = authenticator
        self.users = UserDirectory(
            new, self.store, cache_ttl_s=USER_SETTINGS_TTL_S, watch=self.settings_watch
        )
        if self.slices is not None:
            # budgets may have changed: every slice is returned, and taken again under them
            self.slices.rules = SliceRules.of(new.governance.budgets.slices)
            self.slices.retire_all()
        if self.rate_leases is not None:
            self.rate_leases.rules = LeaseRules.of(new.governance.rate_limits.leases)
            self.rate_leases.retire_all()
        return changed

    def reload_from_file(self) -> list[str]:
        """SIGHUP: re-read the config file (command-line overrides still apply), then reload."""
        if self.config_path is None:
            raise ConfigError("started without --config: there is no file to re-read")
        new = load_config(self.config_path).model_copy(update=self.config_overrides)
        return self.reload(new)

    def provider_for_model(self, model: str) -> str | None:
        return route_for_model(
            model,
            self.pricing,
            self.local_models,
            vertex_configured=bool(
                self.config.providers.get("anthropic")
                and self.config.providers["anthropic"].project
            ),
        )


def count_stale_settlements(metrics: Metrics, settled: list[StaleSettlement]) -> None:
    for s in settled:
        if s.from_entry:
            continue  # settled from its own durable entry, counted when it was answered
        provider = metrics.provider_label(s.provider)
        metrics.charged.labels(provider, "reserved").inc()
        metrics.cost.labels(
            provider, metrics.model_label(s.model or ""), metrics.tenant_label(s.tenant or "")
        ).inc(s.amount_usd)
    if settled:
        log.warning(
            "settled %d reservation(s) of requests whose process died (%d from their entries)",
            len(settled),
            sum(1 for s in settled if s.from_entry),
        )


def reconcile_at_start(
    config: Config, ledger: Ledger, limiter: RateLimiter, audit: AuditWriter
) -> list[StaleSettlement]:
    """Settle what processes that are gone left held (reconcile_stale: from their
    requests' durable entries, else at their amount with an entry written first) and free
    their concurrency leases. Run by one process per start: `candela-server` alone, or its
    first worker (two processes writing the same entries first would audit a request twice).
    The other workers serve meanwhile: their own reservations have live owners."""
    settled = reconcile_stale(
        ledger,
        process_alive,
        max_age_s=STALE_RESERVATION_S,
        audited=functools.partial(audited_charges, config.audit.sqlite_path),
        record=functools.partial(record_stale_entries, audit),
        sliced=functools.partial(sliced_charges, config.audit.sqlite_path),
    )
    limiter.reconcile_leases(process_alive)  # requests in flight of processes now gone
    return settled


def build_runtime(config: Config, command: Command, reconcile: bool = True) -> Runtime:
    """Everything a proxy process serves with; `reconcile`: settle what processes that are gone
    left held first (False in every worker but the first: one process per start does it)."""
    upstreams = resolve_all(config)
    provider_keys = provider_keys_from_config(config.interception, os.environ)
    # before anything is opened: a bad local settings file fails the start with nothing to undo
    local = LocalRuntime(config, upstreams) if command == "local" else None
    shadow = Shadow.from_config(config)
    required = config.auth.required if config.auth.required is not None else command == "server"
    local_user = getpass.getuser()
    store = open_state_store(config.state)
    ledger = Ledger(store)
    audit = AuditWriter(config.audit)
    audit.start()
    metrics = Metrics(PROVIDER_ROUTES)
    limiter = RateLimiter(store)
    try:
        settled = reconcile_at_start(config, ledger, limiter, audit) if reconcile else []
    except BaseException:
        audit.close()
        raise
    count_stale_settlements(metrics, settled)
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="candela-gov")
    calls = StoreCalls(store, executor, metrics.store_on_loop.inc, metrics.store_on_pool.inc)
    watch = SettingsWatch(SETTINGS_POLL_S, SETTINGS_LONG_TTL_S)
    rt = Runtime(
        config=config,
        command=command,
        upstreams=upstreams,
        pricing=PricingTable.from_config(config),
        policy=ModelPolicy(config.governance.models, config.governance.workloads),
        spans=SpanStore(),
        credentials=UpstreamCredentials(upstreams),
        auth_required=required,
        authenticator=Authenticator(
            config.auth,
            required,
            local_user=local_user,
            minted_keys=minted_key_lookup(store, calls),
        ),
        local_user=local_user,
        store=store,
        ledger=ledger,
        limiter=limiter,
        users=UserDirectory(config, store, cache_ttl_s=USER_SETTINGS_TTL_S, watch=watch),
        audit=audit,
        metrics=metrics,
        executor=executor,
        calls=calls,
        local=local,
        provider_keys=provider_keys,
        shadow=shadow,
    )
    rt.slices = Slices(ledger, SliceRules.of(config.governance.budgets.slices))
    rt.rate_leases = RateLeases(store, LeaseRules.of(config.governance.rate_limits.leases))
    rt.alerts = AlertNotifier(store, audit, metrics, lambda: rt.config.alerts, known_scope(rt))
    rt.settings_watch = watch
    rt.settings_poller = SettingsPoller(
        store,
        watch,
        rt.forget_settings,
        lambda: rt.users.forget(),
        on_poll=lambda outcome: metrics.settings_polls.labels(outcome).inc(),
        on_seen=metrics.settings_changes.inc,
    )
    metrics.watch_settings(lambda: watch.state())
    rt.settings_poller.start()
    return rt


def known_scope(rt: Runtime) -> Callable[[str, str], bool]:
    """Whether a user, tenant or API key is one the deployment names (config, admin API, or a
    key minted into the store), for the utilisation gauge's labels: identities nobody enrolled
    never add a series. Blocking (a cached store read, or the store's key list once per new
    key id): the alert checker thread calls it."""

    def known(scope: str, ident: str) -> bool:
        users = rt.users
        if scope == "key":
            return any(k.key_id == ident for k in rt.store.api_keys())
        if scope == "tenant":
            # a tenant's budget is only watched when it has one: configured or set through
            # the admin API
            return True
        s = users.settings_cached(ident)
        api_key_users = {k.user for k in rt.config.auth.api_keys}
        return s.source != "default" or s.role == "admin" or ident in api_key_users

    return known
