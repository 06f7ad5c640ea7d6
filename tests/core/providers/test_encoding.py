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


def _bombs() -> dict[str, bytes]:
    """256 MiB of zeros in every encoding (a few hundred bytes to a few hundred KiB each)."""
    import brotli
    import zstandard

    zeros = b"\0" * (256 << 20)
    return {
        "gzip": gzip.compress(zeros, compresslevel=9),
        "deflate": zlib.compress(zeros, 9),
        "br": brotli.compress(zeros, quality=5, lgwin=24),
        "zstd": zstandard.ZstdCompressor(level=3).compress(zeros),
    }


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return _bombs()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_every_encodings_bomb_stops_at_the_limit_without_inflating(encoding, bombs):
    import tracemalloc

    tracemalloc.start()  # traces the bytes the decoders hand back, and what is kept of them
    try:
        with pytest.raises(TooLarge):
            decode_body(bombs[encoding], encoding, 1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # the whole 256 MiB was never held


def test_zstd_reads_across_frames_and_stops_at_the_limit():
    import zstandard

    two = zstandard.ZstdCompressor().compress(b"a" * 600) + zstandard.ZstdCompressor().compress(
        b"b" * 600
    )
    assert decode_body(two, "zstd", 2000) == b"a" * 600 + b"b" * 600
    with pytest.raises(TooLarge):
        decode_body(two, "zstd", 1000)


def test_truncated_brotli_is_refused():
    import brotli

    with pytest.raises(ValueError, match="truncated"):
        decode_body(brotli.compress(BODY * 100)[:-4], "br", 100_000)
