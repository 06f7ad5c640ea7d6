"""Local runtimes: discovery against fake Ollama and LM Studio APIs, settings, the runtime process."""

from __future__ import annotations

import json
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from candela_mitm.audit import AuditWriter
from candela_mitm.config import Audit, parse_config
from candela_mitm.context import RequestContext
from candela_mitm.errors import ConfigError
from candela_mitm.governance.accounting import account
from candela_mitm.governance.ledger import Reservation
from candela_mitm.local.runtimes import (
    RETRY_UNREACHABLE_S,
    SETTINGS_FILE,
    LocalRuntime,
    LocalSettings,
    RuntimeActionError,
    hourly_spend,
    merge_settings,
)
from candela_mitm.observability.spans import TraceContext
from candela_mitm.providers.forwarding import ForwardPlan, plan_chat_completion
from candela_mitm.providers.pricing import PricingTable
from candela_mitm.providers.specs import resolve_all
from candela_mitm.providers.streaming import ResponseProcessor
from candela_mitm.providers.usage import Usage
from tests.fakes.upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[3]


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


@pytest.fixture
def ollama():
    with FakeUpstream(openai_key=None, models=["llama3.2:3b", "shared:7b"]) as f:
        yield f


@pytest.fixture
def lmstudio():
    with FakeUpstream(openai_key=None, models=["qwen2.5-7b-instruct", "shared:7b"]) as f:
        yield f


def nowhere() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: refused at once


# -- settings --------------------------------------------------------------------------------

BASE = LocalSettings(cache_ttl_s=3600, gemini_cache_price_multiplier=0.25)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, BASE),
        ({"cache_ttl_s": 60}, LocalSettings(cache_ttl_s=60, gemini_cache_price_multiplier=0.25)),
        (
            {"gemini_cache_price_multiplier": 0.5},
            LocalSettings(cache_ttl_s=3600, gemini_cache_price_multiplier=0.5),
        ),
        (
            {"gemini_cache_price_multiplier": 1},
            LocalSettings(cache_ttl_s=3600, gemini_cache_price_multiplier=1.0),
        ),
        (
            {"cache_ttl_s": 0, "gemini_cache_price_multiplier": 0},
            LocalSettings(cache_ttl_s=0, gemini_cache_price_multiplier=0.0),
        ),
    ],
)
def test_valid_changes_merge(changes, expected):
    assert merge_settings(BASE, changes) == expected


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"cache_ttl_s": -1}, "cache_ttl_s"),
        ({"cache_ttl_s": "60"}, "cache_ttl_s"),  # strict: a string is not a number
        ({"cache_ttl_s": True}, "cache_ttl_s"),
        ({"cache_ttl_s": 1.5}, "cache_ttl_s"),
        ({"cache_ttl_s": 10**9}, "cache_ttl_s"),
        ({"gemini_cache_price_multiplier": 1.5}, "less than or equal to 1"),
        ({"gemini_cache_price_multiplier": -0.1}, "greater than or equal to 0"),
        ({"gemini_cache_price_multiplier": float("nan")}, "gemini_cache_price_multiplier"),
        ({"gemini_cache_price_multiplier": None}, "gemini_cache_price_multiplier"),
        ({"runtime_command": ["sh", "-c", "id"]}, "runtime_command: unknown key"),
        ([1, 2], "JSON object"),
        ("x", "JSON object"),
    ],
)
def test_invalid_changes_name_the_key(changes, words):
    with pytest.raises(ValueError) as e:
        merge_settings(BASE, changes)
    assert words in str(e.value)


def test_settings_persist_and_override_the_yaml(tmp_path):
    rt = local_runtime(tmp_path, nowhere(), nowhere(), cache_ttl_s=10)
    assert rt.settings == LocalSettings(cache_ttl_s=10, gemini_cache_price_multiplier=0.25)
    committed = []
    before, after = rt.update_settings(
        {"gemini_cache_price_multiplier": 0.4}, lambda b, a: committed.append((b, a))
    )
    assert committed == [(before, after)] and after.gemini_cache_price_multiplier == 0.4
    saved = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert saved == {"cache_ttl_s": 10, "gemini_cache_price_multiplier": 0.4}
    again = local_runtime(tmp_path, nowhere(), nowhere(), cache_ttl_s=10)
    assert again.settings == after


