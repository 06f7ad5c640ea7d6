"""Console: the admin console's page and assets at /admin/, served before authentication.

The page holds no data: it signs in with a Candela key kept in the tab's sessionStorage and
reads and changes everything through /admin/v1 (admin-api.md), so RBAC and audit apply there.
"""

from __future__ import annotations

from importlib import resources

from mitmproxy import http

from candela_mitm import errors

from .flowstate import answered, ctx_of, deny, for_routes

ASSETS = {
    "admin.html": "text/html; charset=utf-8",
    "base.css": "text/css; charset=utf-8",  # shared with the local page
    "admin.css": "text/css; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
}
PAGE = "/admin/"
# Nothing from elsewhere, no framing, no referrer: the page handles a credential.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def load_assets() -> dict[str, bytes]:
    folder = resources.files("candela_mitm").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


def asset_for(path: str) -> str | None:
    """The asset a console path names: /admin/ (or /admin) is the page, /admin/<asset> the rest;
    None for anything else (the admin API under /admin/v1/ among them)."""
    bare = path.split("?", 1)[0]
    if bare in ("/admin", PAGE, PAGE + "index.html"):
        return "admin.html"
    name = bare[len(PAGE) :] if bare.startswith(PAGE) else ""
    return name if name in ASSETS and name != "admin.html" else None


class Console:
    def __init__(self) -> None:
        self.assets = load_assets()

    @for_routes("admin")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or c.kind != "admin" or answered(flow):
            return
        name = asset_for(flow.request.path)
        if name is None:
            return  # the API: Auth, then Admin
        if flow.request.method not in ("GET", "HEAD"):
            deny(flow, errors.method_not_allowed(flow.request.method, PAGE, ("GET", "HEAD")))
            return
        flow.response = http.Response.make(
            200, self.assets[name], {"Content-Type": ASSETS[name], **PAGE_HEADERS}
        )
