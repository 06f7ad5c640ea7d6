"""The identity tests' fake OIDC provider (Google's certs and tokeninfo endpoints on loopback)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.oidc import FakeOidcProvider


@pytest.fixture(scope="module")
def idp() -> Iterator[FakeOidcProvider]:
    with FakeOidcProvider() as p:
        yield p


@pytest.fixture
def fresh_idp() -> Iterator[FakeOidcProvider]:
    with FakeOidcProvider() as p:
        yield p
