"""JSON bodies read and written in slices, so a large one shares the event loop with the rest.

`json.loads` and `json.dumps` are C calls that hold the GIL from start to end: a 10 MB object of
small members takes ~1 s each way (measured: 0.3-1 s to parse, as long to write on this 2-core
machine), during which no other request is answered, and a thread or a process pool does not
help (the GIL is held while the result is built, and unpickling a result costs as much as
parsing it). These generators do the same work a slice at a time and yield between slices: the
caller (addons/flowstate.py `sliced`) gives the event loop a turn at each yield.

`loads_sliced` hands every container that fits in WINDOW characters to the C parser whole, and
walks only the members of larger ones itself, so it builds exactly what `json.loads` builds (the
same values, the last of duplicate keys, NaN and Infinity read as floats) at a small multiple of
its cost. `dumps_sliced` writes what `json.dumps(value, ensure_ascii=False)` writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator
from json import JSONDecodeError
from typing import Any

WINDOW = 4096  # a container this short is parsed in one C call (a few microseconds)
SLICE_CHARS = 8 * 1024  # the text walked between two yields (a fraction of a millisecond)
SLICE_MEMBERS = 200  # or this many members
MAX_DEPTH = 900  # json.loads' own limit is the recursion limit (1000): RecursionError past it
ENCODE_CHUNKS = 1024  # pieces written between two yields

_DECODER = json.JSONDecoder()
# the C scanner json.loads itself uses (typeshed does not declare these two)
_scan_once: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_scanstring: Callable[[str, int, bool], tuple[str, int]] = (
    json.decoder.scanstring  # type: ignore[attr-defined]
)
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # json.decoder's


def _ws(s: str, i: int) -> int:
    m = _WHITESPACE.match(s, i)
    return m.end() if m else i


def _scalar(s: str, i: int) -> tuple[Any, int]:
    try:
        return _scan_once(s, i)
    except StopIteration as e:
        raise JSONDecodeError("Expecting value", s, e.value) from None


def _text(doc: str | bytes | bytearray) -> str:
    """The text json.loads would read: bytes decoded as it decodes them."""
    if isinstance(doc, str):
        if doc.startswith("\ufeff"):
            raise JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", doc, 0)
        return doc
    return bytes(doc).decode(json.detect_encoding(doc), "surrogatepass")


_NOT_SCALAR = re.compile(r'["{\[]')


def _scalar_run(s: str, i: int) -> int:
    """Where a run of list members without strings or containers that starts at i ends (at a
    comma or the list's closing bracket, within WINDOW characters); i if there is none."""
    window = s[i : i + WINDOW]
    other = _NOT_SCALAR.search(window)
    if other is not None:
        window = window[: other.start()]
    close = window.find("]")
    if close >= 0:
        return i + close
    comma = window.rfind(",")
    return i + comma if comma > 0 else i


def loads_sliced(doc: str | bytes | bytearray) -> Generator[None, None, Any]:
    """json.loads(doc), built a slice at a time: the same value, or JSONDecodeError (ValueError,
    UnicodeDecodeError, RecursionError) as json.loads raises for it."""
    s = _text(doc)
    n = len(s)
    stack: list[dict[str, Any] | list[Any]] = []  # the containers being filled, outermost first
    keys: list[str] = []  # the key whose value is read next, per object on the stack
    root: Any = None
    mark, members = 0, 0
    i = _ws(s, 0)
    while True:
        # a value starts at i: a container too long for one C call is opened, anything else read
        c = s[i : i + 1]
        value: Any
        opened = False
        run = _scalar_run(s, i) if stack and isinstance(stack[-1], list) else i
        bulk = run > i
        if bulk:  # numbers and literals up to a comma or the list's end: one C call
            values = json.loads("[" + s[i:run] + "]")
            stack[-1].extend(values)  # type: ignore[union-attr]
            i, members = run, members + len(values)
        elif c in ("{", "[") and n - i > WINDOW:
            try:
                value, end = _DECODER.raw_decode(s[i : i + WINDOW])
                end += i
            except JSONDecodeError:  # longer than the window (or broken: found member by member)
                value, end, opened = ({} if c == "{" else []), i + 1, True
        else:
            value, end = _scalar(s, i)
        if not bulk:  # the one value read goes where it belongs (a bulk run is in its list)
            if not stack:
                root, i = value, end
            elif isinstance(stack[-1], dict):
                stack[-1][keys[-1]], i = value, end
            else:
                stack[-1].append(value)
                i = end
        if opened:
            if len(stack) >= MAX_DEPTH:
                raise RecursionError("maximum JSON nesting depth exceeded")
            stack.append(value)
            if isinstance(value, dict):
                keys.append("")
        members += 1
        if members >= SLICE_MEMBERS or i - mark >= SLICE_CHARS:
            yield
            mark, members = i, 0
        # after a value, or just inside an opened container: find where the next value starts
        first = opened
        while True:
            if not stack:
                i = _ws(s, i)
                if i != n:
                    raise JSONDecodeError("Extra data", s, i)
                return root
            top = stack[-1]
            is_object = isinstance(top, dict)
            i = _ws(s, i)
            c = s[i : i + 1]
            if c == ("}" if is_object else "]"):
                stack.pop()
                if is_object:
                    keys.pop()
                i += 1
                first = False
                continue
            if not first:
                if c != ",":
                    raise JSONDecodeError("Expecting ',' delimiter", s, i)
                i = _ws(s, i + 1)
            if is_object:
                if s[i : i + 1] != '"':
                    raise JSONDecodeError(
                        "Expecting property name enclosed in double quotes", s, i
                    )
                keys[-1], i = _scanstring(s, i + 1, True)
                i = _ws(s, i)
                if s[i : i + 1] != ":":
                    raise JSONDecodeError("Expecting ':' delimiter", s, i)
                i = _ws(s, i + 1)
            elif not first and s[i : i + 1] == "]":
                raise JSONDecodeError("Expecting value", s, i)  # [1,]
            break


def dumps_sliced(value: Any) -> Generator[None, None, bytes]:
    """json.dumps(value, ensure_ascii=False).encode(), written a slice at a time."""
    parts: list[bytes] = []
    chunks: list[str] = []
    # iterencode without _one_shot is the pure-Python encoder: a generator of small pieces,
    # joined a slice at a time (one join of millions of pieces would hold the loop again)
    for chunk in json.JSONEncoder(ensure_ascii=False).iterencode(value):
        chunks.append(chunk)
        if len(chunks) == ENCODE_CHUNKS:
            parts.append("".join(chunks).encode())
            chunks.clear()
            yield
    parts.append("".join(chunks).encode())
    return b"".join(parts)
