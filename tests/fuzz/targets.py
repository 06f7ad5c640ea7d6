"""Coverage-guided fuzz targets (atheris) for the parsers that read what clients and providers send.

Each target takes bytes and checks the parser's contract: it answers or refuses in the ways it
documents, never with another exception. Run one (tests/fuzz/test_fuzz.py does, for a bounded
time, over the corpus kept in tests/fuzz/corpus/<target>/):

    .venv/bin/python -m tests.fuzz.targets target /tmp/new-corpus tests/fuzz/corpus/target \\
        -max_total_time=60
"""

from __future__ import annotations

import sys
from collections.abc import Callable

LIMIT = 64 * 1024
ENCODINGS = ("", "identity", "gzip", "deflate", "br", "zstd", "x-gzip", "compress")
WIRES = ("openai", "anthropic", "gemini", "ollama", "bedrock")
MEDIA = (
    "text/event-stream",
    "application/json",
    "application/x-ndjson",
    "application/vnd.amazon.eventstream",
    None,
)


def target(data: bytes) -> None:
    """providers/target.py: a request target is accepted or refused with a reason."""
    from candela_mitm.providers.target import target_problem

    text = data.decode("utf-8", "surrogateescape")
    problem = target_problem(text)
    assert problem is None or (isinstance(problem, str) and problem)
    if problem is None:  # what is accepted holds none of what the function refuses
        assert "#" not in text
        assert not any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in text)
        segments = text.split("?", 1)[0].split("/")
        assert "." not in segments and ".." not in segments


def decoding(data: bytes) -> None:
    """providers/encoding.py: a body is decoded within the limit, or refused (TooLarge,
    ValueError), whatever its bytes and Content-Encoding."""
    from candela_mitm.providers.encoding import TooLarge, decode_body

    if not data:
        return
    encoding = ENCODINGS[data[0] % len(ENCODINGS)]
    try:
        out = decode_body(data[1:], encoding, LIMIT)
    except (TooLarge, ValueError):
        return
    assert isinstance(out, bytes) and len(out) <= LIMIT


def usage(data: bytes) -> None:
    """providers/meters.py: a response body fed in pieces never makes a meter raise, and the usage
    it reads is whole non-negative counts."""
    from candela_mitm.providers.meters import meter_for

    if len(data) < 2:
        return
    wire = WIRES[data[0] % len(WIRES)]
    media = MEDIA[(data[0] // len(WIRES)) % len(MEDIA)]
    step = 1 + data[1] % 64
    meter = meter_for(wire, stream=bool(data[1] & 0x80), content_type=media)
    body = data[2:]
    for i in range(0, len(body), step):
        meter.feed(body[i : i + step])
    meter.finish()
    u = meter.usage
    for n in (u.input_tokens, u.output_tokens, u.cached_tokens):
        assert isinstance(n, int) and n >= 0, u


TARGETS: dict[str, Callable[[bytes], None]] = {"target": target, "decoding": decoding, "usage": usage}


def main() -> None:
    import atheris

    name = sys.argv.pop(1)
    with atheris.instrument_imports():
        import candela_mitm.providers.encoding  # noqa: F401
        import candela_mitm.providers.meters  # noqa: F401
        import candela_mitm.providers.target  # noqa: F401
        import candela_mitm.providers.usage  # noqa: F401
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