def test_a_change_whose_record_fails_is_not_made(tmp_path):
    rt = local_runtime(tmp_path, nowhere(), nowhere())

    def refuse(before, after):
        raise TimeoutError("audit down")

    with pytest.raises(TimeoutError):
        rt.update_settings({"cache_ttl_s": 5}, refuse)
    assert rt.settings.cache_ttl_s == 3600
    assert not (tmp_path / SETTINGS_FILE).exists()


def test_no_change_is_not_recorded(tmp_path):
    rt = local_runtime(tmp_path, nowhere(), nowhere())
    calls = []
    rt.update_settings({"cache_ttl_s": 3600}, lambda b, a: calls.append(1))
    assert calls == [] and not (tmp_path / SETTINGS_FILE).exists()


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "invalid JSON"),
        ('{"cache_ttl_s": -5}', "cache_ttl_s"),
        ('{"surprise": 1}', "surprise: unknown key"),
    ],
)
def test_a_bad_settings_file_fails_the_start_naming_it(tmp_path, content, words):
    (tmp_path / SETTINGS_FILE).write_text(content)
    with pytest.raises(ConfigError) as e:
        local_runtime(tmp_path, nowhere(), nowhere())
    assert SETTINGS_FILE in str(e.value) and words in str(e.value)


@pytest.mark.parametrize(
    "route, expected",
    [("google", 0.25), ("gemini-oai", 0.25), ("openai", None), ("anthropic", None)],
)
def test_the_multiplier_applies_to_gemini_routes_only(tmp_path, route, expected):
    assert local_runtime(tmp_path, nowhere(), nowhere()).cached_multiplier(route) == expected


class _Reported(ResponseProcessor):
    """An answer that reported `usage` whole."""

    def __init__(self, usage: Usage) -> None:
        self._usage = usage

    def feed(self, data: bytes) -> bytes:
        return data

    @property
    def usage(self) -> Usage:
        return self._usage

    @property
    def reported(self) -> bool:
        return True


T = datetime(2026, 5, 17, tzinfo=UTC)


def test_accounting_prices_cached_gemini_input_with_the_planned_multiplier(tmp_path):
    cfg = parse_config({})
    pricing = PricingTable.from_config(cfg)
    price = pricing.get("gemini-2.5-flash")
    assert price is not None
    usage = Usage(input_tokens=10_000, output_tokens=1_000, cached_tokens=8_000)
    costs = {}
    for multiplier in (None, 0.25, 0.5):
        plan = plan_chat_completion(resolve_all(cfg), "gemini-oai", {"model": "gemini-2.5-flash"})
        assert isinstance(plan, ForwardPlan)
        if multiplier is not None:
            plan.notes["cached_multiplier"] = multiplier
        ctx = RequestContext(
            kind="chat", provider=None, rest="", trace=TraceContext("0" * 32, None)
        )
        ctx.plan, ctx.forwarded, ctx.processor = plan, True, _Reported(usage)
        ctx.reservation = Reservation("r", "u", None, 0.0, "2026-05-17", "s", "o", T, 0.0)
        account(ctx, pricing)
        assert ctx.usage_source == "reported"
        costs[multiplier] = ctx.cost_usd
    full = 2_000 * price.input + 1_000 * price.output
    assert costs[0.5] == pytest.approx((full + 8_000 * price.input * 0.5) / 1e6)
    assert costs[0.25] == pytest.approx((full + 8_000 * price.input * 0.25) / 1e6)
    assert costs[None] == pytest.approx((full + 8_000 * (price.cached_input or 0)) / 1e6)


# -- discovery -------------------------------------------------------------------------------


