"""Laptop mode (`candela`): local runtimes (Ollama, LM Studio) and their settings.

LocalRuntime is what the management UI and the local model routes use; its parts live in
settings.py (what the UI may change), discovery.py (which models the runtimes serve) and
process.py (the runtime process Candela may start and stop). Spend per hour comes from the
audit log (audit/query.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from candela_mitm.audit.query import hourly_spend
from candela_mitm.config import Config
from candela_mitm.errors import ConfigError
from candela_mitm.local.discovery import (
    RUNTIMES,
    Discovery,
    ModelCache,
    RuntimeName,
    RuntimeStatus,
    probe,
)
from candela_mitm.local.process import ProcessState, RuntimeProcess
from candela_mitm.local.settings import (
    SETTINGS_FILE,
    LocalSettings,
    SettingsFile,
    cached_multiplier,
    errors_text,
    merge_settings,
)
from candela_mitm.providers.specs import Upstream


class LocalRuntime:
    """Which models the runtimes serve (cached), the runtime process Candela may start and stop,
    and the settings changed through the management API.

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
            raise ConfigError(f"local: {errors_text(e)}") from None
        self._settings = self.settings_file.load(defaults)
        self._settings_lock = threading.Lock()
        self.models = ModelCache(self.base_urls, self.runtime, lambda: self._settings.cache_ttl_s)
        extra_env = {}
        if self.runtime == "ollama" and "ollama" in self.base_urls:
            # `ollama serve` listens where OLLAMA_HOST says: make it where Candela looks
            extra_env["OLLAMA_HOST"] = self.base_urls["ollama"].split("://", 1)[-1]
        self.process = RuntimeProcess(
            self.runtime,
            self.command,
            self.state_dir,
            reachable=self._reachable,
            changed=self.models.invalidate,
            extra_env=extra_env,
        )

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
        return cached_multiplier(self._settings, provider)

    # -- discovery --

    @property
    def cached(self) -> Discovery | None:
        return self.models.cached

    def stale(self) -> bool:
        return self.models.stale()

    def invalidate(self, older_than_s: float = 0.0) -> None:
        self.models.invalidate(older_than_s)

    def discover(self, force: bool = False) -> Discovery:
        return self.models.discover(force)

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

    def _reachable(self) -> bool:
        url = self.base_urls.get(self.runtime)
        return url is not None and probe(self.runtime, url).reachable

    def process_state(self) -> ProcessState:
        return self.process.state()

    def start(self, wait_s: float | None = None) -> dict[str, Any]:
        return self.process.start() if wait_s is None else self.process.start(wait_s)

    def stop(self, wait_s: float | None = None) -> dict[str, Any]:
        return self.process.stop() if wait_s is None else self.process.stop(wait_s)

    def close(self) -> None:
        self.process.close()

    # -- spend over the day --

    def hourly_spend(self, user: str, day: date) -> list[float]:
        """USD `user` spent in each UTC hour of `day` (from the audit log; blocking)."""
        return hourly_spend(self.audit_db, user, day)
