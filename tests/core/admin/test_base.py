"""admin/base.py: an admin change is made only after its audit entry commits."""

from __future__ import annotations

from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import pytest

from candela_mitm.admin import base as admin_base
from candela_mitm.admin.base import AdminBase
from candela_mitm.admin.routes import AdminRequest
from candela_mitm.config import parse_config
from candela_mitm.errors import Refused, StoreUnavailable
from candela_mitm.governance.ledger import Ledger
from candela_mitm.governance.users import UserDirectory
from candela_mitm.state.memory import MemoryStateStore
from candela_mitm.state.ports import UserRecord
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




# -- AdminBase on its own: the memory store and an audit trail that records what it is asked --


class FakeAudit:
    """What AdminBase asks of the audit writer: a durable entry (a Future) and a plain one."""

    def __init__(self, durable: str = "ok") -> None:
        self.durable = durable  # "ok", "raise" (cannot be written) or "timeout"
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def record_durable(self, action: str, /, **fields: Any) -> Future[None]:
        f: Future[None] = Future()
        if self.durable == "ok":
            self.entries.append((action, fields))
            f.set_result(None)
        elif self.durable == "raise":
            f.set_exception(OSError("disk full"))
        # "timeout": never resolved
        return f

    def record(self, action: str, /, **fields: Any) -> bool:
        self.entries.append((action, fields))
        return True


class Services:
    def __init__(self, audit: FakeAudit) -> None:
        self.config = parse_config({"auth": {"api_keys": [{"sha256": "0" * 64, "user": "k@x"}], "admins": ["a@x"]}, "users": {"c@x": {}}})
        self.store = MemoryStateStore()
        self.ledger = Ledger(self.store)
        self.users = UserDirectory(self.config, self.store)
        self.audit = audit


REQ = AdminRequest("PUT", "/admin/v1/users/u%40x", "a@x", "admin", b"{}", "api_key", "span-9")


def test_audited_commits_the_entry_before_the_change() -> None:
    audit = FakeAudit()
    base = AdminBase(Services(audit))
    seen: list[int] = []
    base._audited(REQ, "user.create", "u@x", None, {"role": "developer"}, lambda: seen.append(len(audit.entries)))
    assert seen == [1]  # the entry was committed when the change ran
    assert audit.entries == [
        (
            "admin_action",
            {"actor": "a@x", "action": "user.create", "target": "u@x", "before": None,
             "after": {"role": "developer"}, "request_id": "span-9"},
        )
    ]


@pytest.mark.parametrize("durable", ["raise", "timeout"])
def test_audited_makes_no_change_when_the_entry_cannot_be_committed(monkeypatch, durable) -> None:
    monkeypatch.setattr(admin_base, "AUDIT_COMMIT_TIMEOUT_S", 0.01)
    audit = FakeAudit(durable)
    base = AdminBase(Services(audit))
    changed: list[bool] = []
    with pytest.raises(Refused) as e:
        base._audited(REQ, "user.create", "u@x", None, {}, lambda: changed.append(True))
    assert (e.value.denial.status, e.value.denial.error) == (503, "governance_unavailable")
    assert changed == []
    # a timed-out entry may still commit: a second entry says the change was not made
    outcomes = [(f.get("outcome"), f.get("reason")) for _, f in audit.entries]
    assert outcomes == ([("failed", "audit_timeout")] if durable == "timeout" else [])


def test_audited_marks_a_failed_change_and_reraises() -> None:
    audit = FakeAudit()
    base = AdminBase(Services(audit))

    def broken() -> None:
        raise StoreUnavailable("gone")

    with pytest.raises(StoreUnavailable):
        base._audited(REQ, "user.delete", "u@x", {}, None, broken)
    [(_, intent), (_, failed)] = audit.entries
    assert "outcome" not in intent
    assert (failed["outcome"], failed["reason"], failed["action"]) == ("failed", "StoreUnavailable", "user.delete")


def test_known_users_are_live_stored_records_or_configured() -> None:
    svc = Services(FakeAudit())
    base = AdminBase(svc)
    assert base._configured_ids() == {"a@x", "k@x", "c@x"}
    assert base._known("a@x") and base._known("c@x") and not base._known("u@x")
    svc.store.put_user(UserRecord("u@x"))
    assert base._known("u@x")
    svc.store.put_user(UserRecord("c@x"))
    assert svc.store.delete_user("c@x", 1)  # a deleted record hides the config
    assert not base._known("c@x")


def test_the_clock_is_the_ledgers_unless_given() -> None:
    svc = Services(FakeAudit())
    assert AdminBase(svc).clock is svc.ledger.clock
    t = datetime(2026, 5, 1, tzinfo=UTC)
    assert AdminBase(svc, clock=lambda: t)._now() == t
