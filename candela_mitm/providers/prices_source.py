"""The genai-prices data: the one place its modules are imported, without its package __init__.

genai-prices (Pydantic's price table, PyPI `genai-prices`) ships its data offline in
`genai_prices.data` and its matching and arithmetic in `genai_prices.data_snapshot` and
`genai_prices.types`. Its `__init__` also imports `update_prices`, the live updater, which needs
`httpx2`; httpx2 needs h11 >= 0.16 and mitmproxy 11.0.2 pins h11 <= 0.14. The package is
therefore installed without its dependencies (Makefile) and loaded here through a bare package
object: the submodules import, the `__init__` (and with it httpx2) never runs.
"""

from __future__ import annotations

import importlib.util
import sys
import types as _pytypes
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genai_prices import data_snapshot

PACKAGE = "genai_prices"
DISTRIBUTION = "genai-prices"


def _register_bare_package() -> None:
    """Make `genai_prices` importable as a namespace for its submodules, __init__ not executed."""
    if PACKAGE in sys.modules:
        return  # already imported (whole, or by an earlier call): its submodules load as usual
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            f"{DISTRIBUTION} is not installed (make install puts it in with --no-deps)"
        )
    module = _pytypes.ModuleType(PACKAGE, "genai-prices data, loaded without its __init__")
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__package__ = PACKAGE
    sys.modules[PACKAGE] = module


@cache
def modules() -> tuple[_pytypes.ModuleType, _pytypes.ModuleType]:
    """(genai_prices.data_snapshot, genai_prices.types), imported once."""
    _register_bare_package()
    snapshot_mod = importlib.import_module(f"{PACKAGE}.data_snapshot")
    types_mod = importlib.import_module(f"{PACKAGE}.types")
    return snapshot_mod, types_mod


def snapshot() -> data_snapshot.DataSnapshot:
    """The bundled price data (never the live updater's: Candela does not fetch prices)."""
    snapshot_mod, _ = modules()
    snap: data_snapshot.DataSnapshot = snapshot_mod.get_snapshot()
    return snap


def gp_types() -> _pytypes.ModuleType:
    """genai_prices.types: Usage, ModelPrice, TieredPrices, ModelInfo, Provider."""
    return modules()[1]


@cache
def version() -> str:
    """The installed genai-prices version, shown as the source of every library price."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def label() -> str:
    return f"{DISTRIBUTION} {version()}"


__all__ = ["modules", "snapshot", "gp_types", "version", "label"]
