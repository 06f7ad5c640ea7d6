"""Which models the local runtimes (Ollama, LM Studio) serve: probes, and the cached answer."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("candela.local")

RuntimeName = Literal["ollama", "lmstudio"]
RUNTIMES: tuple[RuntimeName, ...] = ("ollama", "lmstudio")

# Runtimes run on this machine: anything slower than this is as good as down for a model list.
PROBE_TIMEOUT_S = 1.5
# A runtime that did not answer is asked again this soon, whatever the cache TTL: it may be
# starting, or the user may start it by hand.
RETRY_UNREACHABLE_S = 5.0
MAX_PROBE_BYTES = 4 << 20


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


def probe(name: RuntimeName, base_url: str) -> RuntimeStatus:
    """One runtime asked now."""
    return PROBES[name](base_url, PROBE_TIMEOUT_S)


class ModelCache:
    """The runtimes' models, asked again when older than the TTL (sooner after a runtime did not
    answer). Blocking (network): call it from a worker thread; a lock keeps calls consistent."""

    def __init__(
        self,
        base_urls: Mapping[str, str],
        preferred: RuntimeName,
        ttl_s: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_urls = dict(base_urls)
        self.preferred = preferred
        self.ttl_s = ttl_s  # read at each lookup: the settings may change it
        self.clock = clock
        self._discovery: Discovery | None = None
        self._lock = threading.Lock()

    @property
    def cached(self) -> Discovery | None:
        return self._discovery

    def stale(self) -> bool:
        """True when the next model lookup should ask the runtimes again (cheap: no I/O)."""
        d = self._discovery
        if d is None:
            return True
        age = self.clock() - d.at
        if d.any_unreachable and age >= RETRY_UNREACHABLE_S:
            return True
        return age >= self.ttl_s()

    def invalidate(self, older_than_s: float = 0.0) -> None:
        """Ask the runtimes again on the next lookup (if the list is at least that old)."""
        d = self._discovery
        if d is not None and self.clock() - d.at >= older_than_s:
            self._discovery = None

    def discover(self, force: bool = False) -> Discovery:
        """The runtimes' models, from the cache unless stale (or forced); all asked at once."""
        with self._lock:
            if not force and not self.stale() and self._discovery is not None:
                return self._discovery
            names: list[RuntimeName] = [n for n in RUNTIMES if n in self.base_urls]
            with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
                futures = {n: pool.submit(probe, n, self.base_urls[n]) for n in names}
                statuses: dict[str, RuntimeStatus] = {n: f.result() for n, f in futures.items()}
            self._discovery = Discovery(statuses, self.preferred, self.clock())
            return self._discovery
