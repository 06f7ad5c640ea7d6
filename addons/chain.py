"""mitmproxy's addon chain for Candela: only the addons it needs, each event only to its hooks.

mitmproxy offers every event (and an `update` after each flow event) to every addon in its
chain: a generator, a context manager, a getattr and a coroutine per addon, about 2 µs each,
whether the addon has the hook or not. With mitmdump's 35 default addons and Candela's 16 that
was most of Candela's CPU per request (issue 7's profile). `drop_unused_defaults` leaves out the
default addons Candela never uses; `HookTable` looks each hook up once per chain and calls only
the addons that have it, in chain order, guarded as mitmproxy guards an addon. The pipeline's
addons are added to mitmproxy one by one, unchanged, and are still tested alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks

# mitmdump's default addons that serve interactive use (playback, map/modify rules, saving flows,
# sticky cookies, the mitm.it onboarding app, scripts, DNS mode, upstream-proxy auth). Candela
# sets none of their options, and each costs ~1.3 µs on every event of every flow (about 0.3 ms
# of CPU per request for these 25). Kept: TermLog, Core, Block (refuses public clients),
# DisableH2C, Proxyserver, NextLayer, TlsConfig, UpdateAltSvc, ErrorCheck.
UNUSED_DEFAULTS = frozenset(
    {
        "Browser", "StripDnsHttpsRecords", "BlockList", "AntiCache", "AntiComp",
        "ClientPlayback", "CommandHistory", "Comment", "Cut", "Export", "Onboarding",
        "ProxyAuth", "DnsResolver", "ScriptLoader", "ServerPlayback", "MapRemote", "MapLocal",
        "ModifyBody", "ModifyHeaders", "StickyAuth", "StickyCookie", "Save", "SaveHar",
        "UpstreamAuth", "KeepServing", "ReadFileStdin",
    }
)


def drop_unused_defaults(master: Any) -> list[str]:
    """Remove UNUSED_DEFAULTS from a DumpMaster's chain (their options stay registered, unused)."""
    # Taken out of the chain before the master runs; AddonManager.remove() would call their
    # `done` hooks synchronously, which some define as coroutines. They never started anything.
    manager = master.addons
    dropped = [a for a in manager.chain if type(a).__name__ in UNUSED_DEFAULTS]
    manager.chain = [a for a in manager.chain if a not in dropped]
    for name, addon in list(manager.lookup.items()):
        if addon in dropped:
            del manager.lookup[name]
    return [type(a).__name__ for a in dropped]


_ARG_NAMES: dict[type[hooks.Hook], tuple[str, ...]] = {}


def hook_args(event: hooks.Hook) -> list[Any]:
    """`event.args()`: the values of the hook's dataclass fields, in order.

    mitmproxy's `Hook.args` asks `dataclasses.fields` each time (a generator over the class's
    fields: 3% of Candela's CPU under load); the names are looked up once per hook class here.
    """
    names = _ARG_NAMES.get(type(event))
    if names is None:
        fields = dataclasses.fields(event)  # type: ignore[arg-type]  # every Hook is a dataclass
        names = _ARG_NAMES[type(event)] = tuple(f.name for f in fields)
    return [getattr(event, name) for name in names]


class HookTable(addonmanager.AddonManager):
    """mitmproxy's AddonManager that offers an event only to the addons that have its hook.

    mitmproxy walks its whole chain for every event (a generator, a getattr, a context manager
    and a coroutine per addon) and, after each flow event, again for `update`, which no addon of
    Candela's chain has: 8 walks of 10 addons per proxied request. This one looks the hooks up
    once per chain (the list is rebuilt when the chain changes) and calls them in the same
    order, each guarded as mitmproxy guards it: an exception is logged and the next addon runs,
    AddonHalt ends the event, OptionsError propagates. Installed on a master by `use_hook_table`.
    """

    def _hooks_for(self, name: str) -> list[Callable[..., Any]] | None:
        """The callables of hook `name`, in chain order; None if mitmproxy's walk must decide."""
        d = self.__dict__
        if d.get("_candela_chain") != self.chain:  # identity per addon: add, remove, reassign
            d["_candela_chain"] = list(self.chain)
            d["_candela_hooks"] = {}
        table: dict[str, list[Callable[..., Any]] | None] = d["_candela_hooks"]
        if name in table:
            return table[name]
        fns: list[Callable[..., Any]] | None = []
        for a in addonmanager.traverse(self.chain):
            fn = getattr(a, name, None)
            if not fn or isinstance(fn, types.ModuleType):  # a module named like a hook: skipped
                continue
            if not callable(fn):  # mitmproxy raises AddonManagerError: let it
                fns = None
                break
            fns.append(fn)  # type: ignore[union-attr]
        table[name] = fns
        return fns

    async def trigger_event(self, event: hooks.Hook) -> None:
        fns = self._hooks_for(event.name)
        if fns is None:
            await super().trigger_event(event)
            return
        if not fns:
            return
        args = hook_args(event)
        for fn in fns:
            try:
                res = fn(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                addonmanager.logger.error(f"Addon error: {e}", exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self._hooks_for("update") != []:
            message = hook_args(event)[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


def use_hook_table(master: Any) -> None:
    """Make a master's AddonManager a HookTable (same state, same chain, faster dispatch)."""
    master.addons.__class__ = HookTable
