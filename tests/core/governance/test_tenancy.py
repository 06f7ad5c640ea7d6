import pytest

from candela_mitm.errors import Denial
from candela_mitm.governance.tenancy import requested_tenant, resolve_tenant, tenant_from_baggage


@pytest.mark.parametrize(
    "baggage, tenant",
    [
        ("candela.tenant_id=research-team", "research-team"),
        ("userId=alice, candela.tenant_id = research-team ;prop=1, x=y", "research-team"),
        ("candela.tenant_id=team%20one", "team one"),
        ("other=1", None),
        ("candela.tenant_id=", None),
        ("", None),
    ],
)
def test_baggage(baggage, tenant):
    assert tenant_from_baggage(baggage) == tenant


@pytest.mark.parametrize(
    "headers, tenant",
    [
        ({"x-candela-tenant-id": "a", "baggage": "candela.tenant_id=b"}, "a"),
        ({"baggage": "candela.tenant_id=b"}, "b"),
        ({"X-Candela-Tenant-Id": "c"}, "c"),
        ({}, None),
        ({"x-candela-tenant-id": "  "}, None),
    ],
)
def test_requested(headers, tenant):
    assert requested_tenant(headers) == tenant


@pytest.mark.parametrize(
    "requested, tenants, result",
    [
        (None, ["research-team", "b"], "research-team"),
        (None, [], None),
        ("b", ["research-team", "b"], "b"),
        ("other", ["research-team"], "tenant_not_allowed"),
        ("other", [], "tenant_not_allowed"),
        ("bad\x00id", ["bad\x00id"], "bad_request"),
        ("x" * 500, [], "bad_request"),
    ],
)
def test_resolve(requested, tenants, result):
    r = resolve_tenant("alice@example.com", requested, tenants)
    if isinstance(r, Denial):
        assert r.error == result
        if result == "tenant_not_allowed":
            assert r.status == 403 and r.fields["tenant_id"] == requested
    else:
        assert r == result
