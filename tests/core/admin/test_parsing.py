"""admin/parsing.py: each helper returns the value it read or raises Refused naming the input."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from candela_mitm.admin.parsing import (
    day_range,
    int_field,
    int_param,
    invalid,
    key_models,
    limit_field,
    moment_param,
    no_unknown_fields,
    parse_object,
    parse_rfc3339,
    parse_user_id,
    period_field,
    tenants_field,
    usd_field,
)
from candela_mitm.errors import Refused


def refusal(fn: Any, *args: Any) -> tuple[int, str, Any]:
    with pytest.raises(Refused) as e:
        fn(*args)
    d = e.value.denial
    return d.status, d.error, d.payload().get("field")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "bad_request"),
        (b"  \n", "bad_request"),
        (b"[1]", "bad_request"),
        (b'"text"', "bad_request"),
        (b"{", "invalid_json"),
        (b'{"a": NaN}', "invalid_json"),
        (b'{"a": Infinity}', "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"a": "\\ud800"}', "invalid_json"),
        (b"[" * 20_000 + b"]" * 20_000, "invalid_json"),
    ],
)
def test_parse_object_refuses(body: bytes, error: str) -> None:
    assert refusal(parse_object, body)[:2] == (400, error)


def test_parse_object_returns_the_object() -> None:
    assert parse_object(b' {"a": 1, "b": [true, null]} ') == {"a": 1, "b": [True, None]}


def test_no_unknown_fields_names_the_first_unknown() -> None:
    no_unknown_fields({"a": 1}, ("a", "b"))
    assert refusal(no_unknown_fields, {"a": 1, "zz": 2}, ("a", "b")) == (400, "invalid_parameter", "zz")


@pytest.mark.parametrize(
    ("value", "positive", "ok"),
    [
        (0, False, 0.0),
        (2, True, 2.0),
        (1e-9, True, 1e-9),
        (1e9, False, 1e9),
        (9e-10, True, None),
        (0, True, None),
        (-1, False, None),
        (1e9 + 1, False, None),
        (1e308, False, None),
        (float("nan"), False, None),
        (float("inf"), False, None),
        (True, False, None),
        ("1", False, None),
        (None, False, None),
    ],
)
def test_usd_field(value: Any, positive: bool, ok: float | None) -> None:
    body = {"amount_usd": value}
    if ok is None:
        assert refusal(usd_field, body, "amount_usd", positive) == (400, "invalid_parameter", "amount_usd")
    else:
        assert usd_field(body, "amount_usd", positive) == ok


@pytest.mark.parametrize(
    ("value", "ok"), [(0, 0), (60, 60), (60.0, 60), (100, 100), (101, None), (-1, None), (1.5, None), ("5", None), (True, None), (None, None)]
)
def test_int_field(value: Any, ok: int | None) -> None:
    if ok is None:
        assert refusal(int_field, {"n": value}, "n", 100)[2] == "n"
    else:
        assert int_field({"n": value}, "n", 100) == ok


@pytest.mark.parametrize(("value", "ok"), [(None, None), (0, 0), (7.0, 7), (10**9, 10**9)])
def test_limit_field_accepts(value: Any, ok: int | None) -> None:
    assert limit_field({"l": value}, "l") == ok


@pytest.mark.parametrize("value", [-1, 10**9 + 1, "3", 2.5, False])
def test_limit_field_refuses(value: Any) -> None:
    assert refusal(limit_field, {"l": value}, "l")[2] == "l"


def test_period_field() -> None:
    assert period_field({"p": "weekly"}, "p") == "weekly"
    assert refusal(period_field, {"p": "hourly"}, "p") == (400, "invalid_parameter", "p")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ([], ()),
        (["a", "b c"], ("a", "b c")),
        ("a", None),
        (["a", "a"], None),
        ([" a"], None),
        (["a\n"], None),
        ([""], None),
        ([1], None),
        (["t"] * 257, None),
    ],
)
def test_tenants_field(value: Any, ok: tuple[str, ...] | None) -> None:
    if ok is None:
        assert refusal(tenants_field, value)[2] == "tenants"
    else:
        assert tenants_field(value) == ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (None, ()),
        (["gpt-4o", "claude-*"], ("gpt-4o", "claude-*")),
        ([], None),
        ("gpt-4o", None),
        ([""], None),
        (["a\tb"], None),
        (["m" * 257], None),
        ([f"m{i}" for i in range(65)], None),
    ],
)
def test_key_models(value: Any, ok: tuple[str, ...] | None) -> None:
    if ok is None:
        assert refusal(key_models, value)[2] == "models"
    else:
        assert key_models(value) == ok


def test_parse_rfc3339_takes_only_a_time() -> None:
    assert parse_rfc3339("2026-05-01T10:00:00Z") == datetime(2026, 5, 1, 10, tzinfo=UTC)
    assert parse_rfc3339("2026-05-01") is None  # a date is not a time
    assert parse_rfc3339(20260501) is None
    assert parse_rfc3339("soon") is None


@pytest.mark.parametrize(
    ("value", "ok"),
    [("alice@example.com", True), ("a b", True), (" a", False), ("a\x7f", False), ("", False), ("x" * 321, False), (7, False)],
)
def test_parse_user_id(value: Any, ok: bool) -> None:
    if ok:
        assert parse_user_id(value) == value
    else:
        status, error, field = refusal(parse_user_id, value, "owner")
        assert (status, error, field) == (400, "invalid_parameter", "owner")


def test_parse_user_id_as_a_body_field() -> None:
    with pytest.raises(Refused) as e:
        parse_user_id(" x", "user_id", invalid)
    assert "parameter" not in e.value.denial.payload()  # a body field, not a query parameter
    assert e.value.denial.payload()["field"] == "user_id"


def test_moment_param() -> None:
    assert moment_param({}, "since") is None
    assert moment_param({"since": "2026-05-01"}, "since") == date(2026, 5, 1)
    assert moment_param({"since": "2026-05-01T00:00:00+02:00"}, "since") == datetime.fromisoformat(
        "2026-05-01T00:00:00+02:00"
    )
    assert refusal(moment_param, {"since": "yesterday"}, "since")[2] == "since"


def test_day_range_is_in_utc_days_and_ordered() -> None:
    assert day_range(None, None) == (None, None)
    # 01:00 at +02:00 is the day before in UTC
    since = datetime.fromisoformat("2026-05-02T01:00:00+02:00")
    assert day_range(since, date(2026, 5, 3)) == ("2026-05-01", "2026-05-03")
    assert day_range(date(2026, 5, 1), date(2026, 5, 1)) == ("2026-05-01", "2026-05-01")
    assert refusal(day_range, date(2026, 5, 2), date(2026, 5, 1))[2] == "until"


@pytest.mark.parametrize(
    ("text", "ok"), [("1", 1), ("10", 10), ("0", None), ("11", None), ("-1", None), ("1.0", None), ("ten", None), ("9" * 20, None)]
)
def test_int_param(text: str, ok: int | None) -> None:
    assert int_param({}, "limit", 1, 10) is None
    if ok is None:
        assert refusal(int_param, {"limit": text}, "limit", 1, 10)[2] == "limit"
    else:
        assert int_param({"limit": text}, "limit", 1, 10) == ok
