"""Body encodings: request bodies decoded with a ceiling, so a compression bomb cannot exhaust memory."""

from __future__ import annotations

import zlib


class TooLarge(ValueError):
    """The decoded body would exceed the configured limit."""


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """Decode one Content-Encoding (identity, gzip, deflate, br, zstd); at most `limit` bytes out."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        out = raw
    elif enc in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if enc != "deflate" else zlib.MAX_WBITS
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(raw, limit + 1)
            if enc == "deflate" and not out and raw:
                raise zlib.error("empty")
        except zlib.error:
            if enc != "deflate":
                raise ValueError("invalid gzip data") from None
            d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some clients send
            try:
                out = d.decompress(raw, limit + 1)
            except zlib.error:
                raise ValueError("invalid deflate data") from None
    elif enc == "br":
        import brotli

        try:
            out = brotli.decompress(raw)
        except brotli.error:
            raise ValueError("invalid brotli data") from None
    elif enc == "zstd":
        import zstandard

        try:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        except zstandard.ZstdError:
            raise ValueError("invalid zstd data") from None
    else:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    if len(out) > limit:
        raise TooLarge(f"decoded body exceeds {limit} bytes")
    return out
