"""JSON bodies in slices: the same values and the same refusals as json.loads and json.dumps."""

from __future__ import annotations

import json
import math
from collections.abc import Generator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from candela_mitm.providers import jsonbody
from candela_mitm.providers.jsonbody import dumps_sliced, loads_sliced


def run(gen: Generator[None, None, Any]) -> tuple[Any, int]:
    """The generator's result and how many times it yielded."""
    yields = 0
    try:
        while True:
            next(gen)
            yields += 1
    except StopIteration as done:
        return done.value, yields


def same(a: Any, b: Any) -> bool:
    """Equal, NaN included, with the same key order."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@pytest.fixture(params=[jsonbody.WINDOW, 1, 7])
def window(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The real window, and windows so small that every container is walked member by member."""
    monkeypatch.setattr(jsonbody, "WINDOW", request.param)
    return int(request.param)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(max_size=3), children),
    max_leaves=40,
)
SPACES = st.sampled_from(["", " ", "\n\t ", "\r\n"])


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=JSON, indent=st.sampled_from([None, 0, 2]), pad=SPACES)
def test_values_are_read_as_json_loads_reads_them(window, value, indent, pad):
    text = pad + json.dumps(value, indent=indent, ensure_ascii=False) + pad
    got, _ = run(loads_sliced(text.encode()))
    assert same(got, json.loads(text.encode()))


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "a": 2, "b": {"a": [], "a": {}}}',  # the last duplicate wins, order kept
        '{"x": [NaN, Infinity, -Infinity, 1e400, -0.0, 1E2]}',
        '{"s": "\\ud83d\\ude00 \\ud800 \\u0000"}',
        '[[[], {}], [[{}]], {"": [[]]}]',
        "  0  ",
        '{"n": [1, 2 , 3.5e3, true, null, NaN, "a", [4, 5], {"b": [6]}, 7 ]}',
        '{"n": [' + ", ".join(["0"] * 3000) + "]}",
    ],
)
def test_edges_are_read_as_json_loads_reads_them(window, text):
    got, _ = run(loads_sliced(text))
    assert same(got, json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        "", " ", "{", "[", "{]", "[}", "[1,]", '{"a":1,}', "[1,,2]", "[1, 2}", '{"n": [1, 2,]}',
        "[tru, 1]", "[1, 2", "[1, 2, {]", '{"a" 1}', '{a: 1}', "[1 2]",
        '{"a": 1} x', "[1]]", '{"a": tru}', '{"a": "\n"}', "[01]", "\ufeff{}", '{"a": 1}}',
        '{"a": [1, 2, {"b": [3,, 4]}]}', "[" + "1" * 5000 + "]",  # past Python's int digits
    ],
)
def test_broken_text_is_refused_as_json_loads_refuses_it(window, text):
    with pytest.raises(ValueError) as expected:
        json.loads(text)
    with pytest.raises(type(expected.value)):
        run(loads_sliced(text))


def test_bytes_in_utf_16_and_invalid_utf_8_are_treated_as_json_loads_treats_them(window):
    doc = '{"a": ["é", 1]}'
    assert run(loads_sliced(doc.encode("utf-16")))[0] == json.loads(doc.encode("utf-16"))
    assert run(loads_sliced(b"\xef\xbb\xbf" + doc.encode()))[0] == {"a": ["é", 1]}
    with pytest.raises(UnicodeDecodeError):
        run(loads_sliced(b'{"a": "\xff"}'))


def test_nesting_past_the_limit_is_a_recursion_error(window):
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    with pytest.raises(RecursionError):
        json.loads(deep)
    with pytest.raises(RecursionError):
        run(loads_sliced(deep))


def test_a_large_object_is_read_in_many_slices():
    doc = json.dumps({"model": "m", "metadata": {f"k{i:06d}": i for i in range(200_000)}})
    got, yields = run(loads_sliced(doc))
    assert got == json.loads(doc)
    # about one slice per SLICE_MEMBERS members: never one long C call over the whole body
    assert yields >= 200_000 // jsonbody.SLICE_MEMBERS


def test_a_large_list_of_small_objects_is_read_in_many_slices():
    parts = [{"type": "text", "text": "a"}] * 50_000
    doc = json.dumps({"messages": [{"role": "user", "content": parts}]})
    got, yields = run(loads_sliced(doc))
    assert got == json.loads(doc) and yields >= 50_000 // jsonbody.SLICE_MEMBERS


def test_a_large_list_of_numbers_is_read_in_c_runs_and_slices():
    doc = json.dumps({"x": [0, 1.5, True, None] * 250_000})
    got, yields = run(loads_sliced(doc))
    assert got == json.loads(doc) and yields >= 10


@settings(max_examples=100, deadline=None)
@given(value=JSON)
def test_writes_what_json_dumps_writes(value):
    assert run(dumps_sliced(value))[0] == json.dumps(value, ensure_ascii=False).encode()


def test_a_large_value_is_written_in_many_slices():
    value = {"metadata": {f"k{i}": i for i in range(100_000)}}
    out, yields = run(dumps_sliced(value))
    assert out == json.dumps(value, ensure_ascii=False).encode() and yields > 10


def test_a_lone_surrogate_cannot_be_written():
    with pytest.raises(UnicodeEncodeError):
        run(dumps_sliced({"a": "\ud800"}))
