import random

import pytest

from candela_mitm.providers.sse import SseParser, encode

STREAM = (
    b'event: message_start\ndata: {"a": 1}\n\n'
    b": a comment\n\n"
    b"data: line one\ndata: line two\n\n"
    b"event: ping\r\ndata: {}\r\n\r\n"
    b"data: [DONE]\n\n"
)


def parse_all(chunks):
    p = SseParser()
    out = []
    for c in chunks:
        out.extend(p.feed(c))
    out.extend(p.flush())
    return out


@pytest.mark.parametrize("split", ["whole", "bytes", "random"])
def test_same_events_however_split(split):
    if split == "whole":
        chunks = [STREAM]
    elif split == "bytes":
        chunks = [STREAM[i : i + 1] for i in range(len(STREAM))]
    else:
        rnd = random.Random(7)
        chunks, i = [], 0
        while i < len(STREAM):
            n = rnd.randint(1, 9)
            chunks.append(STREAM[i : i + n])
            i += n
    evs = [e for e in parse_all(chunks) if e.data or e.event]
    assert [(e.event, e.data) for e in evs] == [
        ("message_start", '{"a": 1}'),
        ("", "line one\nline two"),
        ("ping", "{}"),
        ("", "[DONE]"),
    ]
    assert b"".join(e.raw for e in parse_all(chunks)) == STREAM


def test_unterminated_last_event_is_flushed():
    p = SseParser()
    assert p.feed(b"data: x") == []
    [ev] = p.flush()
    assert ev.data == "x"


def test_encode_round_trip():
    raw = encode("a\nb", event="e")
    [ev] = SseParser().feed(raw)
    assert (ev.event, ev.data) == ("e", "a\nb")


def test_buffer_is_bounded():
    p = SseParser(max_buffer=100)
    assert p.feed(b"data: " + b"x" * 200) == []
    assert p.flush() == []


@pytest.mark.parametrize(
    "chunk",
    [
        b'data: {"choices":[{"delta":{"content":"tok "}}]}\n\n',
        b"data:no space\n\n",
        b"data:  two spaces\n\n",
        b"data: [DONE]\n\n",
        b"data:\n\n",
        b"event: ping\n\n",
        b"event:\n\n",
        b": a comment\n\n",
        b"id: 7\n\n",
        b"retry\n\n",
        b"\n\n",
        "data: caf\u00e9 \u2603\n\n".encode(),
        b"data: \xff\xfe broken utf-8\n\n",
        b"data: a: b: c\n\n",
    ],
)
def test_a_chunk_of_one_whole_line_is_the_event_the_general_parser_reads(chunk):
    """The one-line chunk's fast path gives what the buffer's parse gives: the same chunk fed
    after a byte already buffered (so the general path parses it) is the same event."""
    [fast] = SseParser().feed(chunk)
    general = SseParser()
    assert general.feed(chunk[:1]) == []
    [slow] = general.feed(chunk[1:])
    assert fast == slow
    assert type(fast.raw) is bytes and fast.raw == chunk


def test_one_line_chunks_between_split_events_keep_the_order():
    """A fast-path chunk is taken only with nothing buffered: after half an event, the next
    chunk (one whole line) completes that event instead."""
    p = SseParser()
    assert p.feed(b"data: first") == []
    [ev] = p.feed(b" half\n\n")
    assert ev.data == "first half"
    [ev] = p.feed(bytearray(b"data: next\n\n"))
    assert (ev.data, ev.raw) == ("next", b"data: next\n\n")
