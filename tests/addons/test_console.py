"""Console: which paths are the console's (served before authentication) and which the API's."""

from __future__ import annotations

import pytest

from candela_mitm.addons.console import asset_for, load_assets


@pytest.mark.parametrize(
    ("path", "asset"),
    [
        ("/admin", "admin.html"),
        ("/admin/", "admin.html"),
        ("/admin/?x=1", "admin.html"),
        ("/admin/index.html", "admin.html"),
        ("/admin/admin.js", "admin.js"),
        ("/admin/admin.css", "admin.css"),
        ("/admin/admin.html", None),
        ("/admin/v1/me", None),
        ("/admin/v1/users", None),
        ("/admin/../admin.js", None),
        ("/admin/local.js", None),
        ("/adminx/", None),
    ],
)
def test_asset_for(path, asset):
    assert asset_for(path) == asset


def test_assets_load_nothing_from_elsewhere():
    assets = load_assets()
    for name, body in assets.items():
        text = body.decode()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text, name
