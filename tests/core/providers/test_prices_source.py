"""genai-prices is installed without its dependencies and loaded without its __init__ (issue 18)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_install_keeps_mitmproxy_h11():
    """`make install` adds genai-prices with --no-deps: h11 stays <= 0.14 and mitmproxy imports."""
    r = _run(
        """
        from importlib import metadata
        import h11, mitmproxy.http, mitmproxy.proxy.layers.http
        major, minor = (int(x) for x in metadata.version("h11").split(".")[:2])
        assert (major, minor) <= (0, 14), metadata.version("h11")
        print(metadata.version("genai-prices"))
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == metadata.version("genai-prices")


def test_prices_load_and_compute_without_httpx2():
    """With httpx2 unimportable, the data loads, a price computes, the live updater never runs."""
    r = _run(
        """
        import sys
        class NoHttpx2:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("httpx2", "httpcore2"):
                    raise ImportError(f"{name} blocked by the test")
                return None
        sys.meta_path.insert(0, NoHttpx2())
        from candela_mitm.providers.pricing import PricingTable
        from candela_mitm.providers.usage import Usage
        price = PricingTable().get("claude-opus-4-8", "anthropic-direct")
        cost = price.cost(Usage(1_000_000, 0, 0))
        assert "httpx2" not in sys.modules and "genai_prices.update_prices" not in sys.modules
        print(cost, price.source)
        """
    )
    assert r.returncode == 0, r.stderr
    cost, source = r.stdout.split(maxsplit=1)
    assert float(cost) > 0 and source.strip() == f"genai-prices {metadata.version('genai-prices')}"


def test_makefile_pins_the_installed_version_and_pyproject_does_not_list_it():
    pin = re.search(r"^GENAI_PRICES := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pin and pin.group(1) == metadata.version("genai-prices")
    assert "--no-deps 'genai-prices==$(GENAI_PRICES)'" in (ROOT / "Makefile").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.lower().startswith(("genai-prices", "genai_prices")) for d in deps)
