"""What a test needs from the machine. Missing, the test is skipped, except under
CANDELA_REQUIRE_PRIVILEGED=1 (`make test`, CI: it installs everything), where it fails."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE = os.environ.get("CANDELA_REQUIRE_PRIVILEGED") == "1"


def require(what: str) -> NoReturn:
    """Skip (or, under CANDELA_REQUIRE_PRIVILEGED=1, fail) because `what` is missing."""
    if REQUIRE:
        pytest.fail(f"test cannot run: {what} (CANDELA_REQUIRE_PRIVILEGED=1)")
    pytest.skip(what)
