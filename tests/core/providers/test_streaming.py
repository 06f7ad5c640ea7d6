"""Response processors report whether the usage came whole and what output passed."""

from __future__ import annotations

import json
from typing import Any

from candela_mitm.providers.meters import meter_for
from candela_mitm.providers.sse import encode
from candela_mitm.providers.streaming import HideOpenAIUsage, PassThrough, ResponseProcessor
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


class Parsed(HideOpenAIUsage):
    """HideOpenAIUsage without its one-line fast path: every chunk through the parser."""

    __call__ = ResponseProcessor.__call__


def delta(content: str, ascii: bool = False, **more: Any) -> bytes:  # as OpenAI: compact, UTF-8
    obj = {"object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
           **more}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii)
    return b"data: " + text.encode() + b"\n\n"


STREAMS = {
    "deltas": [delta("Hello"), delta(" there, "), delta('say \\"hi\\"'), delta("")],
    "non-ascii": [delta("héllo wörld"), delta("日本語のテキスト"), delta("ok")],
    "escaped": [delta("héllo", ascii=True), delta("日本", ascii=True)],
    "usage at the end": [*TEXT, delta("more"), chunk(None, USAGE), b"data: [DONE]\n\n"],
    "split events": [delta("one")[:20], delta("one")[20:], delta("two"), delta("three")[:-1],
                     b"\n", delta("four")],
    "two events a chunk": [delta("a") + delta("bb"), delta("ccc")],
    "crlf": [delta("a").replace(b"\n", b"\r\n"), delta("bbbb")],
    "named event": [b"event: message\n" + delta("x"), delta("yy")],
    "responses": [b'data: {"type":"response.output_text.delta","delta":"abcdefgh"}\n\n',
                  b'data: {"type":"response.output_text.done","text":"abcdefgh"}\n\n'],
    "usage null on every chunk": [chunk({"content": "abcd"}), chunk({"content": "efgh"})],
    # OpenAI's own shape once usage is asked for: `"usage":null` on each chunk, then the usage
    "usage null, compact": [delta("abcd", usage=None), delta("efgh", usage=None),
                            b'data: {"choices":[],"usage":{"prompt_tokens":3,'
                            b'"completion_tokens":2,"total_tokens":5}}\n\n',
                            b"data: [DONE]\n\n"],
    "usage beside a delta": [delta("abcd", usage=USAGE), delta("efgh")],
}


def test_the_one_line_fast_path_forwards_and_counts_what_the_parser_does() -> None:
    """A delta (one whole `data:` line, ASCII, no usage, nothing buffered) passes without the
    parser: the bytes, the usage and the output counted are the parser's, stream by stream."""
    for name, pieces in STREAMS.items():
        fast, slow = HideOpenAIUsage(), Parsed()
        got = [fast(p) for p in [*pieces, b""]]
        want = [slow(p) for p in [*pieces, b""]]
        assert got == want, name
        assert (fast.usage, fast.reported, fast.observed_output) == (
            slow.usage, slow.reported, slow.observed_output), name
    assert HideOpenAIUsage()(delta("Hello"))[0] is not None


def test_a_delta_goes_around_the_parser() -> None:
    p = HideOpenAIUsage()
    calls = []
    real = p._parser.feed
    p._parser.feed = lambda data: calls.append(data) or real(data)  # type: ignore[method-assign]
    one = delta("Hello")
    assert p(one) == [one] and calls == [] and p.observed_output == 2
    assert p(delta("héllo")) and len(calls) == 1  # not ASCII: parsed
    p(one[:10])
    p(one[10:])  # buffered before it: parsed
    assert len(calls) == 3
    p(chunk(None, USAGE))
    assert len(calls) == 4 and p.reported
    assert p(delta("x", usage=None)) and len(calls) == 4  # `"usage":null`: no usage in it


def test_pass_through_forwards_the_meter() -> None:
    p = PassThrough(meter_for("openai", True, "text/event-stream"))
    for piece in TEXT:
        assert p(piece) == [piece]
    assert not p.reported and p.observed_output == 3 and p.usage == Usage()
    p(chunk(None, USAGE))
    p(b"")
    assert p.reported and p.usage == Usage(12, 5, 0)
