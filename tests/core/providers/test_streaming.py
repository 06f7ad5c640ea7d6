"""Response processors report whether the usage came whole and what output passed."""

from __future__ import annotations

import json
from typing import Any

from candela_mitm.providers.meters import meter_for
from candela_mitm.providers.sse import encode
from candela_mitm.providers.streaming import HideOpenAIUsage, PassThrough
from candela_mitm.providers.usage import Usage


def chunk(delta: dict[str, Any] | None, usage: Any = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": None}]
    return encode(json.dumps({"object": "chat.completion.chunk", "choices": choices, "usage": usage}))


USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
TEXT = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}), chunk({"content": " you"})]


def test_hidden_usage_chunk_still_reports() -> None:
    p = HideOpenAIUsage()
    out = b"".join(p(piece)[0] for piece in TEXT)
    assert not p.reported and p.observed_output == 3  # "Hello" 2, " you" 1
    assert p(chunk(None, USAGE)) == []  # the client never asked for it
    assert p.reported and p.usage == Usage(12, 5, 0)
    assert out.count(b"data:") == 3


def test_pass_through_forwards_the_meter() -> None:
    p = PassThrough(meter_for("openai", True, "text/event-stream"))
    for piece in TEXT:
        assert p(piece) == [piece]
    assert not p.reported and p.observed_output == 3 and p.usage == Usage()
    p(chunk(None, USAGE))
    p(b"")
    assert p.reported and p.usage == Usage(12, 5, 0)
