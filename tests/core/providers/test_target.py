"""Request targets: the ones refused as ambiguous, and Google's answer-shaping parameters."""

from __future__ import annotations

import pytest

from candela_mitm.providers.target import strip_google_system_params, target_problem


@pytest.mark.parametrize(
    "target, refused",
    [
        ("/proxy/openai/v1/chat/completions", False),
        ("/proxy/google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", False),
        ("/proxy/anthropic-bedrock/model/anthropic.claude-v2%3A1/invoke", False),
        ("/proxy/openai/v1/chat/completions#/v1/files", True),
        ("/proxy/openai/v1/x/../files", True),
        ("/proxy/openai/v1/./files", True),
        ("/proxy/openai/v1/x/%2e%2e/files", True),
        ("/proxy/openai/v1/x/%2E./files", True),
        ("/proxy/openai/v1/x/.%2e/files", True),
        ("/proxy/openai/v1/chat%2fcompletions", True),
        ("/proxy/openai/v1/chat%2Fcompletions", True),
        ("/proxy/openai/v1/chat%5ccompletions", True),
        ("/proxy/openai/v1/chat\\completions", True),
        ("/proxy/openai/v1/chat/completions\x00", True),
        ("/proxy/openai/v1/chat/completions%0d%0aX: y", True),
        ("/proxy/openai/v1/models?x=%7f", True),
        ("/proxy/openai/v1/models..x", False),  # dots inside a segment are a name, not a segment
    ],
)
def test_target_problem(target, refused):
    assert (target_problem(target) is not None) is refused


@pytest.mark.parametrize(
    "query, kept",
    [
        ("", ""),
        ("alt=sse", "alt=sse"),
        ("alt=json&key=k", "alt=json&key=k"),
        ("alt=proto", ""),
        ("alt=media&x=1", "x=1"),
        ("fields=candidates&alt=sse", "alt=sse"),
        ("%24fields=candidates", ""),
        ("$fields=candidates", ""),
        ("prettyPrint=false&alt=sse", "alt=sse"),
        ("pageSize=10&pageToken=abc", "pageSize=10&pageToken=abc"),
        ("%24alt=json%3Benum-encoding%3Dint", "%24alt=json%3Benum-encoding%3Dint"),
        ("$alt=proto%3Benum-encoding%3Dint", ""),
    ],
)
def test_google_system_parameters_that_reshape_the_answer_are_stripped(query, kept):
    assert strip_google_system_params(query) == kept
