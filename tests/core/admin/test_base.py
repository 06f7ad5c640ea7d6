"""admin/base.py: an admin change is made only after its audit entry commits."""

from __future__ import annotations

from typing import Any

from candela_mitm.errors import StoreUnavailable
from tests.core.admin.support import ALICE, CAROL, GRANT, admin_actions, call, q

# -- fail closed -------------------------------------------------------------------------------


def test_no_change_when_the_audit_trail_refuses(rt):
    rt.audit.queue_max = 0  # the queue is "full": record() answers False
    try:
        put = call(rt, "PUT", f"/admin/v1/users/{q(ALICE)}", {"daily_budget_usd": 0})
        grant = call(rt, "POST", f"/admin/v1/users/{q(ALICE)}/grants", GRANT)
        delete = call(rt, "DELETE", f"/admin/v1/users/{q(ALICE)}")
    finally:
        rt.audit.queue_max = 100
    for r in (put, grant, delete):
        assert (r.status, r.error) == (503, "governance_unavailable")
    assert rt.store.get_user(ALICE, include_deleted=True) is None
    assert rt.ledger.list_grants(ALICE) == [] and admin_actions(rt) == []


def test_a_change_that_fails_after_its_audit_entry_is_marked_failed(rt, monkeypatch):
    def broken(record: Any) -> None:
        raise StoreUnavailable("disk gone")

    monkeypatch.setattr(rt.store, "put_user", broken)
    r = call(rt, "PUT", f"/admin/v1/users/{q(CAROL)}", {"daily_budget_usd": 1})
    assert (r.status, r.error) == (503, "governance_unavailable")
    intent, failed = admin_actions(rt)
    assert intent["action"] == failed["action"] == "user.create"
    assert "outcome" not in intent
    assert (failed["outcome"], failed["reason"]) == ("failed", "StoreUnavailable")


