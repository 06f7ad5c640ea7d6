import pytest

from candela_mitm.providers.models import canonical_model


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
