"""Local runtime discovery against fake Ollama and LM Studio APIs, and its cache."""

from __future__ import annotations

from candela_mitm.local.discovery import RETRY_UNREACHABLE_S
from tests.core.local.support import local_runtime, nowhere


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
    rt.models.clock = lambda: now[0]
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
    rt.models.clock = lambda: now[0]
    rt.discover()
    now[0] += RETRY_UNREACHABLE_S - 0.1
    assert not rt.stale()
    now[0] += 0.2
    assert rt.stale()


def test_invalidate_with_a_minimum_age(tmp_path, ollama, lmstudio):
    rt = local_runtime(tmp_path, ollama.url, lmstudio.url)
    now = [0.0]
    rt.models.clock = lambda: now[0]
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
