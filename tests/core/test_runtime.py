import time

import pytest

from candela_mitm import runtime
from candela_mitm.config import parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.runtime import build_runtime
from candela_mitm.state.ports import TenantRecord
from tests.core.admin.support import ADMIN, ALICE, call, q


def cfg(tmp_path, **extra):
    base = {
        "state": {"sqlite_path": str(tmp_path / "state.db")},
        "audit": {"sqlite_path": str(tmp_path / "audit.db")},
        "governance": {"models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]}},
    }
    base.update(extra)
    return parse_config(base)


@pytest.fixture
def rt(tmp_path):
    r = build_runtime(cfg(tmp_path), "server")
    yield r
    r.close()


def test_reload_swaps_policy_pricing_and_users(rt, tmp_path):
    assert not rt.policy.check("gpt-4o", None).allowed
    new = cfg(
        tmp_path,
        governance={"models": {"mode": "allowlist", "allowed": ["gpt-4o"]}},
        pricing={"my-model": {"input": 1.0, "output": 2.0}},
        users={"bob": {"tenants": ["t"], "daily_budget_usd": 3.0}},
    )
    changed = rt.reload(new)
    assert set(changed) == {"governance", "pricing", "users"}
    assert rt.policy.check("gpt-4o", None).allowed
    assert rt.pricing.get("my-model").input == 1.0
    assert rt.users.settings("bob").daily_budget_usd == 3.0
    assert rt.config is new


def test_reload_refuses_sections_that_need_a_restart(rt, tmp_path):
    before = rt.config
    with pytest.raises(ConfigError, match="state"):
        rt.reload(cfg(tmp_path, state={"sqlite_path": str(tmp_path / "other.db")},
                      governance={"models": {"mode": "allowlist", "allowed": ["gpt-4o"]}}))
    assert rt.config is before and not rt.policy.check("gpt-4o", None).allowed


def test_reload_applies_alert_thresholds_and_webhooks(rt, tmp_path):
    assert rt.alerts is not None and rt.alerts.config().webhooks == []
    alerts = {"thresholds": [75], "webhooks": [{"url": "https://hooks.example/c", "format": "slack"}]}
    assert rt.reload(cfg(tmp_path, alerts=alerts)) == ["alerts"]
    assert rt.alerts.config().thresholds == [75]
    assert rt.alerts.config().webhooks[0].format == "slack"


def test_the_utilisation_gauge_knows_only_keys_minted_into_the_store(rt):
    from candela_mitm.runtime import known_scope
    from candela_mitm.state.ports import KeyRecord

    known = known_scope(rt)
    assert not known("key", "k_minted")
    rt.store.put_api_key(KeyRecord("k_minted", "0" * 64, "alice", "laptop", "admin", 1,
                                   budget_usd=1.0))
    assert known("key", "k_minted") and not known("key", "k_other")


# issue 7: hot-path store calls run on the event loop when the store can answer at once
# (state/calls.py, tests/core/state/test_calls.py); the runtime counts where they ran
def test_store_call_runs_here_when_free_else_on_the_pool(rt):
    import asyncio
    import threading

    from candela_mitm.state.ports import WouldWait

    here = threading.get_ident()

    def where(tag):
        rt.store.rate_hit(tag, 5, 60_000_000, 1)
        return threading.get_ident()

    async def call(tag):
        return await rt.store_call(where, tag)

    assert asyncio.run(call("a")) == here  # SQLite with its lock free: no thread hop

    real = rt.store.call_without_waiting

    def busy(fn, *args):
        raise WouldWait("held")

    rt.store.call_without_waiting = busy
    try:
        assert asyncio.run(call("b")) != here  # refused: the pool runs it, once
    finally:
        rt.store.call_without_waiting = real
    assert rt.store.rate_hit("a", 5, 60_000_000, 1).count == 2
    assert rt.store.rate_hit("b", 5, 60_000_000, 1).count == 2
    text = rt.metrics.render()[0].decode()
    assert 'candela_state_store_calls_total{where="event_loop"} 1.0' in text
    assert 'candela_state_store_calls_total{where="pool"} 1.0' in text


def _dead_pid():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)
    return int(done.stdout)


