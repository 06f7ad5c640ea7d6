"""admin/routes.py: matching a path to the route table, the path and query parameters' checks."""

from __future__ import annotations

import pytest

from candela_mitm.admin.routes import (
    PREFIX,
    ROUTES,
    AdminResponse,
    check_path_params,
    check_query_ids,
    find_routes,
    match_route,
    parse_query,
)
from candela_mitm.errors import Denial, Refused


def handlers(path: str) -> tuple[set[tuple[str, str]], dict[str, str]]:
    routes, params = find_routes(path)
    return {(r.method, r.handler) for r in routes}, params


@pytest.mark.parametrize(
    ("path", "found", "params"),
    [
        ("/admin/v1/me", {("GET", "me")}, {}),
        ("/admin/v1/me/", {("GET", "me")}, {}),  # a trailing slash is the same path
        ("/admin/v1/me?verbose=1", {("GET", "me")}, {}),  # the query is not the path
        (
            "/admin/v1/users/alice%40example.com",
            {("PUT", "put_user"), ("DELETE", "delete_user")},
            {"user": "alice@example.com"},
        ),
        # segments split before decoding: an encoded '/' stays inside the user id
        ("/admin/v1/users/a%2Fb/grants", {("POST", "create_grant"), ("GET", "list_grants")}, {"user": "a/b"}),
        ("/admin/v1/keys/k_0123456789abcdef/rotate", {("POST", "rotate_key")}, {"key": "k_0123456789abcdef"}),
        ("/admin/v1/users//grants", set(), {}),  # an empty parameter matches nothing
        ("/admin/v1/nothing", set(), {}),
        ("/admin/v2/me", set(), {}),
        ("/admin/v1me", set(), {}),
        ("/other", set(), {}),
    ],
)
def test_find_routes(path: str, found: set[tuple[str, str]], params: dict[str, str]) -> None:
    assert handlers(path) == (found, params)


def test_a_path_that_is_not_utf8_is_refused_by_find_and_denied_by_match() -> None:
    with pytest.raises(Refused) as e:
        find_routes("/admin/v1/users/%ff")
    assert (e.value.denial.status, e.value.denial.error) == (400, "bad_request")
    denial = match_route("/admin/v1/users/%ff")
    assert isinstance(denial, Denial) and denial.error == "bad_request"


def test_every_route_is_under_the_prefix_and_unique() -> None:
    assert all(r.template.startswith(PREFIX + "/") for r in ROUTES)
    assert len({(r.method, r.template) for r in ROUTES}) == len(ROUTES)
    for r in ROUTES:  # each template finds itself, with its parameters named
        concrete = r.template.replace("{", "x").replace("}", "")
        routes, params = find_routes(concrete)
        assert r in routes
        assert set(params) == {s[1:-1] for s in r.segments if s.startswith("{")}


@pytest.mark.parametrize(
    ("params", "bad"),
    [
        ({"user": "alice@example.com", "tenant": "t", "key": "k_0123456789abcdef"}, None),
        ({"user": " a"}, "user"),
        ({"tenant": "t" * 129}, "tenant"),
        ({"tenant": "a\nb"}, "tenant"),
        ({"key": "k_0123456789ABCDEF"}, "key"),  # as minted: lower-case hex
        ({"key": "k_missing"}, "key"),
    ],
)
def test_check_path_params(params: dict[str, str], bad: str | None) -> None:
    if bad is None:
        check_path_params(params)
        return
    with pytest.raises(Refused) as e:
        check_path_params(params)
    d = e.value.denial
    assert (d.status, d.error, d.payload()["parameter"]) == (400, "invalid_parameter", bad)
    assert d.message.startswith(f"Path parameter '{bad}'")


@pytest.mark.parametrize(
    ("query", "bad"),
    [
        ({"user": "a@b", "tenant": "t", "action": "llm_request", "since": "whatever"}, None),
        ({"user": "x" * 321}, "user"),
        ({"tenant": " t"}, "tenant"),
        ({"action": "LLM"}, "action"),
        ({"action": "a" * 65}, "action"),
    ],
)
def test_check_query_ids(query: dict[str, str], bad: str | None) -> None:
    if bad is None:
        check_query_ids(query)
        return
    with pytest.raises(Refused) as e:
        check_query_ids(query)
    assert e.value.denial.payload()["parameter"] == bad
    assert e.value.denial.message.startswith(f"Query parameter '{bad}'")


ACCEPTED = frozenset({"since", "user"})


@pytest.mark.parametrize(
    ("query", "out"),
    [
        ("", {}),
        ("since=2026-05-01", {"since": "2026-05-01"}),
        ("since=&user=a%40b", {"user": "a@b"}),  # an empty value is absent
        ("key=secret&since=x", {"since": "x"}),  # the caller's key may ride in the query
    ],
)
def test_parse_query(query: str, out: dict[str, str]) -> None:
    assert parse_query(query, ACCEPTED) == out


@pytest.mark.parametrize(
    ("query", "error", "parameter"),
    [
        ("model=x", "invalid_parameter", "model"),
        ("user=a&user=b", "invalid_parameter", "user"),
        ("user=%ff", "bad_request", None),
        ("&".join(f"since={i}" for i in range(40)), "bad_request", None),  # more than 32 fields
    ],
)
def test_parse_query_refuses(query: str, error: str, parameter: str | None) -> None:
    with pytest.raises(Refused) as e:
        parse_query(query, ACCEPTED)
    assert e.value.denial.error == error
    assert e.value.denial.payload().get("parameter") == parameter


def test_admin_response_names_its_error_only_when_it_is_one() -> None:
    denial = Denial(403, "forbidden", "no")
    r = AdminResponse.of(denial)
    assert (r.status, r.error, r.payload) == (403, "forbidden", denial.payload())
    assert AdminResponse(200, {"error": "not one"}).error is None
    assert AdminResponse(500, ["x"]).error is None
