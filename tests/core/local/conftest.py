"""Fake Ollama and LM Studio APIs (the fake upstream speaks both)."""

import pytest

from tests.fakes.upstream import FakeUpstream


@pytest.fixture
def ollama():
    with FakeUpstream(openai_key=None, models=["llama3.2:3b", "shared:7b"]) as f:
        yield f


@pytest.fixture
def lmstudio():
    with FakeUpstream(openai_key=None, models=["qwen2.5-7b-instruct", "shared:7b"]) as f:
        yield f
