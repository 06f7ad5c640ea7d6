"""admin/resources/audit_log.py: the audit listing, newest first, filtered and paged."""

from __future__ import annotations

from candela_mitm.config import parse_config
from candela_mitm.runtime import build_runtime
from tests.core.admin.support import ADMIN, ALICE, BOB, TODAY, call, future, q

# -- audit listing -----------------------------------------------------------------------------


def test_audit_listing_newest_first_with_filters_and_paging(rt):
    for budget in (1, 2, 3):
        call(rt, "PUT", f"/admin/v1/users/{q(BOB)}", {"daily_budget_usd": budget})
    rt.audit.record("llm_request", user_id=ALICE, cost_usd=0.1)
    everything = call(rt, "GET", "/admin/v1/audit").payload["entries"]
    seqs = [e["seq"] for e in everything]
    assert seqs == sorted(seqs, reverse=True)
    page = call(rt, "GET", "/admin/v1/audit?action=admin_action&limit=2").payload
    assert [e["fields"]["after"]["daily_budget_usd"] for e in page["entries"]] == [3, 2]
    assert page["next_before_seq"] == page["entries"][-1]["seq"]
    rest = call(
        rt,
        "GET",
        f"/admin/v1/audit?action=admin_action&limit=2&before_seq={page['next_before_seq']}",
    ).payload
    assert [e["fields"]["after"]["daily_budget_usd"] for e in rest["entries"]] == [1]
    assert rest["next_before_seq"] is None
    mine = call(rt, "GET", f"/admin/v1/audit?user={q(ADMIN)}&action=admin_action").payload
    assert mine["count"] == 3 and all(e["user_id"] == ADMIN for e in mine["entries"])
    first = page["entries"][0]
    assert first["fields"]["before"]["daily_budget_usd"] == 2
    assert first["fields"]["actor"] == ADMIN and first["fields"]["target"] == BOB
    assert call(rt, "GET", f"/admin/v1/audit?since={future(1)}").payload["count"] == 0
    assert call(rt, "GET", f"/admin/v1/audit?since={TODAY}").payload["count"] == len(everything)


def test_audit_listing_before_anything_was_written(tmp_path):
    cfg = parse_config(
        {
            "state": {"sqlite_path": str(tmp_path / "s.db")},
            "audit": {"sqlite_path": str(tmp_path / "a.db")},
            "auth": {"admins": [ADMIN]},
        }
    )
    runtime = build_runtime(cfg, "server")
    try:
        r = call(runtime, "GET", "/admin/v1/audit")
        assert r.status == 200 and r.payload["entries"] == []
    finally:
        runtime.close()
        runtime.store.close()


