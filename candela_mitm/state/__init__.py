"""Governance state: the store behind budgets, grants, users and rate windows, and its factory."""

from __future__ import annotations

from candela_mitm.config import State
from candela_mitm.state.ports import StateStore, UserRecord


def open_state_store(cfg: State, redis_prefix: str = "candela:") -> StateStore:
    """Open the configured backend, creating the SQLite file and schema if needed.

    Raises StoreUnavailable when the store cannot be reached now: Candela refuses to start
    rather than serve without governance.
    """
    if cfg.backend == "redis":
        from candela_mitm.state.redis import RedisStateStore

        assert cfg.redis_url is not None  # the config validator requires it for this backend
        return RedisStateStore(cfg.redis_url, prefix=redis_prefix, timeout_ms=cfg.busy_timeout_ms)
    from candela_mitm.state.sqlite import SqliteStateStore

    return SqliteStateStore(cfg.sqlite_path, busy_timeout_ms=cfg.busy_timeout_ms)


__all__ = ["StateStore", "UserRecord", "open_state_store"]
