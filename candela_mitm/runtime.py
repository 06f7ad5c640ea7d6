"""Runtime: everything built once from the config at start and handed to every addon."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from candela_mitm.audit import AuditWriter
from candela_mitm.config import Config, load_config
from candela_mitm.errors import ConfigError, StoreUnavailable
from candela_mitm.governance.identity import Authenticator
from candela_mitm.governance.ledger import Ledger, process_alive
from candela_mitm.governance.policy import ModelPolicy
from candela_mitm.governance.ratelimit import RateLimiter
from candela_mitm.governance.users import UserDirectory
from candela_mitm.local.runtimes import LocalRuntime
from candela_mitm.observability.metrics import Metrics
from candela_mitm.observability.spans import SpanStore
from candela_mitm.providers.forwarding import route_for_model
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.specs import Upstream, resolve_all
from candela_mitm.providers.upstream_auth import UpstreamCredentials
from candela_mitm.state import StateStore, open_state_store
from candela_mitm.state.ports import Call, Outcome, WouldWait, run_calls

Command = Literal["server", "local"]
T = TypeVar("T")

# A reservation older than this with a live owner is still taken back at start (a day: longer than
# any request can run, so a live stream's money is never freed early).
STALE_RESERVATION_S = 24 * 3600

# A hot-path store call refused because the store's lock is held is tried again on the event
# loop this many times (the first half at once after other ready flows ran, the rest after a
# pause), then run on the thread pool, which may wait.
STORE_TRIES = 8
STORE_PAUSE_S = 0.0002

# How long a proxy process reuses a user's settings read from the store: admin changes made
# through this process apply at once, those made through another process within this bound.
USER_SETTINGS_TTL_S = 1.0

# Config sections a running proxy cannot change: they shape its listeners, stores and processes.
RESTART_SECTIONS = frozenset(
    {"listen", "mode", "workers", "state", "audit", "interception", "limits", "local", "telemetry"}
)


_Future = asyncio.Future[Any]
_Pending = tuple[Callable[..., Any], tuple[Any, ...], _Future]


def _store_error(e: BaseException) -> BaseException:
    """What each call of a batch that failed as a whole answers: the store's error."""
    if isinstance(e, StoreUnavailable) or not isinstance(e, Exception):
        return e
    return StoreUnavailable(f"state store: {type(e).__name__}: {e}")


