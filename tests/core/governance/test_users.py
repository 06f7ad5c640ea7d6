"""UserDirectory: settings from store, config, defaults; the short cache the proxy reads first."""

from __future__ import annotations

from pathlib import Path

import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance.users import UserDirectory
from candela_mitm.state import UserRecord, open_state_store


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def directory(tmp_path: Path, ttl: float, clock: Clock) -> UserDirectory:
    config = parse_config({
        "state": {"sqlite_path": str(tmp_path / "state.db")},
        "audit": {"sqlite_path": str(tmp_path / "audit.db")},
        "users": {"bob": {"tenants": ["t"], "daily_budget_usd": 3.0}},
    })
    return UserDirectory(config, open_state_store(config.state), cache_ttl_s=ttl, clock=clock)


@pytest.mark.parametrize(
    ("ttl", "elapsed", "cached"),
    [(1.0, 0.0, True), (1.0, 0.999, True), (1.0, 1.0, False), (1.0, 5.0, False), (0.0, 0.0, False)],
)
def test_recent_is_a_read_younger_than_the_ttl(
    tmp_path: Path, ttl: float, elapsed: float, cached: bool
) -> None:
    clock = Clock()
    users = directory(tmp_path, ttl, clock)
    assert users.recent("bob") is None
    s = users.settings_cached("bob")
    assert (s.source, s.daily_budget_usd) == ("config", 3.0)
    clock.t += elapsed
    assert (users.recent("bob") == s) is cached


def test_forget_drops_the_cache_and_settings_always_reads_the_store(tmp_path: Path) -> None:
    clock = Clock()
    users = directory(tmp_path, 1.0, clock)
    users.settings_cached("bob")
    users.store.put_user(UserRecord("bob", tenants=("u",), daily_budget_usd=7.0))
    assert users.settings("bob").daily_budget_usd == 7.0  # uncached read sees the change
    assert users.recent("bob").daily_budget_usd == 3.0  # type: ignore[union-attr]
    users.forget()
    assert users.recent("bob") is None
    assert users.settings_cached("bob").daily_budget_usd == 7.0
    assert users.recent("bob").daily_budget_usd == 7.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "via, source, role, allow_unknown, refused",
    [
        ("oidc", "default", "developer", False, True),
        ("access_token", "default", "developer", False, True),
        ("oidc", "default", "developer", True, False),
        ("oidc", "config", "developer", False, False),
        ("oidc", "store", "developer", False, False),
        ("oidc", "default", "admin", False, False),  # auth.admins
        ("api_key", "default", "developer", False, False),  # the deployment issued the key
        ("local", "default", "developer", False, False),  # laptop mode: the OS user
    ],
)
def test_enrollment_denial(via, source, role, allow_unknown, refused):
    from candela_mitm.governance.users import UserSettings, enrollment_denial

    s = UserSettings("u@example.com", role, (), 10.0, 60, source)
    d = enrollment_denial(s, via, allow_unknown)
    assert (d is not None) == refused
    if d is not None:
        assert (d.status, d.error, d.fields["user_id"]) == (403, "user_not_enrolled", "u@example.com")
