"""Helpers of the identity tests: keys, a settable clock, an Auth config and where a credential rides."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from candela_mitm.config import ApiKey, Auth
from candela_mitm.governance.credentials import SOURCES
from tests.fakes.oidc import FakeOidcProvider

ALICE_KEY = "cdl_alice_example_key"  # config.example.yaml stores this key's digest
ALICE_SHA = "1d7ab44a7d52779899b2b6d61230b265b654e07590677891e88d4d18fc07f034"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Clock:
    """The caches' clock, starting at real time (token exp claims are real epoch seconds)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(coro)



def make_auth(
    idp: FakeOidcProvider | None,
    keys: dict[str, str] | None = None,
    admins: list[str] | None = None,
    audiences: list[str] | None = None,
) -> Auth:
    return Auth(
        oidc=idp.oidc_config(audiences=audiences) if idp else None,
        access_tokens=idp.access_tokens_config() if idp else None,
        api_keys=[ApiKey(sha256=sha(k), user=u) for k, u in (keys or {}).items()],
        admins=admins or [],
    )


def where(source: str, token: str, raw: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Headers and query carrying `token` in `source` (raw: the header value as sent)."""
    if source == "query:key":
        return {}, {"key": raw if raw is not None else token}
    value = raw if raw is not None else (f"Bearer {token}" if source in SOURCES[:2] else token)
    return {source: value}, {}

