"""Local runtimes: Ollama and LM Studio model discovery, the runtime process, and the local settings."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from candela_mitm.audit.actions import LLM_REQUEST
from candela_mitm.audit.chain import connect_readonly
from candela_mitm.config import Config
from candela_mitm.errors import ConfigError
from candela_mitm.providers.specs import Upstream

log = logging.getLogger("candela.local")

RuntimeName = Literal["ollama", "lmstudio"]
RUNTIMES: tuple[RuntimeName, ...] = ("ollama", "lmstudio")

# Runtimes run on this machine: anything slower than this is as good as down for a model list.
PROBE_TIMEOUT_S = 1.5
# A runtime that did not answer is asked again this soon, whatever the cache TTL: it may be
# starting, or the user may start it by hand.
RETRY_UNREACHABLE_S = 5.0
MAX_PROBE_BYTES = 4 << 20
START_WAIT_S = 15.0  # how long `start` waits for the runtime to answer
STOP_WAIT_S = 5.0  # SIGTERM, then SIGKILL after this
SETTINGS_FILE = "local-settings.json"
RUNTIME_LOG_FILE = "local-runtime.log"
# Models whose cached input the Gemini context-cache multiplier prices.
GEMINI_ROUTES = frozenset({"google", "gemini-oai"})


# -- settings -------------------------------------------------------------------------------


class LocalSettings(BaseModel):
    """What /_local/api/config reads and changes; the runtime command is deliberately not here
    (an HTTP call must never choose what Candela executes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cache_ttl_s: int = Field(ge=0, le=7 * 86400)  # how long a runtime's model list is reused
    gemini_cache_price_multiplier: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


def _errors_text(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {reason}")
    return "; ".join(parts)


def merge_settings(current: LocalSettings, changes: Any) -> LocalSettings:
    """The settings after a partial update; ValueError naming each bad key and why."""
    if not isinstance(changes, Mapping):
        raise ValueError("the body must be a JSON object")
    merged = {**current.to_json(), **changes}
    try:
        return LocalSettings.model_validate(merged)
    except ValidationError as e:
        raise ValueError(_errors_text(e)) from None


class SettingsFile:
    """The settings changed through the API, in a JSON file beside the state DB; they override
    the YAML's `local:` values from the next start on."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, defaults: LocalSettings) -> LocalSettings:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return defaults
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{self.path}: invalid JSON: {e}") from None
        try:
            return merge_settings(defaults, data)
        except ValueError as e:
            raise ConfigError(f"{self.path}: {e}") from None

    def save(self, settings: LocalSettings) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(settings.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# -- discovery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeStatus:
    """One runtime as last probed."""

    name: RuntimeName
    base_url: str
    reachable: bool
    version: str | None = None
    models: tuple[str, ...] = ()
    loaded: tuple[str, ...] | None = None  # in memory now (Ollama /api/ps); None: unknown
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_url": self.base_url,
            "reachable": self.reachable,
            "version": self.version,
            "models": list(self.models),
            "loaded": list(self.loaded) if self.loaded is not None else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class Discovery:
    runtimes: dict[str, RuntimeStatus]
    preferred: RuntimeName  # its models win when both runtimes have one of the same name
    at: float = field(default_factory=time.monotonic)

    @property
    def models(self) -> dict[str, str]:
        """model -> runtime route, for routing /v1/chat/completions."""
        out: dict[str, str] = {}
        order = sorted(self.runtimes.values(), key=lambda s: s.name == self.preferred)
        for status in order:  # the preferred runtime last, so it overwrites
            for m in status.models:
                out[m] = status.name
        return out

    @property
    def any_unreachable(self) -> bool:
        return any(not s.reachable for s in self.runtimes.values())


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str, timeout: float) -> Any:
    """GET a local runtime's JSON, never through a proxy (the runtime is on this machine)."""
    with _NO_PROXY.open(url, timeout=timeout) as resp:
        return json.loads(resp.read(MAX_PROBE_BYTES))


def _names(items: Any, *keys: str) -> tuple[str, ...]:
    out: list[str] = []
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                name = next((item[k] for k in keys if isinstance(item.get(k), str)), None)
                if name:
                    out.append(name)
    return tuple(dict.fromkeys(out))


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    if isinstance(e, TimeoutError):
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    if isinstance(e, ValueError):
        return "the answer is not JSON"
    return type(e).__name__


def probe_ollama(base_url: str, timeout: float = PROBE_TIMEOUT_S) -> RuntimeStatus:
    """Ollama: /api/tags lists the models pulled, /api/version and /api/ps are best effort."""
    try:
        tags = _get_json(base_url + "/api/tags", timeout)
    except Exception as e:  # refused, timed out, garbage: the runtime is not usable now
        return RuntimeStatus("ollama", base_url, False, error=_why(e))
    models = _names(tags.get("models") if isinstance(tags, dict) else None, "name", "model")
    version: str | None = None
    loaded: tuple[str, ...] | None = None
    try:
        v = _get_json(base_url + "/api/version", timeout)
        version = v.get("version") if isinstance(v, dict) else None
    except Exception as e:  # an old runtime without /api/version still serves models
        log.debug("no version from %s: %s", base_url, e)
    try:
        ps = _get_json(base_url + "/api/ps", timeout)
        loaded = _names(ps.get("models") if isinstance(ps, dict) else None, "name", "model")
    except Exception:
        pass  # older Ollama versions and some compatible servers have no /api/ps
    return RuntimeStatus("ollama", base_url, True, version, models, loaded)


def probe_lmstudio(base_url: str, timeout: float = PROBE_TIMEOUT_S) -> RuntimeStatus:
    """LM Studio: its OpenAI-compatible /v1/models lists the models it serves."""
    try:
        listing = _get_json(base_url + "/v1/models", timeout)
    except Exception as e:
        return RuntimeStatus("lmstudio", base_url, False, error=_why(e))
    models = _names(listing.get("data") if isinstance(listing, dict) else None, "id")
    return RuntimeStatus("lmstudio", base_url, True, None, models)


PROBES: dict[str, Callable[[str, float], RuntimeStatus]] = {
    "ollama": probe_ollama,
    "lmstudio": probe_lmstudio,
}


# -- the runtime process --------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessState:
    managed: bool  # Candela started it and it has not been reaped
    running: bool
    pid: int | None
    exit_code: int | None
    command: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "managed": self.managed,
            "running": self.running,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "command": list(self.command),
        }


class RuntimeActionError(Exception):
    """A start or stop that cannot be done; the message is shown to the user as is."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class LocalRuntime:
    """The local side of `candela`: which models the runtimes serve (cached), the runtime process
    Candela may start and stop, and the settings changed through the management API.

    Every method that touches the network, a process or a file blocks: call it from a worker
    thread. The cache and the process are guarded by locks, so concurrent calls are safe.
    """

    def __init__(self, config: Config, upstreams: Mapping[str, Upstream]) -> None:
        local = config.local
        self.runtime: RuntimeName = local.runtime
        self.command: tuple[str, ...] = tuple(local.runtime_command)
        self.base_urls: dict[str, str] = {
            name: upstreams[name].url("").rstrip("/") for name in RUNTIMES if name in upstreams
        }
        self.state_dir = Path(config.state.sqlite_path).expanduser().parent
        self.audit_db = Path(config.audit.sqlite_path).expanduser()
        self.settings_file = SettingsFile(self.state_dir / SETTINGS_FILE)
        try:
            defaults = LocalSettings(
                cache_ttl_s=local.cache_ttl_s,
                gemini_cache_price_multiplier=local.gemini_cache_price_multiplier,
            )
        except ValidationError as e:
            raise ConfigError(f"local: {_errors_text(e)}") from None
        self._settings = self.settings_file.load(defaults)
        self._discovery: Discovery | None = None
        self._discovery_lock = threading.Lock()
        self._settings_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_lock = threading.Lock()
        self._clock = time.monotonic

    # -- settings --

    @property
    def settings(self) -> LocalSettings:
        return self._settings

    def update_settings(
        self,
        changes: Any,
        commit: Callable[[LocalSettings, LocalSettings], None] | None = None,
    ) -> tuple[LocalSettings, LocalSettings]:
        """Validate a partial change, record it (`commit`, e.g. the durable audit entry: if it
        raises, nothing changes), persist it and apply it; (before, after). ValueError if bad."""
        with self._settings_lock:
            before = self._settings
            after = merge_settings(before, changes)
            if after == before:
                return before, after
            if commit is not None:
                commit(before, after)
            self.settings_file.save(after)
            self._settings = after
            return before, after

    def cached_multiplier(self, provider: str) -> float | None:
        """The cached-input price multiplier for a provider route; None: the price table's."""
        if provider in GEMINI_ROUTES:
            return self._settings.gemini_cache_price_multiplier
        return None

    # -- discovery --

    @property
    def cached(self) -> Discovery | None:
        return self._discovery

    def stale(self) -> bool:
        """True when the next model lookup should ask the runtimes again (cheap: no I/O)."""
        d = self._discovery
        if d is None:
            return True
        age = self._clock() - d.at
        if d.any_unreachable and age >= RETRY_UNREACHABLE_S:
            return True
        return age >= self._settings.cache_ttl_s

    def invalidate(self, older_than_s: float = 0.0) -> None:
        """Ask the runtimes again on the next lookup (if the list is at least that old)."""
        d = self._discovery
        if d is not None and self._clock() - d.at >= older_than_s:
            self._discovery = None

    def discover(self, force: bool = False) -> Discovery:
        """The runtimes' models, from the cache unless stale (or forced); both asked at once."""
        with self._discovery_lock:
            if not force and not self.stale() and self._discovery is not None:
                return self._discovery
            names: list[str] = [n for n in RUNTIMES if n in self.base_urls]
            with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
                futures = {
                    n: pool.submit(PROBES[n], self.base_urls[n], PROBE_TIMEOUT_S) for n in names
                }
                statuses = {n: f.result() for n, f in futures.items()}
            self._discovery = Discovery(statuses, self.runtime, self._clock())
            return self._discovery

    def health(self) -> dict[str, Any]:
        """GET /_local/api/health: the configured runtime probed now, and the process state."""
        d = self.discover(force=True)
        main = d.runtimes.get(self.runtime) or RuntimeStatus(
            self.runtime, "", False, error="no base URL"
        )
        return {
            "status": "ok" if main.reachable else "unreachable",
            "runtime": self.runtime,
            "base_url": main.base_url,
            "reachable": main.reachable,
            "version": main.version,
            "models": list(main.models),
            "loaded": list(main.loaded) if main.loaded is not None else None,
            "error": main.error,
            "process": self.process_state().to_json(),
            "runtimes": [s.to_json() for s in d.runtimes.values()],
        }

    # -- the process --

    def process_state(self) -> ProcessState:
        proc = self._proc
        if proc is None:
            return ProcessState(False, False, None, None, self.command)
        code = proc.poll()
        return ProcessState(True, code is None, proc.pid, code, self.command)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.runtime == "ollama" and "ollama" in self.base_urls:
            # `ollama serve` listens where OLLAMA_HOST says: make it where Candela looks
            env["OLLAMA_HOST"] = self.base_urls["ollama"].split("://", 1)[-1]
        return env

    def _reachable(self) -> bool:
        url = self.base_urls.get(self.runtime)
        return url is not None and PROBES[self.runtime](url, PROBE_TIMEOUT_S).reachable

    def start(self, wait_s: float = START_WAIT_S) -> dict[str, Any]:
        """Start the configured command unless the runtime already runs; wait until it answers."""
        with self._proc_lock:
            if self._proc is not None and self._proc.poll() is None:
                return {"started": False, "reason": "already running", **self._state_json()}
            if self._reachable():
                return {
                    "started": False,
                    "reason": "the runtime already answers (started outside Candela)",
                    **self._state_json(),
                }
            if not self.command:
                raise RuntimeActionError("local.runtime_command is empty", 400)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.state_dir / RUNTIME_LOG_FILE
            with open(log_path, "ab") as out:
                try:
                    # its own session: stop signals the whole group (ollama forks runners)
                    self._proc = subprocess.Popen(
                        list(self.command),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=self._child_env(),
                        start_new_session=True,
                    )
                except OSError as e:
                    raise RuntimeActionError(
                        f"cannot run {self.command[0]!r}: {e.strerror or e}", 502
                    ) from None
            proc = self._proc
            log.info("started runtime %s (pid %d)", self.runtime, proc.pid)
            self.invalidate()
            deadline = self._clock() + wait_s
            while self._clock() < deadline:
                if proc.poll() is not None:
                    raise RuntimeActionError(
                        f"{self.command[0]!r} exited with code {proc.returncode}; see {log_path}",
                        502,
                    )
                if self._reachable():
                    return {"started": True, "reachable": True, **self._state_json()}
                time.sleep(0.1)
            return {"started": True, "reachable": False, **self._state_json()}

    def stop(self, wait_s: float = STOP_WAIT_S) -> dict[str, Any]:
        """Stop the runtime Candela started (never one started elsewhere)."""
        with self._proc_lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                self._proc = None
                if self._reachable():
                    raise RuntimeActionError(
                        "the runtime was not started by Candela; stop it where it was started"
                    )
                return {"stopped": False, "reason": "not running", **self._state_json()}
            pid = proc.pid
            try:
                os.killpg(pid, signal.SIGTERM)
                proc.wait(timeout=wait_s)
            except ProcessLookupError:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                log.warning("runtime pid %d ignored SIGTERM for %g s; killing it", pid, wait_s)
                with suppress(ProcessLookupError):  # it exited after all
                    os.killpg(pid, signal.SIGKILL)
                proc.wait(timeout=wait_s)
            self._proc = None
            self.invalidate()
            log.info("stopped runtime %s (pid %d, exit %s)", self.runtime, pid, proc.returncode)
            return {
                "stopped": True,
                "pid": pid,
                "exit_code": proc.returncode,
                **self._state_json(),
            }

    def _state_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "process": self.process_state().to_json()}

    def close(self) -> None:
        """At shutdown: a runtime Candela started goes with it."""
        try:
            if self._proc is not None and self._proc.poll() is None:
                self.stop()
        except Exception:
            log.exception("could not stop the runtime")


# -- spend over the day ---------------------------------------------------------------------


def hourly_spend(audit_db: Path, user: str, day: date) -> list[float]:
    """USD spent by `user` in each UTC hour of `day`, from the audit log's llm_request entries."""
    hours = [0.0] * 24
    if not audit_db.exists():
        return hours
    start = f"{day.isoformat()}T00:00:00.000000Z"
    end = f"{(day + timedelta(days=1)).isoformat()}T00:00:00.000000Z"
    conn = connect_readonly(audit_db)
    try:
        rows = conn.execute(
            "SELECT CAST(substr(ts, 12, 2) AS INTEGER), "
            "SUM(CAST(json_extract(fields, '$.cost_usd') AS REAL)) FROM audit_log "
            "WHERE ts >= ? AND ts < ? AND action = ? AND user_id = ? GROUP BY 1",
            (start, end, LLM_REQUEST, user),
        ).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return hours
        raise
    finally:
        conn.close()
    for hour, usd in rows:
        if isinstance(hour, int) and 0 <= hour < 24 and usd is not None and math.isfinite(usd):
            hours[hour] = float(usd)
    return hours