def _deliver(calls: list[_Pending], outcomes: list[Outcome]) -> None:
    for (_, _, fut), (ok, value) in zip(calls, outcomes, strict=True):
        if fut.done():  # its flow is gone (cancelled); what the call did stays done
            continue
        if ok:
            fut.set_result(value)
        elif isinstance(value, asyncio.CancelledError):
            fut.cancel()
        else:
            fut.set_exception(value)


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
    local_models: dict[str, str] = field(default_factory=dict)  # model -> ollama | lmstudio
    config_path: str | None = None  # re-read on SIGHUP
    config_overrides: dict[str, Any] = field(default_factory=dict)  # --mode etc., kept on reload
    local: LocalRuntime | None = None  # `candela` only: runtimes, their process, local settings
    extras: dict[str, Any] = field(default_factory=dict)
    # store calls made during the current event-loop turn (store_call), run together after it
    _turn: list[_Pending] | None = field(default=None, init=False, repr=False)
    _turn_loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _tasks: set[asyncio.Future[None]] = field(default_factory=set, init=False, repr=False)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call off the event loop, on the governance thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def store_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A hot-path state-store call, on the event loop when the store can answer at once.

        Calls made in one turn of the event loop run together, in one transaction, each atomic
        on its own (a savepoint): under load two or three requests settle or reserve in the same
        turn, and in a busy proxy each transaction starts on cold CPU caches (a transaction costs
        2-3x what it does in a tight loop), so a shared one is much cheaper than several. The
        answers are the same as run one after the other, in the order the calls were made.

        A hop to the thread pool and back costs more CPU than the transaction itself, so the
        batch runs right here when the store can answer without waiting (SQLite with its write
        lock free). If its lock is held the batch is refused with nothing changed and tried
        again a few times (another worker's event loop holds it for tens of microseconds),
        letting other flows run between tries, then runs on the pool. Going there at once made
        things worse: a pool thread holding the lock must win the GIL back from a busy event
        loop between statements, the other workers' calls then found the lock taken too, and
        most calls ended on the pool. A store that cannot join calls (Redis) runs each call on
        the pool, as before.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._turn is None or self._turn_loop is not loop:
            # (a turn left by a loop that stopped before running it is abandoned with it)
            self._turn, self._turn_loop = [], loop
            loop.call_soon(self._run_turn, self._turn)
        self._turn.append((fn, args, fut))
        return await fut

    def _run_turn(self, calls: list[_Pending]) -> None:
        """The calls of this loop turn (call_soon runs it after the turn's other callbacks)."""
        if self._turn is calls:
            self._turn = None
        if not calls:
            return
        if not self.store.joins_calls:
            for fn, args, fut in calls:
                self._background(self._alone(fn, args, fut))
            return
        pairs = [(fn, args) for fn, args, _ in calls]
        try:
            outcomes = self.store.call_without_waiting(run_calls, self.store, pairs)
        except WouldWait as e:
            self._background(self._run_turn_later(calls, pairs, e.busy))
            return
        except Exception as e:  # the transaction itself failed: every call did
            outcomes = [(False, _store_error(e))] * len(calls)
        except BaseException as e:
            _deliver(calls, [(False, _store_error(e))] * len(calls))
            raise
        self.metrics.store_on_loop.inc(len(calls))
        _deliver(calls, outcomes)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._tasks.discard)

    async def _run_turn_later(self, calls: list[_Pending], pairs: list[Call], busy: bool) -> None:
        outcomes: list[Outcome] | None = None
        try:
            for attempt in range(1, STORE_TRIES) if busy else ():
                await asyncio.sleep(0 if attempt < STORE_TRIES // 2 else STORE_PAUSE_S)
                try:
                    outcomes = self.store.call_without_waiting(run_calls, self.store, pairs)
                except WouldWait:
                    continue
                self.metrics.store_on_loop.inc(len(calls))
                break
            if outcomes is None:
                self.metrics.store_on_pool.inc(len(calls))
                outcomes = await self.blocking(run_calls, self.store, pairs)
        except BaseException as e:
            outcomes = [(False, _store_error(e))] * len(calls)
            if isinstance(e, asyncio.CancelledError):
                _deliver(calls, outcomes)
                raise
        _deliver(calls, outcomes)

    async def _alone(self, fn: Callable[..., Any], args: tuple[Any, ...], fut: _Future) -> None:
        try:
            self.metrics.store_on_pool.inc()
            outcome: Outcome = (True, await self.blocking(fn, *args))
        except BaseException as e:
            _deliver([(fn, args, fut)], [(False, e)])
            if not isinstance(e, Exception):
                raise
            return
        _deliver([(fn, args, fut)], [outcome])

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=False)
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
        authenticator = Authenticator(new.auth, required, local_user=self.local_user)
        # build everything first, then swap: a reload either happens whole or not at all
        pricing, policy = PricingTable.from_config(new), ModelPolicy(new.governance.models)
        credentials = UpstreamCredentials(upstreams)
        self.config = new
        self.upstreams = upstreams
        self.credentials = credentials
        self.pricing = pricing
        self.policy = policy
        self.auth_required = required
        self.authenticator = authenticator
        self.users = UserDirectory(new, self.store, cache_ttl_s=USER_SETTINGS_TTL_S)
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


def build_runtime(config: Config, command: Command) -> Runtime:
    upstreams = resolve_all(config)
    # before anything is opened: a bad local settings file fails the start with nothing to undo
    local = LocalRuntime(config, upstreams) if command == "local" else None
    required = config.auth.required if config.auth.required is not None else command == "server"
    local_user = getpass.getuser()
    store = open_state_store(config.state)
    ledger = Ledger(store)
    ledger.reconcile_stale(process_alive, max_age_s=STALE_RESERVATION_S)
    audit = AuditWriter(config.audit)
    audit.start()
    return Runtime(
        config=config,
        command=command,
        upstreams=upstreams,
        pricing=PricingTable.from_config(config),
        policy=ModelPolicy(config.governance.models),
        spans=SpanStore(),
        credentials=UpstreamCredentials(upstreams),
        auth_required=required,
        authenticator=Authenticator(
            config.auth,
            required,
            local_user=local_user,
        ),
        local_user=local_user,
        store=store,
        ledger=ledger,
        limiter=RateLimiter(store),
        users=UserDirectory(config, store, cache_ttl_s=USER_SETTINGS_TTL_S),
        audit=audit,
        metrics=Metrics(),
        executor=ThreadPoolExecutor(max_workers=8, thread_name_prefix="candela-gov"),
        local=local,
    )
