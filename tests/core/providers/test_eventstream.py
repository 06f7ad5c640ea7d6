from __future__ import annotations

import base64
import json
import random
import struct
import uuid
import zlib
from datetime import UTC, datetime

import pytest
from botocore.eventstream import EventStreamBuffer

from candela_mitm.providers.eventstream import (
    EventMessage,
    EventStreamDecoder,
    EventStreamError,
    bedrock_chunk,
    bedrock_exception,
    encode_message,
)

CHUNK_HEADERS = {
    ":event-type": "chunk",
    ":content-type": "application/json",
    ":message-type": "event",
}

MESSAGES = [
    (CHUNK_HEADERS, b'{"bytes":"eyJ0eXBlIjoibWVzc2FnZV9zdG9wIn0="}'),
    ({}, b""),
    ({":message-type": "event"}, b""),
    ({}, b"\x00\x01\x02 binary payload \xff"),
    ({"x-unicode": "h\u00e9llo \u2603", ":event-type": "metadata"}, b"{}"),
    ({"long": "v" * 4000}, b"p" * 70_000),
]


def typed_message(headers: list[tuple[str, int, bytes]], payload: bytes) -> bytes:
    """A message with hand-packed header values of any type: the test's own encoder."""
    block = b"".join(bytes([len(n)]) + n.encode() + bytes([t]) + v for n, t, v in headers)
    total = 12 + len(block) + len(payload) + 4
    head = struct.pack(">II", total, len(block))
    msg = head + struct.pack(">I", zlib.crc32(head)) + block + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


def decode_all(data: bytes, splits: list[int]) -> list[EventMessage]:
    dec = EventStreamDecoder()
    out: list[EventMessage] = []
    prev = 0
    for cut in [*splits, len(data)]:
        out += dec.feed(data[prev:cut])
        prev = cut
    assert dec.pending == 0
    return out


@pytest.mark.parametrize(("headers", "payload"), MESSAGES)
def test_encode_then_decode_round_trips(headers: dict[str, str], payload: bytes) -> None:
    [msg] = EventStreamDecoder().feed(encode_message(headers, payload))
    assert msg.headers == headers
    assert msg.payload == payload


@pytest.mark.parametrize(("headers", "payload"), MESSAGES)
def test_encoding_matches_botocore(headers: dict[str, str], payload: bytes) -> None:
    buf = EventStreamBuffer()
    buf.add_data(encode_message(headers, payload))
    [msg] = list(buf)
    assert msg.headers == headers
    assert msg.payload == payload


