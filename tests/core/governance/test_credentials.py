"""Credentials (governance/credentials.py): 001's precedence, case, malformed input, fingerprints."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from candela_mitm.governance.credentials import (
    SOURCES,
    MalformedCredential,
    extract_credential,
    key_id,
)
from tests.core.governance.identity_support import ALICE_KEY, ALICE_SHA, where

# -- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize("first,second", list(itertools.combinations(SOURCES, 2)))
def test_precedence_of_every_pair(first: str, second: str) -> None:
    h1, q1 = where(first, "tok_first")
    h2, q2 = where(second, "tok_second")
    assert extract_credential({**h2, **h1}, {**q2, **q1}) == (first, "tok_first")


@pytest.mark.parametrize("first,second", list(itertools.combinations(SOURCES, 2)))
def test_malformed_higher_source_does_not_fall_back(first: str, second: str) -> None:
    h1, q1 = where(first, "", raw="Basic dXNlcjpwYXNz" if first in SOURCES[:2] else "a b")
    h2, q2 = where(second, "tok_second")
    with pytest.raises(MalformedCredential) as e:
        extract_credential({**h2, **h1}, {**q2, **q1})
    assert e.value.source == first


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"AUTHORIZATION": "Bearer abc"}, ("authorization", "abc")),
        ({"authorization": "bearer abc"}, ("authorization", "abc")),  # scheme is case-insensitive
        (
            {"X-Candela-Auth": "BEARER abc", "Authorization": "Bearer zzz"},
            ("x-candela-auth", "abc"),
        ),
        ({"X-Api-Key": "k1"}, ("x-api-key", "k1")),
        ({"X-GOOG-API-KEY": "k2"}, ("x-goog-api-key", "k2")),
        ({"Proxy-Authorization": "Bearer p"}, None),  # the IAP token is not the user's
        ({"Content-Type": "application/json"}, None),
        ({"Authorization": "Bearer a.b-c_d~e+f/g=="}, ("authorization", "a.b-c_d~e+f/g==")),
    ],
)
def test_extract_case_insensitive(headers: dict[str, str], expected: Any) -> None:
    assert extract_credential(headers, {}) == expected


def test_query_key_last() -> None:
    assert extract_credential({}, {"key": "k"}) == ("query:key", "k")
    assert extract_credential({}, {"alt": "sse"}) is None


MALFORMED_VALUES = [
    "Basic dXNlcjpwYXNz",
    "Bearer",
    "Bearer ",
    "Bearer  tok",
    "Bearer tok extra",
    " Bearer tok",
    "tok",
    "Bearer tok\x00",
    "Bearer tok\r\nX-Injected: 1",
    "Bearer tøk",
    "Bearer ' OR '1'='1",
    "Bearer " + "a" * 10_000,
    "Bearer " + "a" * 1_000_000,
]


@pytest.mark.parametrize("value", MALFORMED_VALUES, ids=lambda v: repr(v[:24]))
def test_malformed_authorization(value: str) -> None:
    with pytest.raises(MalformedCredential):
        extract_credential({"Authorization": value}, {})


def test_conflicting_spellings_are_malformed() -> None:
    with pytest.raises(MalformedCredential):
        extract_credential({"Authorization": "Bearer a", "authorization": "Bearer b"}, {})
    assert extract_credential({"Authorization": "Bearer a", "authorization": "Bearer a"}, {}) == (
        "authorization",
        "a",
    )


def test_key_id_is_sha256_prefix() -> None:
    assert key_id(ALICE_KEY) == ALICE_SHA[:8]




@pytest.mark.parametrize("first,second", list(itertools.combinations(SOURCES, 2)))
@pytest.mark.parametrize("proxy", [None, "Bearer iap.token.x", "Basic nope"])
def test_extract_credentials_is_both_extractions(first: str, second: str, proxy: str | None):
    """One lower-casing for both: the same answers and the same refusals, the proxy's first."""
    from candela_mitm.governance.credentials import extract_credentials, extract_proxy_credential

    h1, q1 = where(first, "tok_first")
    h2, q2 = where(second, "", raw="a b")
    headers = {**h2, **h1}
    if proxy is not None:
        headers["Proxy-Authorization"] = proxy
    query = {**q2, **q1}

    def both() -> Any:
        try:
            return extract_proxy_credential(headers), extract_credential(headers, query)
        except MalformedCredential as e:
            return e.source

    try:
        got: Any = extract_credentials(headers, query)
    except MalformedCredential as e:
        got = e.source
    assert got == both()