def test_discovery_merges_both_runtimes_and_the_configured_one_wins(tmp_path, ollama, lmstudio):
    rt = local_runtime(tmp_path, ollama.url, lmstudio.url)
    d = rt.discover()
    assert d.models == {
        "llama3.2:3b": "ollama",
        "shared:7b": "ollama",
        "qwen2.5-7b-instruct": "lmstudio",
    }
    o = d.runtimes["ollama"]
    assert o.reachable and o.version == "0.6.0" and o.error is None
    assert {r.route for r in ollama.requests} >= {"ollama.tags", "ollama.version"}
    assert [r.route for r in lmstudio.requests] == ["openai.models"]

    rt_lm = local_runtime(tmp_path, ollama.url, lmstudio.url, runtime="lmstudio")
    assert rt_lm.discover().models["shared:7b"] == "lmstudio"


def test_an_unreachable_runtime_is_reported_not_raised(tmp_path, ollama):
    rt = local_runtime(tmp_path, ollama.url, nowhere())
    d = rt.discover()
    assert d.models == {"llama3.2:3b": "ollama", "shared:7b": "ollama"}
    lm = d.runtimes["lmstudio"]
    assert not lm.reachable and lm.models == () and lm.error


def test_a_runtime_answering_garbage_is_unreachable(tmp_path, ollama):
    ollama.configure(fail_status=500)
    d = local_runtime(tmp_path, ollama.url, nowhere()).discover()
    assert not d.runtimes["ollama"].reachable and d.runtimes["ollama"].error == "HTTP 500"


def test_the_model_list_is_cached_for_the_ttl(tmp_path, ollama, lmstudio):
    rt = local_runtime(tmp_path, ollama.url, lmstudio.url, cache_ttl_s=60)
    now = [1000.0]
    rt._clock = lambda: now[0]
    rt.discover()
    asked = len(ollama.requests)
    now[0] += 59
    assert not rt.stale()
    rt.discover()
    assert len(ollama.requests) == asked  # from the cache
    now[0] += 2
    assert rt.stale()
    rt.discover()
    assert len(ollama.requests) > asked
    asked = len(ollama.requests)
    rt.invalidate()
    rt.discover()
    assert len(ollama.requests) > asked
    asked = len(ollama.requests)
    rt.discover(force=True)
    assert len(ollama.requests) > asked


def test_an_unreachable_runtime_is_asked_again_soon_whatever_the_ttl(tmp_path, ollama):
    rt = local_runtime(tmp_path, ollama.url, nowhere(), cache_ttl_s=3600)
    now = [0.0]
    rt._clock = lambda: now[0]
    rt.discover()
    now[0] += RETRY_UNREACHABLE_S - 0.1
    assert not rt.stale()
    now[0] += 0.2
    assert rt.stale()


def test_invalidate_with_a_minimum_age(tmp_path, ollama, lmstudio):
    rt = local_runtime(tmp_path, ollama.url, lmstudio.url)
    now = [0.0]
    rt._clock = lambda: now[0]
    rt.discover()
    rt.invalidate(older_than_s=2.0)
    assert rt.cached is not None
    now[0] += 2.0
    rt.invalidate(older_than_s=2.0)
    assert rt.cached is None


def test_health_names_the_runtime_version_and_models(tmp_path, ollama, lmstudio):
    h = local_runtime(tmp_path, ollama.url, lmstudio.url).health()
    assert h["status"] == "ok" and h["runtime"] == "ollama" and h["reachable"] is True
    assert h["version"] == "0.6.0" and h["models"] == ["llama3.2:3b", "shared:7b"]
    assert h["process"]["managed"] is False and h["process"]["command"] == ["ollama", "serve"]
    assert {r["name"] for r in h["runtimes"]} == {"ollama", "lmstudio"}
    down = local_runtime(tmp_path, nowhere(), nowhere()).health()
    assert down["status"] == "unreachable" and down["reachable"] is False and down["error"]


