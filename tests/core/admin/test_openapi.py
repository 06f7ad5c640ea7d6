"""The admin OpenAPI document (admin/openapi.py): valid, and covering every route."""

from __future__ import annotations

from openapi_spec_validator import validate as validate_openapi

from candela_mitm.admin.routes import ROUTES
from tests.core.admin.support import BOB, call

# -- OpenAPI -----------------------------------------------------------------------------------


def test_openapi_document_is_valid_and_covers_every_route(rt):
    doc = call(rt, "GET", "/admin/v1/openapi.json", as_=BOB).payload
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.")
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == {(r.method, r.template) for r in ROUTES}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            codes = set(op["responses"])
            assert {"400", "401", "503"} <= codes, (method, path)
            assert any(c.startswith("2") for c in codes)
            route = next(r for r in ROUTES if r.template == path and r.method == method.upper())
            if route.admin_only:
                assert "403" in codes
            documented_query = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
            assert documented_query == set(route.query)
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"]


