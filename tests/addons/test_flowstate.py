"""How a failed flow failed: noted on its context before anything accounts it."""

from __future__ import annotations

import pytest
from mitmproxy import flow as mflow
from mitmproxy.test import tflow

from addons.flowstate import KEY, note_failure, nothing_sent
from candela_mitm.context import RequestContext
from candela_mitm.observability.spans import TraceContext


@pytest.mark.parametrize(
    ("tcp", "tls", "tls_setup", "unsent"),
    [
        (None, False, None, True),  # connection refused, unresolvable: never connected
        (1.0, False, None, False),  # connected over plain TCP: the request may have gone
        (1.0, True, None, True),  # TLS never completed: nothing was sent
        (1.0, True, 2.0, False),
    ],
)
def test_nothing_sent(tcp: float | None, tls: bool, tls_setup: float | None, unsent: bool) -> None:
    conn = tflow.tserver_conn()
    conn.timestamp_tcp_setup = tcp
    conn.tls = tls
    conn.timestamp_tls_setup = tls_setup
    assert nothing_sent(conn) is unsent


def _failed(forwarded: bool, connected: bool, first_byte: bool) -> RequestContext:
    f = tflow.tflow()
    c = RequestContext("proxy", "openai", "/v1/chat/completions", TraceContext.from_headers(None))
    c.forwarded = forwarded
    c.first_byte_at = 1.0 if first_byte else None
    f.server_conn.timestamp_tcp_setup = 1.0 if connected else None
    f.server_conn.tls = False
    f.error = mflow.Error("Connection refused" if not connected else "Client disconnected.")
    f.metadata[KEY] = c
    note_failure(f)
    return c


def test_note_failure() -> None:
    c = _failed(forwarded=True, connected=False, first_byte=False)
    assert c.upstream_unreached and c.error == "Connection refused"
    c = _failed(forwarded=True, connected=True, first_byte=False)
    assert not c.upstream_unreached and c.error == "Client disconnected."
    # an answer began: whatever the connection says now, the request reached the provider
    assert not _failed(forwarded=True, connected=False, first_byte=True).upstream_unreached
    assert not _failed(forwarded=False, connected=False, first_byte=False).upstream_unreached