def test_a_start_settles_a_dead_processs_slice_from_the_entries_naming_it(tmp_path):
    """Budget slices (governance.budgets.slices): a process died holding a slice, two of its
    carved requests' entries durable (one recorded on the slice before the crash, one not), one
    request in flight without an entry. The next start settles the one not recorded, from its
    entry, and charges what is left of the slice (the request in flight is among it: nothing
    forwarded is free), its entry written first."""
    from datetime import UTC, datetime

    from candela_mitm.audit.query import charged_entries
    from candela_mitm.governance.ledger import Ledger, Reservation
    from candela_mitm.governance.slices import SliceRules, Slices
    from candela_mitm.state.liveness import host_id

    on = {"budgets": {"slices": {"enabled": True}},
          "models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]}}
    first = build_runtime(cfg(tmp_path, governance=on), "server")
    try:
        dead = Ledger(first.store, owner=f"{host_id()}:{_dead_pid()}")
        slices = Slices(dead, SliceRules())
        own = dead.reserve("u", None, 0.01, 100.0, "span-own", model="m", provider="openai")
        assert isinstance(own, Reservation) and dead.settle(own, 0.01, 1, 1, "m", "openai").applied
        ask = slices.ask(own) or slices.ask(own)  # a budget used twice within idle_s
        assert ask is not None and slices.took(ask, ask.reserve())
        key = slices.key_of("u", 100.0, own.period, None, None, own.tenant_period, None,
                            own.created_at)
        a, b, c = (slices.carve(key, 0.01, f"span-{i}") for i in range(3))
        assert a and b and c
        slices.settle(a, 0.004, 10, 2, "gpt-4o-mini", "openai")
        assert slices.flush()  # a recorded on the slice
        (slice_span,) = [x.request_id for x in first.store.active_reservations()
                   if x.reservation_id == a.slice]
        for span, cost in (("span-0", 0.004), ("span-1", 0.003)):  # c: in flight, no entry
            first.audit.record_durable(
                "llm_request", span_id=span, slice_id=a.slice, usage_source="reported",
                cost_usd=cost, input_tokens=10, output_tokens=2, model="gpt-4o-mini",
                provider="openai",
            ).result(10)
    finally:
        first.close()
    size = ask.amount_usd
    assert size == pytest.approx(32 * 0.01)  # `requests` of the 0.01 hold
    again = build_runtime(cfg(tmp_path, governance=on), "server")
    try:
        status = again.ledger.status("u", 100.0)
        assert status.spent_usd == pytest.approx(0.01 + size)
        assert status.reserved_usd == 0
        assert again.store.active_reservations() == []
        assert {(r.model, r.requests) for r in again.ledger.usage(user="u")} == {
            ("m", 1), ("gpt-4o-mini", 2), ("", 1)
        }
        # the rest's entry: charged at what was reserved, in the dead process's name
        found = charged_entries(tmp_path / "audit.db", {slice_span}, datetime(2000, 1, 1, tzinfo=UTC))
        (entry,) = found.values()
        assert entry["reason"] == "proxy_crash" and entry["usage_source"] == "reserved"
        assert entry["reservation_id"] == a.slice
        assert entry["cost_usd"] == pytest.approx(size - 0.004 - 0.003)
    finally:
        again.close()


def test_slices_follow_reloads_and_are_returned_at_close(tmp_path):
    from candela_mitm.governance.ledger import Reservation

    assert cfg(tmp_path).governance.budgets.slices.enabled  # on by default
    assert cfg(tmp_path).governance.rate_limits.leases.enabled

    on = {"budgets": {"slices": {"enabled": True, "requests": 4}},
          "models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]}}
    r = build_runtime(cfg(tmp_path, governance=on), "server")
    try:
        assert r.slices is not None and r.slices.rules.enabled and r.slices.rules.requests == 4
        own = r.ledger.reserve("u", None, 0.01, 100.0, "span", model="m", provider="openai")
        assert isinstance(own, Reservation)
        ask = r.slices.ask(own) or r.slices.ask(own)  # a budget used twice within idle_s
        assert ask is not None and r.slices.took(ask, ask.reserve())
        off = {"budgets": {"slices": {"enabled": False}},
               "models": {"mode": "allowlist", "allowed": ["gpt-4o-mini"]}}
        r.reload(cfg(tmp_path, governance=off))  # the one held is returned by the next flush
        assert not r.slices.rules.enabled and r.slices.ask(own) is None
        r.slices.flush()
        assert r.slices.held() == 0
        assert r.slices.took(ask, ask.reserve()) and r.slices.held() == 1
    finally:
        r.close()  # returns what is held
    from candela_mitm.state import open_state_store

    store = open_state_store(cfg(tmp_path).state)
    try:
        assert [a.request_id for a in store.active_reservations()] == ["span"]
    finally:
        store.close()


# -- settings cached across processes by generation (SettingsPoller, SettingsWatch) -------------


class FakeClock:
    """The directories' and watches' clock: time moves when the test says (the polls run on
    their own thread, in real time, and confirm the watch at this clock's time)."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class CountingStore:
    """A store whose user and tenant reads are counted (the reads a request's settings cost)."""

    def __init__(self, store):
        self._store = store
        self.reads = 0

    def get_user(self, *args, **kw):
        self.reads += 1
        return self._store.get_user(*args, **kw)

    def get_tenant(self, *args, **kw):
        self.reads += 1
        return self._store.get_tenant(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._store, name)


def polled(rt, more: int = 2, deadline_s: float = 30.0) -> None:
    """Wait for `more` polls of rt's settings generation to succeed (the last began after now)."""
    target = rt.settings_poller.polls + more
    end = time.monotonic() + deadline_s
    while rt.settings_poller.polls < target:
        assert time.monotonic() < end, "the settings generation was not polled"
        time.sleep(0.01)


def processes_cfg(tmp_path, i: int, state: dict | None = None):
    return parse_config(
        {
            "state": state or {"sqlite_path": str(tmp_path / "state.db")},
            "audit": {"sqlite_path": str(tmp_path / f"audit{i}.db")},
            "auth": {"api_keys": [{"sha256": "c" * 64, "user": ADMIN}], "admins": [ADMIN]},
            "users": {ALICE: {"tenants": ["research-team"], "daily_budget_usd": 20.0}},
        }
    )


def watched_runtime(cfg, clock: FakeClock, reconcile: bool = True):
    """A runtime whose directory and watch read `clock`, and whose directory's reads count."""
    rt = build_runtime(cfg, "server", reconcile=reconcile)
    rt.settings_watch.clock = clock
    rt.users.clock = clock
    rt.users.store = CountingStore(rt.store)
    return rt


@pytest.fixture
def two_processes(backend, tmp_path, monkeypatch):
    """Two runtimes sharing one store (two workers, or two hosts on Redis), each polling the
    settings generation every 50 ms."""
    monkeypatch.setattr(runtime, "SETTINGS_POLL_S", 0.05)
    monkeypatch.setattr(runtime, "open_state_store", lambda state: backend.open())
    clock = FakeClock()
    made = [watched_runtime(processes_cfg(tmp_path, i), clock, i == 0) for i in range(2)]
    for rt in made:
        polled(rt)
    yield clock, made
    for rt in made:
        rt.close()


def test_an_admin_change_through_one_process_is_seen_by_another_within_polls(two_processes):
    clock, (a, b) = two_processes
    reads = b.users.store
    first = b.users.settings_cached(ALICE)
    assert (first.daily_budget_usd, reads.reads) == (20.0, 1)
    clock.t += 5.0  # past the 1 s TTL: the watch is current, so the read is still used
    polled(b)
    assert b.users.recent(ALICE) is first
    assert reads.reads == 1  # no store read in between
    assert b.settings_poller.changes == 0

    r = call(a, "PUT", f"/admin/v1/users/{q(ALICE)}", {"daily_budget_usd": 7.0})
    assert r.status == 200
    assert a.users.recent(ALICE) is None  # in the process that made it: at once
    end = time.monotonic() + 30.0
    while b.users.recent(ALICE) is not None:  # the other: at its next poll
        assert time.monotonic() < end, "the other process never saw the change"
        time.sleep(0.01)
    assert b.settings_poller.changes == 1
    assert b.users.settings_cached(ALICE).daily_budget_usd == 7.0
    assert reads.reads == 2


def counted_forgets(rt) -> dict[str, int]:
    """How many times rt forgot its users' settings and retired its budget slices (from now)."""
    counts = {"forget": 0, "retire_all": 0}
    users_forget, retire_all = rt.users.forget, rt.slices.retire_all

    def forget():
        counts["forget"] += 1
        users_forget()

    def retire():
        counts["retire_all"] += 1
        retire_all()

    rt.users.forget, rt.slices.retire_all = forget, retire
    return counts


def test_an_admin_change_is_forgotten_once_in_each_process(two_processes):
    """Once at once where it was made (not again when that process's poll reads the generation
    it bumped: slices taken anew in between would be returned for nothing), once at the next
    poll in the other. The polls are driven by hand: none runs between the change and its
    forget."""
    _, (a, b) = two_processes
    for rt in (a, b):
        rt.settings_poller.stop()
        assert rt.settings_poller.poll()
    counts = {"a": counted_forgets(a), "b": counted_forgets(b)}
    r = call(a, "PUT", f"/admin/v1/users/{q(ALICE)}", {"daily_budget_usd": 7.0})
    assert r.status == 200
    assert counts["a"] == {"forget": 1, "retire_all": 1}
    assert counts["b"] == {"forget": 0, "retire_all": 0}
    for _ in range(2):
        assert a.settings_poller.poll() and b.settings_poller.poll()
    assert counts == {
        "a": {"forget": 1, "retire_all": 1},
        "b": {"forget": 1, "retire_all": 1},
    }
    changes = [
        rt.metrics.registry.get_sample_value("candela_settings_changes_total") for rt in (a, b)
    ]
    assert changes == [0.0, 1.0]
    assert a.users.settings_cached(ALICE).daily_budget_usd == 7.0
    assert b.users.settings_cached(ALICE).daily_budget_usd == 7.0


def test_a_reload_keeps_watching_and_close_stops_the_polls(tmp_path):
    rt = build_runtime(processes_cfg(tmp_path, 0), "server")
    try:
        rt.reload(processes_cfg(tmp_path, 0).model_copy(update={"users": {}}))
        assert rt.users.watch is rt.settings_watch is not None  # the new directory's too
        polled(rt, 1)
    finally:
        rt.close()
    polls = rt.settings_poller.polls
    time.sleep(0.3)
    assert rt.settings_poller.polls == polls


def test_a_change_written_to_the_store_directly_is_seen_too(two_processes):
    clock, (a, b) = two_processes
    b.users.tenant_settings_cached("research-team")
    before = b.settings_poller.changes
    a.store.put_tenant(TenantRecord("research-team", budget_usd=3.0))  # e.g. a tool on the store
    end = time.monotonic() + 30.0
    while b.users.recent_tenant("research-team") is not None:
        assert time.monotonic() < end, "the other process never saw the change"
        time.sleep(0.01)
    assert b.settings_poller.changes == before + 1
    assert b.users.tenant_settings_cached("research-team").budget_usd == 3.0


def test_an_unreachable_store_brings_the_ttl_back_to_a_second(
    redis_server_factory, tmp_path, monkeypatch
):
    monkeypatch.setattr(runtime, "SETTINGS_POLL_S", 0.05)
    server = redis_server_factory()
    state = {"backend": "redis", "redis_url": server.url, "busy_timeout_ms": 200}
    clock = FakeClock()
    rt = watched_runtime(processes_cfg(tmp_path, 0, state), clock, reconcile=False)
    try:
        polled(rt)
        s = rt.users.settings_cached(ALICE)
        clock.t += 5.0
        polled(rt)
        assert rt.users.recent(ALICE) is s  # the long TTL while the polls succeed
        failures = rt.settings_poller.failures
        server.stop()
        end = time.monotonic() + 30.0
        while rt.settings_poller.failures == failures:
            assert time.monotonic() < end, "the poll never failed"
            time.sleep(0.01)
        assert rt.users.recent(ALICE) is None  # 5 s old: past the 1 s TTL, read again
        clock.t -= 4.5  # a read half a second old is still used for the 1 s TTL
        assert rt.users.recent(ALICE) is s
        rt.metrics.refresh()  # what a scrape shows (the scrape's refresh: the watch's gauges)
        get = rt.metrics.registry.get_sample_value
        assert get("candela_settings_polls_total", {"outcome": "failed"}) >= 1
        assert get("candela_settings_polls_total", {"outcome": "ok"}) >= 2
        assert get("candela_settings_watch_current") == 0
        assert get("candela_settings_generation_seen") == rt.settings_watch.seen >= 0
    finally:
        rt.close()
