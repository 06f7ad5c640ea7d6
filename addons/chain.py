"""mitmproxy's addon chain for Candela: only the addons it needs, each event only to its hooks.

mitmproxy offers every event (and an `update` after each flow event) to every addon in its
chain: a generator, a context manager, a getattr and a coroutine per addon, about 2 µs each,
whether the addon has the hook or not. With mitmdump's 35 default addons and Candela's 16 that
was most of Candela's CPU per request (issue 7's profile). `drop_unused_defaults` leaves out the
default addons Candela never uses; `HookTable` looks each hook up once per chain and calls only
the addons that have it, in chain order, guarded as mitmproxy guards an addon. The pipeline's
addons are added to mitmproxy one by one, unchanged, and are still tested alone. Both reach
into mitmproxy's AddonManager: that part lives in mitm_patches.py.
"""

from __future__ import annotations

from typing import Any

from . import mitm_patches
from .mitm_patches import HookTable, hook_args

# mitmdump's default addons that serve interactive use (playback, map/modify rules, saving flows,
# sticky cookies, the mitm.it onboarding app, scripts, DNS mode, upstream-proxy auth). Candela
# sets none of their options, and each costs ~1.3 µs on every event of every flow (about 0.3 ms
# of CPU per request for these 25). UpdateAltSvc rewrites a provider's Alt-Svc to Candela's
# port in reverse mode: Upstream never passes Alt-Svc on (providers/headers.py's allowlist), so
# it only cost its check (~7 µs a request at one connection). Kept: TermLog, Core, Block
# (refuses public clients), DisableH2C, Proxyserver, NextLayer, TlsConfig, ErrorCheck.
UNUSED_DEFAULTS = frozenset(
    {
        "Browser", "StripDnsHttpsRecords", "BlockList", "AntiCache", "AntiComp",
        "ClientPlayback", "CommandHistory", "Comment", "Cut", "Export", "Onboarding",
        "ProxyAuth", "DnsResolver", "ScriptLoader", "ServerPlayback", "MapRemote", "MapLocal",
        "ModifyBody", "ModifyHeaders", "StickyAuth", "StickyCookie", "Save", "SaveHar",
        "UpstreamAuth", "KeepServing", "ReadFileStdin", "UpdateAltSvc",
    }
)

__all__ = ["UNUSED_DEFAULTS", "HookTable", "drop_unused_defaults", "hook_args", "use_hook_table"]


def drop_unused_defaults(master: Any) -> list[str]:
    """Remove UNUSED_DEFAULTS from a DumpMaster's chain (their options stay registered, unused)."""
    dropped = mitm_patches.remove_addons(master, lambda a: type(a).__name__ in UNUSED_DEFAULTS)
    return [type(a).__name__ for a in dropped]


def use_hook_table(master: Any) -> None:
    """Make a master's AddonManager a HookTable (same state, same chain, faster dispatch)."""
    mitm_patches.use_table(master)
