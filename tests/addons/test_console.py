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
        ("/admin/base.css", "base.css"),
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


def test_both_pages_load_the_shared_stylesheet_before_their_own():
    from importlib import resources

    static = resources.files("candela_mitm").joinpath("static")
    for page, base, own in [
        ("admin.html", "/admin/base.css", "/admin/admin.css"),
        ("local.html", "/_local/static/base.css", "/_local/static/local.css"),
    ]:
        html = static.joinpath(page).read_text()
        assert html.index(f'href="{base}"') < html.index(f'href="{own}"'), page
    shared = set(static.joinpath("base.css").read_text().splitlines())
    for own in ("admin.css", "local.css"):  # no rule written twice
        rules = {ln for ln in static.joinpath(own).read_text().splitlines() if "{" in ln}
        assert not rules & shared, own
