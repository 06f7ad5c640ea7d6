"""Admin API base: what every resource's handlers share (the services, the clock, the audited change)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from typing import Any, Protocol

from candela_mitm import errors
from candela_mitm.admin.routes import AdminRequest
from candela_mitm.admin.views import tenant_json
from candela_mitm.audit.actions import ADMIN_ACTION
from candela_mitm.audit.writer import AuditWriter
from candela_mitm.config import Config
from candela_mitm.errors import Refused
from candela_mitm.governance.ledger import Ledger
from candela_mitm.governance.users import UserDirectory
from candela_mitm.state.ports import StateStore

# An admin change waits this long for its audit entry to be committed; past it, 503.
AUDIT_COMMIT_TIMEOUT_S = 5.0
# A read of the audit log first waits this long for entries already queued (read-your-writes).
AUDIT_FLUSH_TIMEOUT_S = 2.0


class AdminServices(Protocol):
    """What the admin API works on (the runtime provides it; tests may build it from parts)."""

    config: Config
    store: StateStore
    ledger: Ledger
    users: UserDirectory
    audit: AuditWriter



class AdminBase:
    """What every resource's handlers (admin/resources/) share: the services, the clock, who
    is known, and `_audited`, the one way an admin change is made (its audit entry first)."""

    def __init__(self, rt: AdminServices, clock: Callable[[], datetime] | None = None) -> None:
        self.rt = rt
        self.clock = clock or rt.ledger.clock


    # -- helpers -----------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.clock()

    def _configured_ids(self) -> set[str]:
        cfg = self.rt.config
        return set(cfg.users) | {k.user for k in cfg.auth.api_keys} | set(cfg.auth.admins)

    def _known(self, user: str) -> bool:
        """A user the directory holds: a live stored record, or one named in the config."""
        rec = self.rt.store.get_user(user, include_deleted=True)
        if rec is not None:
            return not rec.deleted
        return user in self._configured_ids()

    def _audited(
        self,
        req: AdminRequest,
        action: str,
        target: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        change: Callable[[], object],
    ) -> None:
        """Commit the audit entry, then make the change; refused (503, no change) if the entry
        cannot be committed."""
        entry = {
            "actor": req.user,
            "action": action,
            "target": target,
            "before": before,
            "after": after,
            "request_id": req.request_id,
        }
        try:
            self.rt.audit.record_durable(ADMIN_ACTION, **entry).result(AUDIT_COMMIT_TIMEOUT_S)
        except FutureTimeout:
            # it may still commit: say that the change was not made
            self.rt.audit.record(ADMIN_ACTION, **entry, outcome="failed", reason="audit_timeout")
            raise Refused(errors.governance_unavailable("the audit trail cannot be written")) from None
        except Exception:
            raise Refused(errors.governance_unavailable("the audit trail cannot be written")) from None
        try:
            change()
        except Exception as e:
            self.rt.audit.record(ADMIN_ACTION, **entry, outcome="failed", reason=type(e).__name__)
            raise
        finally:
            self._forget_settings()

    def _forget_settings(self) -> None:
        """This process's next request reads the change from the store, and budget slices
        judged on the budgets as they were are returned and taken anew: once, through the
        settings poller when there is one (the proxy's; tests may build no runtime), so that
        its next poll does not forget this change a second time."""
        poller = getattr(self.rt, "settings_poller", None)
        if poller is not None:
            poller.forget_own_change()
            return
        self.rt.users.forget()
        slices = getattr(self.rt, "slices", None)
        if slices is not None:
            slices.retire_all()


    def _tenant_view(self, tenant: str, now: datetime) -> dict[str, Any]:
        t = self.rt.users.tenant_settings(tenant)
        return tenant_json(t, self.rt.ledger.tenant_status(tenant, t.budget_usd, t.period, now))

