import pytest

from candela_mitm.providers.models import canonical_model, is_streaming_method, model_from_path


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("GPT-4o-Mini", "gpt-4o-mini"),
        ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("anthropic.claude-sonnet-4-20250514-v1:0", "claude-sonnet-4-20250514"),
        ("us.anthropic.claude-sonnet-4-20250514-v1:0", "claude-sonnet-4-20250514"),
        ("anthropic.claude-sonnet-4-20250514-v1%3A0", "claude-sonnet-4-20250514"),
        ("claude-sonnet-4@20250514", "claude-sonnet-4-20250514"),
        ("publishers/anthropic/models/claude-sonnet-4@20250514", "claude-sonnet-4-20250514"),
        ("  o1-pro ", "o1-pro"),
        ("llama3.2:3b", "llama3.2:3b"),
    ],
)
def test_canonical_model(raw, canonical):
    assert canonical_model(raw) == canonical


@pytest.mark.parametrize(
    "path, expected",
    [
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            ("gemini-2.5-flash", "generateContent"),
        ),
        (
            "/v1/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            ("gemini-2.5-pro", "streamGenerateContent"),
        ),
        (
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict",
            ("claude-sonnet-4@20250514", "rawPredict"),
        ),
        (
            "/model/anthropic.claude-sonnet-4-20250514-v1%3A0/invoke",
            ("anthropic.claude-sonnet-4-20250514-v1:0", "invoke"),
        ),
        (
            "/model/anthropic.claude-sonnet-4-20250514-v1:0/invoke-with-response-stream",
            ("anthropic.claude-sonnet-4-20250514-v1:0", "invoke-with-response-stream"),
        ),
        ("/v1/chat/completions", None),
        ("/v1beta/models", None),
    ],
)
def test_model_from_path(path, expected):
    assert model_from_path(path) == expected


def test_streaming_methods():
    assert is_streaming_method("streamGenerateContent")
    assert is_streaming_method("invoke-with-response-stream")
    assert not is_streaming_method("generateContent")
