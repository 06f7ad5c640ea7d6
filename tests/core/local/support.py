"""Shared by the laptop-mode tests: a LocalRuntime over given runtime URLs, and a URL nothing serves."""

from __future__ import annotations

import socket
from pathlib import Path

from candela_mitm.config import parse_config
from candela_mitm.local import LocalRuntime
from candela_mitm.providers.specs import resolve_all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_runtime(tmp: Path, ollama_url: str, lmstudio_url: str, **local: object) -> LocalRuntime:
    cfg = parse_config(
        {
            "providers": {
                "ollama": {"base_url": ollama_url},
                "lmstudio": {"base_url": lmstudio_url},
            },
            "state": {"sqlite_path": str(tmp / "state.db")},
            "audit": {"sqlite_path": str(tmp / "audit.db")},
            "local": local,
        }
    )
    return LocalRuntime(cfg, resolve_all(cfg))


def nowhere() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: refused at once
