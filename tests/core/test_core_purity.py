"""The core never imports mitmproxy: it is reused by the CLI and the admin API, and tested plainly."""

import pkgutil
import subprocess
import sys

import candela_mitm

CORE = sorted(
    m.name
    for m in pkgutil.walk_packages(candela_mitm.__path__, "candela_mitm.")
    if not m.name.startswith(("candela_mitm.addons", "candela_mitm.cli"))
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
