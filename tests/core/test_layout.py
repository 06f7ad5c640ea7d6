"""Tests mirror the source (../shared/LAYOUT.md): every module has its test module at the mirrored
path, or a line in UNMIRRORED saying where it is tested instead."""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# module (relative to the repository; a pattern covers a family) -> why it has no mirrored module
UNMIRRORED = {
    "candela_mitm/audit/actions.py": "constants: the audit action names",
    "candela_mitm/audit/bigquery_sink.py": "one mirror contract over every sink: tests/core/audit/test_mirrors.py",
    "candela_mitm/audit/duckdb_sink.py": "one mirror contract over every sink: tests/core/audit/test_mirrors.py",
    "candela_mitm/audit/sqlite_sink.py": "the system of record under tests/core/audit/test_chain.py and test_writer.py",
    "candela_mitm/cli/audit.py": "the entry point of tests/core/audit/test_chain.py, test_checkpoint.py, test_query.py",
    "candela_mitm/providers/catalogue/*.py": "the tables per provider and their Operation type: tests/core/providers/test_catalogue.py",
    "candela_mitm/state/sqlite.py": "one contract over every backend: tests/core/state/test_contract.py",
    "candela_mitm/state/redis.py": "one contract over every backend: tests/core/state/test_contract.py",
    "candela_mitm/state/ports.py": "the ports and their value types, run by tests/core/state/test_contract.py",
    "candela_mitm/state/__init__.py": "open_state_store, used by tests/e2e/test_crash.py; state/ is issue 21's now",
    "candela_mitm/state/gate.py": "no direct test yet (under every SQLite write); state/ is issue 21's now",
    "candela_mitm/local/__init__.py": "LocalRuntime, built by tests/core/local/support.py for every local test",
}


def mirror(module: Path) -> Path:
    """tests/core/<package>/test_<module>.py; addons/<a>.py -> tests/addons/test_<a>.py; a
    package's __init__.py -> test_<package>.py beside its package's tests."""
    parts = module.with_suffix("").parts
    if parts[0] == "addons":
        return REPO / "tests/addons" / f"test_{parts[-1]}.py"
    parts = parts[1:]  # candela_mitm/
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return REPO.joinpath("tests/core", *parts[:-1], f"test_{parts[-1]}.py")


def defines_nothing(module: Path) -> bool:
    """A package __init__ that only imports and re-exports has nothing of its own to test."""
    tree = ast.parse(module.read_text())
    return not any(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for n in tree.body
    )


def unmirrored() -> list[str]:
    modules = sorted((REPO / "candela_mitm").rglob("*.py")) + sorted((REPO / "addons").glob("*.py"))
    return sorted(
        str(m.relative_to(REPO))
        for m in modules
        if not (m.name == "__init__.py" and (m.parent == REPO / "addons" or defines_nothing(m)))
        and not mirror(m.relative_to(REPO)).exists()
    )


def test_every_module_has_its_mirrored_test_module_or_a_reason():
    missing = unmirrored()
    unexplained = [m for m in missing if not any(fnmatch(m, p) for p in UNMIRRORED)]
    assert unexplained == []


def test_every_reason_still_applies():
    """A line whose module now has its mirrored tests (or is gone) leaves the list."""
    missing = unmirrored()
    stale = [p for p in UNMIRRORED if not any(fnmatch(m, p) for m in missing)]
    assert stale == []


def test_the_mirror_rule():
    assert mirror(Path("candela_mitm/admin/resources/keys.py")) == REPO / "tests/core/admin/resources/test_keys.py"
    assert mirror(Path("candela_mitm/providers/translate/__init__.py")) == REPO / "tests/core/providers/test_translate.py"
    assert mirror(Path("candela_mitm/config.py")) == REPO / "tests/core/test_config.py"
    assert mirror(Path("addons/budget.py")) == REPO / "tests/addons/test_budget.py"


def test_every_package_is_in_the_wheel():
    """setuptools installs only the packages pyproject.toml lists: one left out is missing from
    an installed Candela (admin/resources once was: the admin API could not be imported)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {
        ".".join(d.relative_to(REPO).parts)
        for d in (REPO / "candela_mitm").rglob("*")
        if (d / "__init__.py").is_file() and "__pycache__" not in d.parts
    }
    assert present - listed == set()
