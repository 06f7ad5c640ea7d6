"""tests/required.py: a missing requirement skips, or fails under CANDELA_REQUIRE_PRIVILEGED=1."""

from __future__ import annotations

import pytest

from tests import required


def test_a_missing_requirement_skips_outside_make_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(required, "REQUIRE", False)
    with pytest.raises(pytest.skip.Exception, match="redis-server"):
        required.require("redis-server is not installed")


def test_a_missing_requirement_fails_under_make_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(required, "REQUIRE", True)
    with pytest.raises(pytest.fail.Exception, match="bcc.*CANDELA_REQUIRE_PRIVILEGED=1"):
        required.require("bcc")
