import pytest

from candela_mitm.config import parse_config
from candela_mitm.errors import ConfigError
from candela_mitm.runtime import build_runtime


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


# issue 7: hot-path store calls run on the event loop when the store can answer at once
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


def test_store_call_tries_again_before_the_pool(rt):
    """A lock held for a moment (another worker's transaction): tried again on the loop; a
    store that never answers without waiting (Redis): straight to the pool, tried once."""
    import asyncio
    import threading

    from candela_mitm.runtime import STORE_TRIES
    from candela_mitm.state.ports import WouldWait

    here = threading.get_ident()
    real = rt.store.call_without_waiting
    tries = []

    def busy_twice(fn, *args):
        tries.append(1)
        if len(tries) <= 2:
            raise WouldWait("held")
        return real(fn, *args)

    def remote(fn, *args):
        tries.append(1)
        raise WouldWait("remote", busy=False)

    def always_busy(fn, *args):
        tries.append(1)
        raise WouldWait("held")

    async def call():
        return await rt.store_call(threading.get_ident)

    rt.store.call_without_waiting = busy_twice
    try:
        assert asyncio.run(call()) == here and len(tries) == 3
        tries.clear()
        rt.store.call_without_waiting = remote
        assert asyncio.run(call()) != here and len(tries) == 1
        tries.clear()
        rt.store.call_without_waiting = always_busy
        assert asyncio.run(call()) != here and len(tries) == STORE_TRIES  # held throughout
    finally:
        rt.store.call_without_waiting = real


def test_store_calls_of_one_loop_turn_share_a_transaction(rt):
    """Calls made in the same event-loop turn run together (one call_without_waiting, one
    transaction), in order; one that fails is undone alone and answers only its caller."""
    import asyncio

    store = rt.store
    real = store.call_without_waiting
    batches = []

    def spy(fn, *args):
        batches.append(len(args[-1]))
        return real(fn, *args)

    def writes_then_fails():
        store.rate_hit("undone", 5, 60_000_000, 1)
        raise ValueError("after a write")

    async def main():
        return await asyncio.gather(
            rt.store_call(store.rate_hit, "k", 5, 60_000_000, 1),
            rt.store_call(writes_then_fails),
            rt.store_call(store.rate_hit, "k", 5, 60_000_000, 2),
            return_exceptions=True,
        )

    store.call_without_waiting = spy
    try:
        first, failed, third = asyncio.run(main())
    finally:
        store.call_without_waiting = real
    assert batches == [3]
    assert (first.count, third.count) == (1, 2)  # in the order they were made
    assert isinstance(failed, ValueError)
    assert store.rate_hit("undone", 5, 60_000_000, 3).count == 1  # its write was undone
    text = rt.metrics.render()[0].decode()
    assert 'candela_state_store_calls_total{where="event_loop"} 3.0' in text


def test_a_batch_that_fails_whole_fails_every_call(rt):
    import asyncio

    from candela_mitm.errors import StoreUnavailable

    store = rt.store

    async def main():
        return await asyncio.gather(
            rt.store_call(store.rate_hit, "k", 5, 60_000_000, 1),
            rt.store_call(store.get_user, "nobody"),
            return_exceptions=True,
        )

    store.close()
    results = asyncio.run(main())
    assert all(isinstance(r, StoreUnavailable) for r in results)


def test_a_store_that_cannot_join_calls_runs_each_on_the_pool(rt):
    import asyncio
    import threading

    here = threading.get_ident()
    rt.store.joins_calls = False  # as Redis

    async def main():
        return await asyncio.gather(
            rt.store_call(threading.get_ident), rt.store_call(rt.store.get_user, "nobody")
        )

    where, user = asyncio.run(main())
    assert where != here and user is None
    text = rt.metrics.render()[0].decode()
    assert 'candela_state_store_calls_total{where="pool"} 2.0' in text


def test_a_turn_left_by_a_stopped_loop_does_not_hold_up_the_next(rt):
    import asyncio

    gone = asyncio.new_event_loop()
    stale = gone.create_future()
    # a call queued on a loop that stopped before running its turn
    rt._turn, rt._turn_loop = [(rt.store.get_user, ("x",), stale)], gone

    async def main():
        call = rt.store_call(rt.store.rate_hit, "k", 5, 60_000_000, 1)
        return await asyncio.wait_for(call, 5)

    try:
        assert asyncio.run(main()).count == 1  # a new loop starts its own turn
    finally:
        gone.close()
