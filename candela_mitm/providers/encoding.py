"""Body encodings: request bodies decoded streaming with an output ceiling, so a compression bomb cannot exhaust memory."""

from __future__ import annotations

import io
import zlib

DECODABLE = ("", "identity", "gzip", "x-gzip", "deflate", "br", "zstd")

# Brotli (1.1, as mitmproxy 11 pins it) has no output limit per call, and one byte of input
# can carry a whole 16 MiB meta-block: it is fed this many bytes at a time, so one call makes
# at most a few meta-blocks (measured: 64 bytes of a bomb made 80 MiB in one call; 16 bytes
# stay near 32 MiB) before the running total is checked against the limit.
BROTLI_STEP = 16


class TooLarge(ValueError):
    """The decoded body would exceed the configured limit."""


def needs_work(encoding: str) -> bool:
    """Whether decoding this Content-Encoding costs work that grows with the body."""
    return encoding.strip().lower() not in ("", "identity")


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """Decode one Content-Encoding (identity, gzip, deflate, br, zstd); at most `limit` bytes out,
    never holding much more than that in memory on the way (TooLarge past it)."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        out = raw
    elif enc in ("gzip", "x-gzip", "deflate"):
        out = _zlib(raw, enc, limit)
    elif enc == "br":
        out = _brotli(raw, limit)
    elif enc == "zstd":
        out = _zstd(raw, limit)
    else:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    if len(out) > limit:
        raise TooLarge(f"decoded body exceeds {limit} bytes")
    return out


def _zlib(raw: bytes, enc: str, limit: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if enc != "deflate" else zlib.MAX_WBITS
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(raw, limit + 1)  # max_length: zlib stops producing past it
        if enc == "deflate" and not out and raw:
            raise zlib.error("empty")
        return out
    except zlib.error:
        if enc != "deflate":
            raise ValueError("invalid gzip data") from None
    d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some clients send
    try:
        return d.decompress(raw, limit + 1)
    except zlib.error:
        raise ValueError("invalid deflate data") from None


def _brotli(raw: bytes, limit: int) -> bytes:
    import brotli

    d = brotli.Decompressor()
    out = bytearray()
    view = memoryview(raw)
    try:
        for i in range(0, len(raw), BROTLI_STEP):
            out += d.process(bytes(view[i : i + BROTLI_STEP]))
            if len(out) > limit:
                raise TooLarge(f"decoded body exceeds {limit} bytes")
        if raw and not d.is_finished():
            raise ValueError("truncated brotli data")
    except brotli.error:
        raise ValueError("invalid brotli data") from None
    return bytes(out)


def _zstd(raw: bytes, limit: int) -> bytes:
    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(raw), read_across_frames=True
        ) as reader:
            out = bytearray()
            while len(out) <= limit:
                chunk = reader.read(min(limit + 1 - len(out), 1 << 20))  # bounded output
                if not chunk:
                    break
                out += chunk
            return bytes(out)
    except zstandard.ZstdError:
        raise ValueError("invalid zstd data") from None
