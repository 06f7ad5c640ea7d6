"""Tests for candela_mitm.providers.translate as a whole: a tool call's round trip through both
directions."""

from __future__ import annotations

from typing import Any

from candela_mitm.providers.translate import (
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)
from tests.core.providers.translate.test_responses import anthropic_message

MODEL = "claude-sonnet-4-20250514"
USER = {"role": "user", "content": "hi"}
PNG_B64 = "iVBORw0KGgo="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def req(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [USER], **extra}


def test_tool_call_round_trip() -> None:
    """OpenAI tools out, Claude's tool_use back as tool_calls, the client's reply in again."""
    first = req(tools=[WEATHER_TOOL], tool_choice="auto")
    sent = openai_to_anthropic_request(first)
    assert sent["tools"][0]["name"] == "get_weather"
    claude = anthropic_message(
        content=[
            {
                "type": "tool_use",
                "id": "toolu_9",
                "name": "get_weather",
                "input": {"city": "Zürich", "days": [1, 2]},
            }
        ],
        stop_reason="tool_use",
    )
    answer = anthropic_to_openai_response(claude, MODEL)
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assistant = answer["choices"][0]["message"]
    follow_up = req(
        tools=[WEATHER_TOOL],
        messages=[USER, assistant, {"role": "tool", "tool_call_id": "toolu_9", "content": "12 C"}],
    )
    again = openai_to_anthropic_request(follow_up)
    assert again["messages"][1] == {"role": "assistant", "content": claude["content"]}
    assert again["messages"][2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "12 C"}],
    }