# -- the runtime process ---------------------------------------------------------------------

# A stand-in for `ollama serve`: the fake Ollama API where OLLAMA_HOST says, until signalled.
FAKE_SERVE = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
from tests.fakes.upstream import FakeUpstream
host, port = os.environ["OLLAMA_HOST"].rsplit(":", 1)
FakeUpstream(host=host, port=int(port), openai_key=None, models=["started:1b"]).start()
print("serving", flush=True)
time.sleep(3600)
"""


def test_start_and_stop_the_configured_command(tmp_path):
    url = nowhere()
    rt = local_runtime(tmp_path, url, nowhere(), runtime_command=[sys.executable, "-c", FAKE_SERVE])
    assert rt.discover().runtimes["ollama"].reachable is False
    started = rt.start()
    try:
        assert started["started"] is True and started["reachable"] is True
        pid = started["process"]["pid"]
        assert started["process"] == {
            "managed": True,
            "running": True,
            "pid": pid,
            "exit_code": None,
            "command": [sys.executable, "-c", FAKE_SERVE],
        }
        assert rt.discover().models == {"started:1b": "ollama"}  # start dropped the old list
        again = rt.start()
        assert again["started"] is False and again["reason"] == "already running"
    finally:
        stopped = rt.stop()
    assert stopped["stopped"] is True and stopped["pid"] == pid
    assert stopped["process"]["managed"] is False
    assert rt.discover().runtimes["ollama"].reachable is False
    assert rt.stop()["stopped"] is False
    assert "serving" in (tmp_path / "local-runtime.log").read_text()


def test_a_runtime_started_elsewhere_is_neither_started_nor_stopped(tmp_path, ollama):
    rt = local_runtime(tmp_path, ollama.url, nowhere(), runtime_command=["false"])
    assert rt.start()["started"] is False
    with pytest.raises(RuntimeActionError) as e:
        rt.stop()
    assert e.value.status == 409 and "not started by Candela" in str(e.value)


@pytest.mark.parametrize(
    "command, status, words",
    [
        (["/nonexistent/ollama", "serve"], 502, "cannot run"),
        ([sys.executable, "-c", "raise SystemExit(3)"], 502, "exited with code 3"),
    ],
)
def test_a_command_that_cannot_serve_is_an_error(tmp_path, command, status, words):
    rt = local_runtime(tmp_path, nowhere(), nowhere(), runtime_command=command)
    with pytest.raises(RuntimeActionError) as e:
        rt.start(wait_s=5)
    assert e.value.status == status and words in str(e.value)


def test_close_stops_a_started_runtime(tmp_path):
    rt = local_runtime(
        tmp_path, nowhere(), nowhere(), runtime_command=[sys.executable, "-c", FAKE_SERVE]
    )
    assert rt.start()["started"] is True
    proc = rt._proc
    assert proc is not None and proc.poll() is None
    rt.close()
    assert proc.poll() is not None


# -- spend over the day ----------------------------------------------------------------------


def test_hourly_spend_sums_the_users_requests_of_the_day(tmp_path):
    db = tmp_path / "audit.db"
    today = datetime.now(UTC).date()
    assert hourly_spend(db, "me", today) == [0.0] * 24  # no log yet
    w = AuditWriter(Audit(sqlite_path=str(db)))
    w.start()
    try:
        hour_before = datetime.now(UTC).hour
        for user, cost in (("me", 0.5), ("me", 0.25), ("other", 9.0)):
            w.record("llm_request", user_id=user, cost_usd=cost)
        w.record("local_config_change", actor="me", cost_usd=100.0)  # not a request
        assert w.flush(10)
        hour_after = datetime.now(UTC).hour
        got = hourly_spend(db, "me", today)
    finally:
        w.close()
    assert sum(got) == pytest.approx(0.75)
    assert {h for h, v in enumerate(got) if v} <= {hour_before, hour_after}
    assert hourly_spend(db, "me", today.replace(year=today.year - 1)) == [0.0] * 24
