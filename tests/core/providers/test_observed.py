"""providers/observed.py: output tokens counted from a stream's incremental events."""

from __future__ import annotations

import json

import pytest

from candela_mitm.providers.observed import OutputCounter
from tests.core.providers.test_meters import GEMINI_CHUNKS, openai_chunk


@pytest.mark.parametrize(
    ("wire", "text", "event", "tokens"),
    [
        # OpenAI chat: each content delta, at least one token; the role chunk has no text
        ("openai", json.dumps(openai_chunk({"role": "assistant", "content": ""})), "", 0),
        ("openai", json.dumps(openai_chunk({"content": "Hello"})), "", 2),
        ("openai", json.dumps(openai_chunk({"content": "a"})), "", 1),
        (
            "openai",
            json.dumps(
                openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]})
            ),
            "",
            3,
        ),
        ("openai", json.dumps(openai_chunk(None, {"prompt_tokens": 1})), "", 0),
        # Responses: deltas count, the events that repeat the whole text do not
        ("openai", '{"type":"response.output_text.delta","delta":"In a grove"}', "", 3),
        ("openai", '{"type":"response.output_text.done","text":"In a grove"}', "", 0),
        ("openai", '{"type":"response.completed","response":{"output":[{"text":"x"}]}}', "", 0),
        # Anthropic and Bedrock: content_block_delta only (text, tool input, thinking)
        (
            "anthropic",
            '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi!"}}',
            "content_block_delta",
            1,
        ),
        (
            "anthropic",
            '{"type":"content_block_delta","delta":{"type":"input_json_delta","partial_json":"{\\"a\\": 1}"}}',
            "",
            3,
        ),
        ("anthropic", '{"type":"message_start","message":{"content":[{"text":"x"}]}}', "", 0),
        ("bedrock", '{"contentBlockIndex":0,"delta":{"text":"Hello world"}}', "contentBlockDelta", 3),
        ("bedrock", '{"usage":{"inputTokens":3}}', "metadata", 0),
        # Gemini and Ollama: every chunk is a delta
        ("gemini", json.dumps(GEMINI_CHUNKS[1]), "", 2),
        ("ollama", '{"message":{"role":"assistant","content":"The sky"},"done":false}', "", 2),
        ("ollama", '{"response":"","done":true,"eval_count":3}', "", 0),
        # escapes count as written: never fewer tokens than characters / 4
        ("openai", json.dumps(openai_chunk({"content": 'say "hi"\n'})), "", 3),
    ],
)
def test_output_counter(wire: str, text: str, event: str, tokens: int) -> None:
    counter = OutputCounter(wire)
    counter.see(text, event)
    assert counter.tokens == tokens
