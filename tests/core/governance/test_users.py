"""UserDirectory: settings from store, config, defaults; the short cache the proxy reads first."""

from __future__ import annotations

from pathlib import Path

import pytest

from candela_mitm.config import parse_config
from candela_mitm.governance.settings_watch import SettingsWatch
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


def scoped_directory(tmp_path: Path, clock: Clock | None = None) -> UserDirectory:
    config = parse_config({
        "state": {"sqlite_path": str(tmp_path / "state.db")},
        "audit": {"sqlite_path": str(tmp_path / "audit.db")},
        "users": {
            "bob": {"tenants": ["t"], "budget_period": "weekly", "max_concurrent_requests": 3},
            "carol": {"output_tokens_per_minute": 50},
        },
        "governance": {
            "budgets": {"period": "monthly", "time_zone": "Europe/Paris"},
            "rate_limits": {"default_max_concurrent_requests": 8,
                            "default_total_tokens_per_minute": 1000},
            "tenants": {"t": {"budget_usd": 50.0}, "u": {"budget_usd": 5.0, "period": "daily"}},
        },
    })
    return UserDirectory(config, open_state_store(config.state), cache_ttl_s=1.0,
                         clock=clock or Clock())


def test_periods_and_limits_come_from_store_then_config_then_defaults(tmp_path: Path) -> None:
    from candela_mitm.governance.periods import BudgetPeriod

    users = scoped_directory(tmp_path)
    bob, carol, dan = (users.settings(u) for u in ("bob", "carol", "dan"))
    assert bob.budget_period == BudgetPeriod("weekly", "Europe/Paris")
    assert carol.budget_period == dan.budget_period == BudgetPeriod("monthly", "Europe/Paris")
    assert (bob.max_concurrent_requests, carol.max_concurrent_requests) == (3, 8)
    assert (carol.output_tokens_per_minute, carol.total_tokens_per_minute) == (50, 1000)
    assert dan.token_limits.active() == {"total_tokens": 1000}
    # an admin API record wins field by field; None falls back
    users.store.put_user(UserRecord("bob", tenants=("t",), budget_period="daily",
                                    total_tokens_per_minute=7))
    bob = users.settings("bob")
    assert bob.budget_period.kind == "daily" and bob.total_tokens_per_minute == 7
    assert bob.max_concurrent_requests == 3  # from config


def test_tenant_settings_store_then_config_then_none(tmp_path: Path) -> None:
    from candela_mitm.state.ports import TenantRecord

    clock = Clock()
    users = scoped_directory(tmp_path, clock)
    t = users.tenant_settings_cached("t")
    assert (t.budget_usd, t.period.kind, t.period.time_zone, t.source) == (
        50.0, "monthly", "Europe/Paris", "config"
    )
    assert users.tenant_settings("u").period.kind == "daily"
    assert users.tenant_settings("v").budget_usd is None  # no budget of its own
    users.store.put_tenant(TenantRecord("t", 9.0, None))
    assert users.tenant_settings_cached("t").budget_usd == 50.0  # remembered for the ttl
    clock.t += 1.0
    assert users.tenant_settings_cached("t").budget_usd == 9.0
    users.store.put_tenant(TenantRecord("t", None, "weekly"))
    users.forget()  # an admin change in this process applies at once
    t = users.tenant_settings_cached("t")
    assert (t.budget_usd, t.period.kind, t.source) == (None, "weekly", "store")


def test_tenant_settings_are_read_ahead_of_their_expiry(tmp_path: Path) -> None:
    from candela_mitm.state.ports import TenantRecord

    clock = Clock()
    users = scoped_directory(tmp_path, clock)
    assert users.tenant_ahead("t") is None  # none remembered: nothing to read ahead
    users.tenant_settings_cached("t")
    assert users.tenant_ahead("t") is None  # not half its 1 s yet
    clock.t += 0.8
    assert users.tenant_ahead("t") == pytest.approx(0.05)  # a quarter of the 0.2 s left
    users.store.put_tenant(TenantRecord("t", 9.0, None))  # another process's admin change
    assert users.refresh_tenant("t").budget_usd == 9.0  # read afresh, remembered from now
    assert users.tenant_ahead("t") is None
    clock.t += 0.9
    recent = users.recent_tenant("t")  # 1.7 s after the first read: still at hand
    assert recent is not None and recent.budget_usd == 9.0
    clock.t += 0.2
    assert users.recent_tenant("t") is None  # never older than the ttl


# -- the watch of the store's settings generation (settings_watch.SettingsPoller confirms it) -----------


