"""ModelPolicy: the model access check of spec 002, after the body is read and before the budget gate."""

from __future__ import annotations

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.audit.actions import MODEL_POLICY_CHECK
from candela_mitm.context import RequestContext
from candela_mitm.errors import Denial
from candela_mitm.governance.shadow import shadow_model
from candela_mitm.observability.spans import utc_now_iso
from candela_mitm.runtime import Runtime

from .flowstate import answered, ctx_of, deny, fail_closed


def check_model(
    rt: Runtime, flow: http.HTTPFlow, c: RequestContext, model: str, provider: str
) -> bool:
    """The one model policy check: decided, audited (allowed or denied), denied with 403.

    True if the model may be used. Every addon that lets a model be used goes through here
    (ModelPolicy for planned requests, LocalUi for a model pull) or through `decide_model`
    (a WebSocket session's frames), so no decision goes unaudited.
    """
    denial = decide_model(rt, c, model, provider)
    if denial is not None:
        deny(flow, denial)
        return False
    return True


def decide_model(rt: Runtime, c: RequestContext, model: str, provider: str) -> Denial | None:
    """check_model's decision and audit entry, without answering: the denial, or None."""
    key = c.principal.key_scope if c.principal else None  # a minted key's own model patterns
    d = rt.policy.check(model, c.tenant, c.workload_rule, key.models if key else ())
    record = {
        "result": "allowed" if d.allowed else "denied",
        "model": d.model,
        "tenant_id": c.tenant,
        "user_id": c.user,
        "policy_mode": d.policy_mode,
        "policy_scope": d.scope,
        "timestamp": utc_now_iso(),
        "span_id": c.span_id,
        "provider": provider,
    }
    c.policy = record
    if not rt.audit.record(MODEL_POLICY_CHECK, **record):
        # an unrecorded decision is no decision: the audit trail is part of governance
        return errors.governance_unavailable("the audit trail cannot accept entries")
    if not d.allowed:
        m = rt.metrics
        m.policy_denied.labels(
            m.model_label(d.model), m.tenant_label(c.tenant or ""), d.policy_mode
        ).inc()
        key_id = key.key_id if key is not None and d.scope == "key" else None
        return errors.model_not_allowed(d.model, c.tenant, d.policy_mode, key_id)
    return None


class ModelPolicy:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None or not c.plan.model:
            return
        shadow_model(self.rt.shadow, c)  # governance.shadow: judged, audited, never enforced
        check_model(self.rt, flow, c, c.plan.model, c.plan.upstream.name)
