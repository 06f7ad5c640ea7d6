"""Server: runs mitmproxy with Candela's pipeline in reverse (or transparent) mode."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal

from mitmproxy import http, options
from mitmproxy.tools.dump import DumpMaster

from candela_mitm import errors
from candela_mitm.audit.actions import PROXY_START, PROXY_STOP
from candela_mitm.certs.authority import certs_path, ensure_ca
from candela_mitm.enforcement.refusals import start_refusal_feed
from candela_mitm.errors import ConfigError
from candela_mitm.runtime import Runtime

from . import mitm_patches, pipeline
from .chain import drop_unused_defaults, use_hook_table
from .connlimits import raw_denial

log = logging.getLogger("candela.server")

# Where a request would go if every gate failed: the discard port, which refuses connections.
_NOWHERE = "http://127.0.0.1:9"

_ERROR_CODES = {
    400: "bad_request",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "request_header_too_large",
    502: "upstream_unreachable",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def json_error_response(status_code: int, message: str = "") -> http.Response:
    """mitmproxy's own error pages (bad HTTP, unreachable upstream) as Candela JSON errors."""
    body = json.dumps(
        {"error": _ERROR_CODES.get(status_code, "proxy_error"), "message": message or "error"}
    ).encode()
    return http.Response.make(
        status_code, body, {"Content-Type": "application/json", "Connection": "close"}
    )


def install_json_errors() -> None:
    mitm_patches.install_error_pages(json_error_response)


def limit_request_heads(rt: Runtime) -> None:
    """Heads over `limits.max_header_bytes`: 431 `request_header_too_large`, then close."""
    limit = rt.config.limits.max_header_bytes
    refusal = raw_denial(errors.request_header_too_large(limit))
    mitm_patches.limit_request_heads(limit, lambda: refusal)


def proxy_options(rt: Runtime, host: str, port: int) -> dict[str, object]:
    """mitmproxy's options for Candela: reverse mode to a placeholder, lazy connections."""
    transparent = rt.config.mode == "transparent"  # its CA (confdir) is Candela's
    return {
        "mode": [f"reverse:{_NOWHERE}@{port}", *transparent_modes(rt)],
        "listen_host": host,
        "listen_port": port,
        "body_size_limit": str(rt.config.limits.max_body_bytes + 1),
        # lazy: read the request before connecting anywhere (the reverse target is a placeholder)
        "connection_strategy": "lazy",
        "keep_host_header": True,
        "termlog_verbosity": "warn",
        **({"confdir": str(certs_path(rt.config.interception.certs_dir))} if transparent else {}),
        # the shared edges' servers, re-encrypted towards: verified against this bundle if given
        **(
            {"ssl_verify_upstream_trusted_ca": rt.config.interception.upstream_ca_file}
            if transparent and rt.config.interception.upstream_ca_file
            else {}
        ),
    }


def transparent_modes(rt: Runtime) -> list[str]:
    """mode: transparent adds mitmproxy's transparent listener beside the reverse one."""
    if rt.config.mode != "transparent":
        return []
    # REDIRECT delivers a sandbox's connection to the address of the veth it came in on, so the
    # listener takes every address; the Sni addon refuses clients that are neither this machine
    # nor a registered sandbox.
    return [f"transparent@0.0.0.0:{rt.config.interception.listen_port}"]


# --- workers (issue 7): several processes on one port --------------------------------------
def share_listening_port() -> None:
    """Listeners bind with SO_REUSEPORT, so that `workers: N` processes listen on one port and
    the kernel spreads new connections across them (mitm_patches.listen_with_reuse_port)."""
    mitm_patches.listen_with_reuse_port()
# --- end workers ---------------------------------------------------------------------------


def is_provider_address(rt: Runtime, address: tuple[str, int]) -> bool:
    """A configured provider's host and port (as the config stands: a reload may change them):
    where Candela forwards governed requests, and so keeps a spare connection ready."""
    host, port = address
    return any(up.host == host and up.port == port for up in rt.upstreams.values())


def reload_config(rt: Runtime) -> None:
    """SIGHUP: apply the re-read config whole, or refuse it whole; either way it is audited."""
    try:
        changed = rt.reload_from_file()
    except ConfigError as e:
        log.error("config reload refused: %s", e)
        rt.audit.record("config_reload", result="refused", reason=str(e), path=rt.config_path)
        return
    log.info("config reloaded: %s", ", ".join(changed) or "no change")
    rt.audit.record("config_reload", result="applied", sections=changed, path=rt.config_path)


def freeze_startup_heap() -> None:
    """Move what start-up left alive (modules, config, pricing: ~120k objects) out of the cycle
    collector's sight. A full collection walked all of them, 80-90 ms with the event loop
    stopped, three times in 4,000 requests at 16 connections (flows' reference cycles promote
    garbage to the oldest generation, which only a full collection frees); frozen, it walks
    what requests left. Done once, before serving. Frozen objects are still freed by reference
    counting; one in a reference cycle that later turns to garbage (a config replaced on SIGHUP,
    where cyclic) is kept: a few objects per reload."""
    gc.collect()
    gc.freeze()


async def serve(rt: Runtime, host: str, port: int, reuse_port: bool = False) -> None:
    mitm_patches.warn_if_unverified()
    install_json_errors()
    mitm_patches.free_finished_streams()
    mitm_patches.fast_option_reads()
    mitm_patches.frame_chunks_once()
    mitm_patches.install_spare_connections(lambda address: is_provider_address(rt, address))
    limit_request_heads(rt)
    if reuse_port:
        share_listening_port()
    opts = proxy_options(rt, host, port)
    if "confdir" in opts:
        ensure_ca(str(opts["confdir"]))
    # confdir at construction: mitmproxy's TLS addon loads (or makes) its CA as it is added
    master = DumpMaster(
        options.Options(**{k: v for k, v in opts.items() if k == "confdir"}),
        with_termlog=True,
        with_dumper=False,
    )
    master.options.update(**opts)
    drop_unused_defaults(master)  # mitmdump's interactive addons (addons/chain.py)
    master.addons.add(*pipeline(rt))  # in pipeline order, after mitmproxy's own
    use_hook_table(master)  # each event only to the addons that have its hook (addons/chain.py)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    loop.add_signal_handler(signal.SIGHUP, reload_config, rt)
    log.info("candela listening on %s:%d", host, port)
    rt.audit.record(
        PROXY_START, command=rt.command, mode=rt.config.mode, listen=f"{host}:{port}", pid=os.getpid()
    )
    # host enforcement with this proxy in Candela's cgroup: the kernel's refusals are audited here
    refusals = start_refusal_feed(rt.audit.record)
    freeze_startup_heap()
    try:
        await master.run()
    finally:
        if refusals is not None:
            refusals.stop()  # enforcement itself stays: fail closed until `candela enforce off`
        rt.audit.record(PROXY_STOP, command=rt.command, pid=os.getpid())
        rt.close()
