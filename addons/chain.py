"""Chain: Candela's pipeline registered as one mitmproxy addon, so mitmproxy dispatches each event once.

mitmproxy offers every event (and an `update` after each flow event) to every addon in its
chain: a generator, a context manager and a getattr per addon, about 2 µs each, whether the
addon has the hook or not. With 15 pipeline addons that was a fifth of Candela's CPU per request
(issue 7's profile). The Chain looks the hooks up once and calls only the addons that have them,
in pipeline order, each guarded as mitmproxy guards an addon: an exception is logged and the next
addon runs; AddonHalt stops the chain. The addons themselves are unchanged and still tested alone.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks
from mitmproxy.tools import dump  # noqa: F401 - imports every layer, so all_hooks is complete

log = logging.getLogger("mitmproxy.addonmanager")  # where mitmproxy logs an addon's error


def _report(fn: Callable[..., Any]) -> None:
    log.error("Addon error: %s", getattr(fn, "__qualname__", fn), exc_info=True)


def _sync(fns: Sequence[Callable[..., Any]]) -> Callable[..., None]:
    def run(*args: Any) -> None:
        for fn in fns:
            try:
                fn(*args)
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise
            except Exception:
                _report(fn)

    return run


def _async(fns: Sequence[Callable[..., Any]]) -> Callable[..., Any]:
    async def run(*args: Any) -> None:
        for fn in fns:
            try:
                res = fn(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise
            except Exception:
                _report(fn)

    return run


class Chain:
    """The pipeline's addons, in order, behind one addon (mitmproxy's name for it: "candela")."""

    name = "candela"

    def __init__(self, members: Sequence[Any]) -> None:
        # not called `addons`: mitmproxy would walk into it and call every member a second time
        self.members = list(members)
        self.hooks: dict[str, list[Callable[..., Any]]] = {}
        for event in sorted(hooks.all_hooks):
            fns = [getattr(a, event) for a in self.members if callable(getattr(a, event, None))]
            if not fns:
                continue
            self.hooks[event] = fns
            if len(fns) == 1:  # mitmproxy guards a lone hook exactly as the Chain would
                setattr(self, event, fns[0])
            elif any(inspect.iscoroutinefunction(f) for f in fns):
                setattr(self, event, _async(fns))
            else:
                setattr(self, event, _sync(fns))


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
        try:
            return table[name]
        except KeyError:
            pass
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
        args = event.args()
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
            message = event.args()[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


def use_hook_table(master: Any) -> None:
    """Make a master's AddonManager a HookTable (same state, same chain, faster dispatch)."""
    master.addons.__class__ = HookTable
