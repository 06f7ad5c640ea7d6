"""Laptop-mode settings: what the management UI may change (validated, merged, kept in a file)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from candela_mitm.errors import ConfigError

SETTINGS_FILE = "local-settings.json"
# Routes whose cached input the Gemini context-cache multiplier prices.
GEMINI_ROUTES = frozenset({"google", "gemini-oai"})


class LocalSettings(BaseModel):
    """What /_local/api/config reads and changes; the runtime command is deliberately not here
    (an HTTP call must never choose what Candela executes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cache_ttl_s: int = Field(ge=0, le=7 * 86400)  # how long a runtime's model list is reused
    gemini_cache_price_multiplier: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


def errors_text(e: ValidationError) -> str:
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
        raise ValueError(errors_text(e)) from None


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


def cached_multiplier(settings: LocalSettings, provider: str) -> float | None:
    """The cached-input price multiplier for a provider route; None: the price table's."""
    if provider in GEMINI_ROUTES:
        return settings.gemini_cache_price_multiplier
    return None