def test_every_header_type_decodes() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    millis = int((when - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1000)
    raw = typed_message(
        [
            ("t", 0, b""),
            ("f", 1, b""),
            ("byte", 2, struct.pack(">b", -7)),
            ("short", 3, struct.pack(">h", -300)),
            ("int", 4, struct.pack(">i", 70_000)),
            ("long", 5, struct.pack(">q", -(2**40))),
            ("bytes", 6, struct.pack(">H", 3) + b"\x00\xff\x10"),
            ("str", 7, struct.pack(">H", 5) + b"hello"),
            ("ts", 8, struct.pack(">q", millis)),
            ("id", 9, ident.bytes),
        ],
        b"payload",
    )
    [msg] = EventStreamDecoder().feed(raw)
    assert msg.headers == {
        "t": True,
        "f": False,
        "byte": -7,
        "short": -300,
        "int": 70_000,
        "long": -(2**40),
        "bytes": b"\x00\xff\x10",
        "str": "hello",
        "ts": when,
        "id": ident,
    }
    assert msg.payload == b"payload"
    # botocore reads the same bytes the same way (it leaves timestamps and UUIDs raw)
    buf = EventStreamBuffer()
    buf.add_data(raw)
    [theirs] = list(buf)
    assert {**theirs.headers, "ts": when, "id": ident} == msg.headers


def stream_bytes() -> bytes:
    return b"".join(encode_message(h, p) for h, p in MESSAGES)


@pytest.mark.parametrize("seed", range(8))
def test_random_splits_give_the_same_messages(seed: int) -> None:
    data = stream_bytes()
    rng = random.Random(seed)
    splits = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
    got = decode_all(data, splits)
    assert [(m.headers, m.payload) for m in got] == MESSAGES


def test_byte_by_byte() -> None:
    data = b"".join(encode_message(h, p) for h, p in MESSAGES[:5])
    got = decode_all(data, list(range(1, len(data))))
    assert [(m.headers, m.payload) for m in got] == MESSAGES[:5]


def test_partial_message_is_held_back() -> None:
    data = encode_message(CHUNK_HEADERS, b"0123456789")
    dec = EventStreamDecoder()
    assert dec.feed(data[:-1]) == []
    assert dec.pending == len(data) - 1
    [msg] = dec.feed(data[-1:])
    assert msg.payload == b"0123456789"
    assert dec.pending == 0


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


CORRUPTIONS = [
    ("total length", 3, "prelude CRC"),
    ("headers length", 7, "prelude CRC"),
    ("prelude crc", 9, "prelude CRC"),
    ("header byte", 14, "message CRC"),
    ("payload byte", -6, "message CRC"),
    ("message crc", -1, "message CRC"),
]


@pytest.mark.parametrize(("what", "index", "reason"), CORRUPTIONS)
def test_corruption_raises_value_error(what: str, index: int, reason: str) -> None:
    good = encode_message({":message-type": "event"}, b"first")
    bad = _flip(encode_message(CHUNK_HEADERS, b"second payload"), index)
    dec = EventStreamDecoder()
    with pytest.raises(ValueError, match=reason) as info:
        dec.feed(good + bad)
    # what decoded before the fault is handed over; the framing is lost afterwards
    assert isinstance(info.value, EventStreamError)
    assert [m.payload for m in info.value.messages] == [b"first"]
    with pytest.raises(ValueError):
        dec.feed(good)


def test_corruption_in_a_later_feed_is_caught() -> None:
    data = _flip(encode_message(CHUNK_HEADERS, b"x" * 100), 60)
    dec = EventStreamDecoder()
    assert dec.feed(data[:50]) == []
    with pytest.raises(ValueError, match="message CRC"):
        dec.feed(data[50:])


@pytest.mark.parametrize(
    ("total", "headers_len", "reason"),
    [
        (10, 0, "out of range"),  # shorter than an empty message
        (20, 8, "out of range"),  # headers longer than the message
        (16 + 200 * 1024, 200 * 1024, "out of range"),  # headers past 128 KiB
        (16 + 25 * 1024 * 1024, 0, "out of range"),  # payload past 24 MiB
    ],
)
def test_impossible_lengths_are_refused(total: int, headers_len: int, reason: str) -> None:
    head = struct.pack(">II", total, headers_len)
    with pytest.raises(ValueError, match=reason):
        EventStreamDecoder().feed(head + struct.pack(">I", zlib.crc32(head)))


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([("x", 10, b"")], "unknown type 10"),
        ([("s", 7, struct.pack(">H", 50) + b"short")], "runs past"),
        ([("i", 4, b"\x00\x01")], "runs past"),
    ],
)
def test_bad_headers_raise(headers: list[tuple[str, int, bytes]], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        EventStreamDecoder().feed(typed_message(headers, b""))


def test_encode_refuses_oversized_headers() -> None:
    with pytest.raises(ValueError):
        encode_message({"n" * 256: "v"}, b"")
    with pytest.raises(ValueError):
        encode_message({"n": "v" * 70_000}, b"")


def test_bedrock_chunk_carries_the_event_as_base64_json() -> None:
    event = {"type": "message_delta", "usage": {"output_tokens": 9}}
    [msg] = EventStreamDecoder().feed(bedrock_chunk(event))
    assert msg.headers == CHUNK_HEADERS
    assert msg.payload.startswith(b'{"bytes":"')
    assert json.loads(base64.b64decode(json.loads(msg.payload)["bytes"])) == event


def test_bedrock_exception() -> None:
    [msg] = EventStreamDecoder().feed(bedrock_exception("throttlingException", "Too many"))
    assert msg.headers[":message-type"] == "exception"
    assert msg.headers[":exception-type"] == "throttlingException"
    assert json.loads(msg.payload) == {"message": "Too many"}
