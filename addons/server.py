"""Server: runs mitmproxy with Candela's pipeline in reverse (or transparent) mode."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal

from mitmproxy import http, options
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.tools.dump import DumpMaster

from candela_mitm.runtime import Runtime

from . import pipeline

log = logging.getLogger("candela.server")

# Where a request would go if every gate failed: the discard port, which refuses connections.
_NOWHERE = "http://127.0.0.1:9"

_ERROR_CODES = {
    400: "bad_request",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    502: "upstream_unreachable",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def _json_error_response(status_code: int, message: str = "") -> bytes:
    """mitmproxy's own error pages (bad HTTP, unreachable upstream) as Candela JSON errors."""
    body = json.dumps(
        {"error": _ERROR_CODES.get(status_code, "proxy_error"), "message": message or "error"}
    ).encode()
    resp = http.Response.make(
        status_code, body, {"Content-Type": "application/json", "Connection": "close"}
    )
    from mitmproxy.net.http import http1

    return http1.assemble_response(resp)


def install_json_errors() -> None:
    _http1.make_error_response = _json_error_response


def proxy_options(rt: Runtime, host: str, port: int) -> dict[str, object]:
    """mitmproxy's options for Candela: reverse mode to a placeholder, lazy connections."""
    return {
        "mode": [f"reverse:{_NOWHERE}@{port}"],
        "listen_host": host,
        "listen_port": port,
        "body_size_limit": str(rt.config.limits.max_body_bytes + 1),
        # lazy: read the request before connecting anywhere (the reverse target is a placeholder)
        "connection_strategy": "lazy",
        "keep_host_header": True,
        "termlog_verbosity": "warn",
    }


async def serve(rt: Runtime, host: str, port: int) -> None:
    install_json_errors()
    master = DumpMaster(options.Options(), with_termlog=True, with_dumper=False)
    master.options.update(**proxy_options(rt, host, port))
    master.addons.add(*pipeline(rt))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    log.info("candela listening on %s:%d", host, port)
    rt.audit.record(
        "proxy_start", command=rt.command, mode=rt.config.mode, listen=f"{host}:{port}", pid=os.getpid()
    )
    try:
        await master.run()
    finally:
        rt.audit.record("proxy_stop", command=rt.command, pid=os.getpid())
        rt.close()