def watched(tmp_path: Path, clock: Clock) -> tuple[UserDirectory, SettingsWatch]:
    users = scoped_directory(tmp_path, clock)
    watch = SettingsWatch(poll_s=0.25, long_ttl_s=60.0, clock=clock)
    users.watch = watch
    return users, watch


def test_a_current_watch_lets_settings_be_used_for_the_long_ttl(tmp_path: Path) -> None:
    clock = Clock()
    users, watch = watched(tmp_path, clock)
    assert watch.changed(0) and not watch.current(clock.t)  # never polled: the short TTL
    watch.confirm(0, clock.t)
    s, t = users.settings_cached("bob"), users.tenant_settings_cached("t")
    for _ in range(40):  # 10 s, confirmed by a poll every 0.25 s: still remembered
        clock.t += 0.25
        assert not watch.changed(0)
        watch.confirm(0, clock.t)
        assert users.recent("bob") is s and users.recent_tenant("t") is t
    assert users.tenant_ahead("t") is None  # 10 s of the long 60: not due
    clock.t += 50.0  # 60 s after the read: read again, however current the watch
    watch.confirm(0, clock.t)
    assert users.recent("bob") is None and users.recent_tenant("t") is None


def test_settings_are_read_ahead_past_half_their_ttl(tmp_path: Path) -> None:
    """`ahead` / `tenant_ahead`: None until half the TTL in force has passed (the long one while
    the watch is current, else the short one), then the delay before reading them again: at
    most READ_AHEAD_DELAY_S and a quarter of what is left."""
    from candela_mitm.governance.users import READ_AHEAD_DELAY_S

    clock = Clock()
    users, watch = watched(tmp_path, clock)
    assert users.ahead("bob") is None and users.tenant_ahead("t") is None  # none remembered
    watch.confirm(0, clock.t)
    users.settings_cached("bob")
    users.tenant_settings_cached("t")
    clock.t += 29.0
    watch.confirm(0, clock.t)
    assert users.ahead("bob") is None and users.tenant_ahead("t") is None
    clock.t += 2.0  # 31 s of 60
    watch.confirm(0, clock.t)
    assert users.ahead("bob") == READ_AHEAD_DELAY_S == users.tenant_ahead("t")
    clock.t += 28.0  # 1 s left: a quarter of it
    watch.confirm(0, clock.t)
    assert users.ahead("bob") == pytest.approx(0.25)
    users.settings_cached("bob")  # read again: remembered from now
    assert users.ahead("bob") is None
    watch.failed()  # the short TTL (1 s): half of it
    assert users.ahead("bob") is None
    clock.t += 0.6
    assert users.ahead("bob") == pytest.approx(0.1)
    assert users.tenant_ahead("t") is None  # expired: read on the path, not ahead


@pytest.mark.parametrize(
    ("since_poll", "failed", "long"),
    [(0.25, False, True), (0.5, False, True), (0.51, False, False), (0.1, True, False)],
)
def test_a_stale_or_failed_watch_falls_back_to_the_short_ttl(
    tmp_path: Path, since_poll: float, failed: bool, long: bool
) -> None:
    clock = Clock()
    users, watch = watched(tmp_path, clock)
    watch.confirm(3, clock.t)
    s = users.settings_cached("bob")
    users.tenant_settings_cached("t")
    clock.t += 5.0 - since_poll
    watch.confirm(3, clock.t)  # the last poll that worked
    clock.t += since_poll  # 5 s after the read
    if failed:
        watch.failed()
    assert (users.recent("bob") is s) is long
    assert (users.recent_tenant("t") is not None) is long
    clock.t -= 4.5  # had the read been half a second old, the short TTL would still hold it
    assert users.recent("bob") is s


def test_many_users_within_the_long_ttl_are_swept_seldom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import candela_mitm.governance.users as users_module

    monkeypatch.setattr(users_module, "_CACHE_PRUNE_AT", 4)
    clock = Clock()
    users, watch = watched(tmp_path, clock)
    watch.confirm(0, clock.t)
    sweeps = []
    real = users._pruned
    monkeypatch.setattr(users, "_pruned", lambda c, now: sweeps.append(len(c)) or real(c, now))
    names = [f"u{i}" for i in range(20)]
    for name in names:
        users.settings_cached(name)
    assert all(users.recent(n) is not None for n in names)  # none dropped while live
    assert sweeps == [4, 8, 16]  # not one sweep per new user past 4
    clock.t += 61.0  # the 20 expire; swept when the cache reaches twice what was kept
    watch.confirm(0, clock.t)
    late = [f"late{i}" for i in range(13)]
    for name in late:
        users.settings_cached(name)
    assert sweeps == [4, 8, 16, 32]
    assert sorted(users._cache) == sorted(late)
    assert all(users.recent(n) is not None for n in late)
