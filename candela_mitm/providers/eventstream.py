"""AWS event stream: the binary framing of Bedrock's streamed responses, decoded incrementally."""

from __future__ import annotations

import base64
import json
import struct
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

CONTENT_TYPE = "application/vnd.amazon.eventstream"

# A message: prelude (total length, headers length, prelude CRC), headers, payload, message CRC.
_PRELUDE = struct.Struct(">III")
_PRELUDE_LEN = _PRELUDE.size
_CRC_LEN = 4
_MIN_MESSAGE = _PRELUDE_LEN + _CRC_LEN
# botocore's bounds: a peer announcing more is broken, and we must not buffer for it
MAX_HEADERS = 128 * 1024
MAX_PAYLOAD = 24 * 1024 * 1024

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STRING = 7


@dataclass(frozen=True)
class EventMessage:
    headers: dict[str, object]  # str, bytes, bool, int, datetime (type 8) or uuid.UUID (type 9)
    payload: bytes


class EventStreamError(ValueError):
    """A corrupt event stream; `messages` are those decoded before the fault in the same feed."""

    def __init__(self, message: str, messages: list[EventMessage] | None = None) -> None:
        super().__init__(message)
        self.messages = messages or []


class EventStreamDecoder:
    """Feed bytes as they arrive; get whole, CRC-checked messages back.

    After a fault the framing is lost: every later feed raises EventStreamError too.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._failed: str | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back (non-zero at the end: a cut stream)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[EventMessage]:
        if self._failed is not None:
            raise EventStreamError(self._failed)
        self._buf += data
        out: list[EventMessage] = []
        pos = 0
        try:
            while len(self._buf) - pos >= _PRELUDE_LEN:
                prelude = bytes(self._buf[pos : pos + _PRELUDE_LEN])
                total, headers_len, prelude_crc = _PRELUDE.unpack(prelude)
                if zlib.crc32(prelude[:8]) != prelude_crc:
                    raise ValueError("event stream prelude CRC mismatch")
                payload_len = total - headers_len - _MIN_MESSAGE
                if payload_len < 0 or headers_len > MAX_HEADERS or payload_len > MAX_PAYLOAD:
                    raise ValueError(
                        f"event stream message lengths out of range "
                        f"(total {total}, headers {headers_len})"
                    )
                if len(self._buf) - pos < total:
                    break
                message = bytes(self._buf[pos : pos + total])
                pos += total
                (message_crc,) = struct.unpack_from(">I", message, total - _CRC_LEN)
                if zlib.crc32(message[:-_CRC_LEN]) != message_crc:
                    raise ValueError("event stream message CRC mismatch")
                body = message[_PRELUDE_LEN:-_CRC_LEN]
                out.append(EventMessage(_decode_headers(body[:headers_len]), body[headers_len:]))
        except ValueError as e:
            self._failed = str(e)
            self._buf.clear()
            raise EventStreamError(str(e), out) from e
        del self._buf[:pos]
        return out


def _decode_headers(data: bytes) -> dict[str, object]:
    headers: dict[str, object] = {}
    i, n = 0, len(data)

    def take(size: int) -> bytes:
        nonlocal i
        if i + size > n:
            raise ValueError("event stream header runs past its block")
        chunk = data[i : i + size]
        i += size
        return chunk

    while i < n:
        name = take(take(1)[0]).decode("utf-8")
        kind = take(1)[0]
        value: object
        if kind == 0:
            value = True
        elif kind == 1:
            value = False
        elif kind == 2:
            value = struct.unpack(">b", take(1))[0]
        elif kind == 3:
            value = struct.unpack(">h", take(2))[0]
        elif kind == 4:
            value = struct.unpack(">i", take(4))[0]
        elif kind == 5:
            value = struct.unpack(">q", take(8))[0]
        elif kind in (6, _STRING):
            raw = take(struct.unpack(">H", take(2))[0])
            value = raw.decode("utf-8") if kind == _STRING else raw
        elif kind == 8:
            value = _EPOCH + timedelta(milliseconds=struct.unpack(">q", take(8))[0])
        elif kind == 9:
            value = uuid.UUID(bytes=take(16))
        else:
            raise ValueError(f"event stream header {name!r} has unknown type {kind}")
        headers[name] = value
    return headers


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One message with string headers (type 7), as an AWS service sends it."""
    block = bytearray()
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        if len(n) > 255 or len(v) > 0xFFFF:
            raise ValueError(f"event stream header {name!r} is too long")
        block += bytes([len(n)]) + n + bytes([_STRING]) + struct.pack(">H", len(v)) + v
    total = _MIN_MESSAGE + len(block) + len(payload)
    head = struct.pack(">II", total, len(block))
    message = head + struct.pack(">I", zlib.crc32(head)) + bytes(block) + payload
    return message + struct.pack(">I", zlib.crc32(message))


def bedrock_chunk(event: Mapping[str, object]) -> bytes:
    """An invoke-with-response-stream `chunk` message carrying one model event (base64 JSON)."""
    inner = base64.b64encode(json.dumps(event).encode()).decode()
    return encode_message(
        {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
        json.dumps({"bytes": inner}, separators=(",", ":")).encode(),
    )


def bedrock_exception(exception_type: str, message: str) -> bytes:
    """A modelled exception message, as Bedrock ends a failed stream."""
    return encode_message(
        {
            ":exception-type": exception_type,
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        json.dumps({"message": message}).encode(),
    )
