"""enforcement/addresses.py: the provider names resolved ahead and their addresses."""

from __future__ import annotations

import pytest

from candela_mitm.enforcement import addresses as enforce
from candela_mitm.enforcement.addresses import (
    parse_hosts,
    provider_names,
    resolve_providers,
    split_families,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("10.9.0.1 api.openai.com\n", {"api.openai.com": ["10.9.0.1"]}),
        ("10.9.0.1 API.OpenAI.com. alias  # comment\n",
         {"api.openai.com": ["10.9.0.1"], "alias": ["10.9.0.1"]}),
        ("10.9.0.1 a\n10.9.0.2 a\n10.9.0.1 a\n", {"a": ["10.9.0.1", "10.9.0.2"]}),
        ("2001:db8::7 a\n", {"a": ["2001:db8::7"]}),
        ("# only a comment\nnot-an-ip a\n10.9.0.1\n\n", {}),
    ],
)  # fmt: skip
def test_parse_hosts(text: str, expected: dict[str, list[str]]) -> None:
    assert parse_hosts(text) == expected


def test_provider_names_merge_defaults_config_and_flags() -> None:
    names = provider_names(["API.OpenAI.com", "llm.internal."], ["extra.example"])
    assert names[: len(enforce.DEFAULT_PROVIDER_HOSTS)] == list(enforce.DEFAULT_PROVIDER_HOSTS)
    assert names.count("api.openai.com") == 1
    assert names[-2:] == ["llm.internal", "extra.example"]
    assert provider_names(["a"], [], defaults=False) == ["a"]


def test_resolve_prefers_the_hosts_file() -> None:
    asked: list[str] = []

    def resolver(name: str) -> list[str]:
        asked.append(name)
        return ["192.0.2.9"] if name == "b" else []

    got = resolve_providers(["a", "b", "c"], hosts={"a": ["10.0.0.1"]}, resolver=resolver)
    assert got == {"a": ["10.0.0.1"], "b": ["192.0.2.9"], "c": []}
    assert asked == ["b", "c"]


def test_split_families_sorts_and_dedupes() -> None:
    v4, v6 = split_families({"a": ["10.0.0.2", "2001:db8::1"], "b": ["10.0.0.10", "10.0.0.2"]})
    assert v4 == ["10.0.0.2", "10.0.0.10"] and v6 == ["2001:db8::1"]


