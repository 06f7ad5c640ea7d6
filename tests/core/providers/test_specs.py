"""providers/specs.py: where each provider route's requests go, resolved from config once."""

from __future__ import annotations

import pytest

from candela_mitm.config import Provider, parse_config
from candela_mitm.providers.specs import SPECS, resolve_all, resolve_upstream


@pytest.mark.parametrize(
    ("route", "cfg", "url", "region", "version"),
    [
        ("openai", None, "https://api.openai.com/v1/x", None, "2023-06-01"),
        ("gemini-oai", None, "https://generativelanguage.googleapis.com/v1beta/openai/v1/x", None, "vertex-2023-10-16"),
        # Claude on Vertex: the default region's endpoint, or the global one
        ("anthropic", None, "https://us-east5-aiplatform.googleapis.com/v1/x", "us-east5", "vertex-2023-10-16"),
        ("anthropic-vertex", {"region": "global"}, "https://aiplatform.googleapis.com/v1/x", "global", "vertex-2023-10-16"),
        ("anthropic-direct", None, "https://api.anthropic.com/v1/x", None, "2023-06-01"),
        ("anthropic-bedrock", {"region": "eu-west-1"}, "https://bedrock-runtime.eu-west-1.amazonaws.com/v1/x", "eu-west-1", "bedrock-2023-05-31"),
        ("bedrock-mantle", None, "https://bedrock-mantle.us-east-1.api.aws/v1/x", "us-east-1", "2023-06-01"),
        # a base URL given in config wins; a non-default port is kept in the Host header
        ("ollama", None, "http://127.0.0.1:11434/v1/x", None, "2023-06-01"),
        ("openai", {"base_url": "http://127.0.0.1:8080/prefix/"}, "http://127.0.0.1:8080/prefix/v1/x", None, "2023-06-01"),
        ("anthropic-direct", {"anthropic_version": "2024-01-01"}, "https://api.anthropic.com/v1/x", None, "2024-01-01"),
    ],
)  # fmt: skip
def test_resolve_upstream(route, cfg, url, region, version) -> None:
    up = resolve_upstream(SPECS[route], Provider(**cfg) if cfg else None)
    assert (up.url("/v1/x"), up.region, up.anthropic_version, up.name) == (url, region, version, route)


def test_host_header_names_the_port_only_when_it_is_not_the_schemes() -> None:
    assert resolve_upstream(SPECS["openai"], None).host_header == "api.openai.com"
    assert resolve_upstream(SPECS["ollama"], None).host_header == "127.0.0.1:11434"
    https_on_80 = resolve_upstream(SPECS["openai"], Provider(base_url="https://h.example:80"))
    assert https_on_80.host_header == "h.example:80"


@pytest.mark.parametrize("base", ["ftp://h.example", "not a url", "https://", "h.example"])
def test_a_base_url_that_is_not_http_is_refused_naming_the_provider(base: str) -> None:
    with pytest.raises(ValueError, match="provider openai: base_url"):
        resolve_upstream(SPECS["openai"], Provider(base_url=base))


def test_resolve_all_covers_every_route_with_its_config() -> None:
    config = parse_config({"providers": {"openai": {"api_key_env": "MY_KEY", "timeout_s": 5}}})
    ups = resolve_all(config)
    assert set(ups) == set(SPECS)
    assert (ups["openai"].api_key_env, ups["openai"].timeout_s) == ("MY_KEY", 5)
    assert ups["anthropic-direct"].api_key_env == "ANTHROPIC_API_KEY"  # the spec's default
    assert ups["google"].api_key_env is None and ups["google"].timeout_s is None


def test_local_runtimes_cost_nothing_and_only_anthropic_translates() -> None:
    assert {n for n, s in SPECS.items() if s.local} == {"ollama", "lmstudio"}
    assert {n for n, s in SPECS.items() if s.translates_openai} == {"anthropic"}
    assert SPECS["bedrock-mantle"].signing_service == "bedrock-mantle"
