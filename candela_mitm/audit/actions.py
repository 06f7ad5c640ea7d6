"""Audit actions: the name of every kind of entry the ledger holds, in one place."""

from __future__ import annotations

LLM_REQUEST = "llm_request"  # one per request Candela answered on a proxy route
LLM_SESSION = "llm_session"  # one per WebSocket session, written when it ends
MODEL_POLICY_CHECK = "model_policy_check"  # every model policy decision, allowed or denied
ADMIN_ACTION = "admin_action"  # every change made through the admin API
BYPASS_ATTEMPT = "bypass_attempt"  # a connection the kernel refused (enforcement)
PROXY_START = "proxy_start"
PROXY_STOP = "proxy_stop"
CONFIG_RELOAD = "config_reload"
BUDGET_ALERT = "budget_alert"  # a budget threshold alert posted to a webhook, or given up on

ALL = (
    LLM_REQUEST,
    LLM_SESSION,
    MODEL_POLICY_CHECK,
    ADMIN_ACTION,
    BYPASS_ATTEMPT,
    PROXY_START,
    PROXY_STOP,
    CONFIG_RELOAD,
    BUDGET_ALERT,
)
