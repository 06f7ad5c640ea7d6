"""context.py: which of Candela's routes a request path is."""

from __future__ import annotations

import pytest

from candela_mitm.context import classify


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/proxy/openai/v1/chat/completions?x=1", ("proxy", "openai", "/v1/chat/completions?x=1")),
        ("/proxy/anthropic", ("proxy", "anthropic", "/")),
        ("/proxy/gemini/", ("proxy", "gemini", "/")),
        ("/healthz", ("health", None, "")),
        ("/healthz/?probe=1", ("health", None, "?probe=1")),
        ("/v1/models", ("models", None, "")),
        ("/v1/chat/completions/", ("chat", None, "")),
        ("/_local/api/traces", ("traces", None, "")),
        ("/_local", ("local", None, "")),
        ("/_local/api/usage?day=1", ("local", None, "/api/usage?day=1")),
        ("/_localx", ("not_found", None, "/_localx")),
        ("/admin/v1/me?verbose=1", ("admin", None, "/admin/v1/me?verbose=1")),
        ("/metrics", ("metrics", None, "")),
        ("/metrics/", ("not_found", None, "/metrics/")),
        ("/v1/completions", ("not_found", None, "/v1/completions")),
        ("/", ("not_found", None, "/")),
    ],
)
def test_classify(path: str, expected: tuple[str, str | None, str]) -> None:
    assert classify(path) == expected
