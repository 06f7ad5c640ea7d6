"""The layer contract: which packages may import which (../shared/LAYOUT.md), read from the source."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import candela_mitm

PKG = Path(candela_mitm.__file__).resolve().parent
EDGE = (
    "mitmproxy",
    "candela_mitm.enforcement",
    "candela_mitm.ebpf",
    "candela_mitm.netns",
    "candela_mitm.certs",
)
UPPER = ("candela_mitm.runtime", "candela_mitm.addons", "candela_mitm.cli")
# package -> module prefixes it must never import (at module level or inside a function)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "governance": EDGE + UPPER + ("candela_mitm.admin", "candela_mitm.local"),
    "providers": EDGE
    + UPPER
    + (
        "candela_mitm.governance",
        "candela_mitm.admin",
        "candela_mitm.local",
        "candela_mitm.audit",
        "candela_mitm.state",
    ),
    "state": EDGE
    + UPPER
    + (
        "candela_mitm.governance",
        "candela_mitm.providers",
        "candela_mitm.admin",
        "candela_mitm.local",
        "candela_mitm.audit",
    ),
    "audit": EDGE + UPPER + ("candela_mitm.governance", "candela_mitm.admin", "candela_mitm.local"),
    "observability": EDGE + UPPER + ("candela_mitm.admin", "candela_mitm.local"),
    "admin": EDGE + UPPER,
    "local": EDGE + UPPER,
    "enforcement": ("mitmproxy",) + UPPER,
}
VOCABULARY = {"config.py", "errors.py", "context.py"}


def imports_of(path: Path) -> set[str]:
    """Every absolute module name a file imports, wherever the import statement stands."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{f.relative_to(PKG.parent)} imports {name}"
        for f in files
        for name in imports_of(f)
        if any(name == p or name.startswith(p + ".") for p in forbidden)
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package):
    files = sorted((PKG / package).rglob("*.py"))
    assert files
    assert violations(files, FORBIDDEN[package]) == []


def test_the_vocabulary_imports_no_edge_and_no_composition_root():
    files = [PKG / name for name in sorted(VOCABULARY)]
    assert violations(files, EDGE + UPPER) == []


def test_only_cli_and_addons_import_the_runtime():
    repo = PKG.parent
    files = [*PKG.rglob("*.py")] + [
        f for d in ("ebpf", "netns", "certs") for f in (repo / d).rglob("*.py")
    ]
    files = [f for f in files if not f.is_relative_to(PKG / "cli") and f != PKG / "runtime.py"]
    assert violations(files, ("candela_mitm.runtime",)) == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from candela_mitm.runtime import Runtime\n")
    assert imports_of(f) >= {"candela_mitm.runtime", "candela_mitm.runtime.Runtime"}


CORE = sorted(
    m.name
    for m in pkgutil.walk_packages(candela_mitm.__path__, "candela_mitm.")
    if not m.name.startswith(("candela_mitm.addons", "candela_mitm.cli.main"))
    and not m.name.endswith("__main__")
)


def test_core_modules_do_not_import_mitmproxy():
    code = (
        "import importlib, sys\n"
        f"for m in {CORE!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m == 'mitmproxy' or m.startswith('mitmproxy.')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(CORE) > 10


def test_wheel_has_no_generic_top_level_names(tmp_path):
    """Installed, the design card's folders live inside candela_mitm; no `addons` in site-packages."""
    import zipfile
    from pathlib import Path

    repo = Path(candela_mitm.__file__).resolve().parents[1]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(repo),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    [wheel] = tmp_path.glob("*.whl")
    tops = {n.split("/", 1)[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops - {"candela_mitm"} <= {t for t in tops if t.endswith(".dist-info")}
    names = zipfile.ZipFile(wheel).namelist()
    assert "candela_mitm/addons/router.py" in names
    assert "candela_mitm/data/pricing.json" in names


def test_every_module_imports():
    """A module that names one that was never committed fails here, in CI's fresh install."""
    import importlib

    import candela_mitm.addons
    import candela_mitm.certs
    import candela_mitm.ebpf
    import candela_mitm.netns

    names = set(CORE)
    for pkg in (candela_mitm.addons, candela_mitm.certs, candela_mitm.ebpf, candela_mitm.netns):
        names |= {m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")}
    for name in sorted(names):
        if not name.endswith("__main__"):
            importlib.import_module(name)
    assert "candela_mitm.addons.server" in names
