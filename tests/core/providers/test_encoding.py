import gzip
import zlib

import pytest

from candela_mitm.providers.encoding import TooLarge, decode_body

BODY = b'{"model": "gpt-4o-mini", "messages": []}'


@pytest.mark.parametrize(
    "encoding, raw",
    [
        ("", BODY),
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        ("GZIP", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", zlib.compress(BODY)[2:-4]),  # raw deflate
    ],
)
def test_decodes(encoding, raw):
    assert decode_body(raw, encoding, 1000) == BODY


def test_brotli_and_zstd():
    import brotli
    import zstandard

    assert decode_body(brotli.compress(BODY), "br", 1000) == BODY
    assert decode_body(zstandard.ZstdCompressor().compress(BODY), "zstd", 1000) == BODY


def test_gzip_bomb_stops_at_limit():
    bomb = gzip.compress(b"0" * 50_000_000)
    with pytest.raises(TooLarge):
        decode_body(bomb, "gzip", 1_000_000)


@pytest.mark.parametrize(
    "encoding, raw", [("gzip", b"not gzip"), ("br", b"nope"), ("zstd", b"x"), ("compress", b"x")]
)
def test_bad_data_is_value_error(encoding, raw):
    with pytest.raises(ValueError):
        decode_body(raw, encoding, 1000)


def test_identity_over_limit():
    with pytest.raises(TooLarge):
        decode_body(b"x" * 11, "", 10)
