"""Governed sandboxes: what one `candela run` builds around a command, and takes down again.

`candela run [--user U] [--tenant T] [--add-host NAME:IP] -- CMD ARGS...` (cli/run.py) runs CMD
unchanged in its own network namespace and cgroup. Its TCP to ports 80 and 443 is redirected to
Candela's transparent listener; everything else it sends is dropped (iptables) and refused with
EPERM and audited (the eBPF guard). Its record in the registry (registry.py) maps the sandbox's
source address to its user and tenant; the proxy reads it.

A sandbox is taken down by one function, `teardown` (sandbox_teardown.py), however it ends:
when its command exits, when setting it up fails or is interrupted, and when a later run finds it
left over by a run that was killed (`cleanup_leftovers`). Its names (hosts file, resolv.conf) are
sandbox_names.py's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from candela_mitm.enforcement.registry import (
    SandboxRecord,
    SandboxRegistry,
    process_start_time,
)
from candela_mitm.enforcement.sandbox_names import RESOLV_CONF, hosts_file, sandbox_hosts
from candela_mitm.enforcement.sandbox_teardown import (
    bundle_path,
    cgroup_name,
    cleanup_leftovers,
    teardown,
)

log = logging.getLogger("candela.sandbox")

SANDBOX_ACTION_START = "sandbox_start"
SANDBOX_ACTION_STOP = "sandbox_stop"
RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A signal arrived while the sandbox was being set up: what exists is taken down."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


# -- building one sandbox -------------------------------------------------------------------


class Sandbox:
    """Everything one `candela run` creates, taken down by `teardown` however the run ends."""

    def __init__(
        self,
        config: Any,
        registry: SandboxRegistry,
        user: str,
        tenant: str | None,
        add_hosts: Sequence[tuple[str, str]],
        command: Sequence[str],
        audit: Any = None,
        ebpf: bool = True,
    ) -> None:
        self.config = config
        self.registry = registry
        self.user = user
        self.tenant = tenant
        self.add_hosts = list(add_hosts)
        self.command = list(command)
        self.audit = audit
        self.ebpf = ebpf
        self.record: SandboxRecord | None = None
        self.guard: Any = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.etc_dir: Path | None = None
        self.bundle: Path | None = None
        self._netns_cookie: int | None = None  # registered with the host guard
        self._signals = 0
        self._previous: dict[int, Any] = {}
        self._phase = "new"  # setup, starting, running, teardown, done

    # setup --------------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        # Signals wait (blocked) while pieces are made or removed: pyroute2 forks helpers that
        # would run a Python handler as a twin of this process. Unblocked before the command
        # starts, a signal that came meanwhile unwinds everything (Interrupted); once the command
        # runs, signals are passed on to it.
        signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED_SIGNALS)
        self._previous = {s: signal.signal(s, self._on_signal) for s in RELAYED_SIGNALS}
        self._phase = "setup"
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED_SIGNALS)
        self._phase = "teardown"
        try:
            if self.record is not None:
                teardown(
                    self.registry,
                    self.record.index,
                    stop_guard=self._stop_guard if self.guard is not None else None,
                    netns_cookie=self._netns_cookie,
                )
        finally:
            self._phase = "done"
            signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED_SIGNALS)
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1
        if self._phase == "starting":
            raise Interrupted(signum)
        if self._phase == "running" and self.proc is not None and self.proc.poll() is None:
            # a second signal means "now": the command may be ignoring the first
            self.proc.send_signal(signum if self._signals < 2 else signal.SIGKILL)

    def _setup(self) -> None:
        from candela_mitm.certs.authority import ca_certificate_pem, ensure_ca
        from candela_mitm.certs.bundle import build_bundle
        from candela_mitm.enforcement import cgroups
        from candela_mitm.enforcement.interception import HostMap
        from candela_mitm.netns import firewall, network

        icfg = self.config.interception
        me = os.getpid()
        self.record = self.registry.claim(
            lambda i: SandboxRecord(
                index=i,
                address=network.SandboxNet(i).sandbox_address,
                user=self.user,
                tenant=self.tenant,
                pid=me,
                pid_start=process_start_time(me),
                netns=network.SandboxNet(i).netns,
                host_if=network.SandboxNet(i).host_if,
                command=self.command[0],
            ),
            in_use=network.sandbox_indexes_present,
        )
        # from here on, whatever exists of sandbox `index` is taken down by teardown()
        index = self.record.index
        net = network.SandboxNet(index)

        # /etc files and the CA bundle, in the run directory
        self.etc_dir = self.registry.root / "etc" / net.netns
        shutil.rmtree(self.etc_dir, ignore_errors=True)  # a leftover of a run that was killed
        self.etc_dir.mkdir(parents=True, mode=0o755)
        ensure_ca(icfg.certs_dir)
        self.bundle = build_bundle(
            ca_certificate_pem(icfg.certs_dir), bundle_path(self.registry, net)
        )
        host_map = HostMap(icfg.hosts)
        entries = sandbox_hosts(self.add_hosts, host_map.exact_names(), net.host_address)
        (self.etc_dir / "hosts").write_text(hosts_file(entries))
        (self.etc_dir / "resolv.conf").write_text(RESOLV_CONF)

        cgroup = cgroups.create(cgroup_name(index))
        network.create(net)
        self._register_with_host_guard(net)
        rules = firewall.sandbox_rules(index, net.host_if, icfg.listen_port)
        firewall.add(rules)
        self.record = dataclasses.replace(
            self.record,
            cgroup=str(cgroup),
            netns_inode=network.netns_inode(net),
            hosts=tuple(entries),
        )
        self.registry.update(self.record)
        if self.ebpf:
            from candela_mitm.ebpf.guard import CgroupGuard
            from candela_mitm.ebpf.host import netns_cookie

            guard = CgroupGuard(
                allow_v4=[("127.0.0.1", 0)],  # the sandbox's own loopback
                allow_tcp_ports_v4=(80, 443),  # redirected to Candela by the firewall
                deny_udp_ports=(443, 853),  # QUIC, DNS over QUIC
                deny_all_v6=True,
                allow_dns_to=["127.0.0.1"],  # where resolv.conf points: no other resolver
                # only the firewall of this namespace redirects 80/443: from a namespace made
                # inside (unshare -Urn), or a process moved in from outside, they go nowhere
                netns_cookies=[netns_cookie(network.netns_path(net))],
            )
            guard.attach(str(cgroup))
            self.guard = guard  # attached: teardown stops it
        self._audit(
            SANDBOX_ACTION_START,
            sandbox=net.netns,
            address=net.sandbox_address,
            command=self.command[0],
            listen_port=icfg.listen_port,
            ebpf=bool(self.guard),
        )

    def _register_with_host_guard(self, net: Any) -> None:
        """With `candela enforce host` on, the host guard refuses provider connections from
        namespaces it does not know to be redirected to the proxy: this one is."""
        from candela_mitm.netns import network

        try:
            from candela_mitm.ebpf import host
        except ImportError:
            return
        if not Path(host.PIN_DIR, "redirected").exists():
            return
        try:
            cookie = host.netns_cookie(network.netns_path(net))
            host.register_netns(cookie)
        except OSError as e:
            log.warning("host enforcement is on but this sandbox could not be registered: %s", e)
            return
        self._netns_cookie = cookie

    def _stop_guard(self) -> None:
        self._drain_events(0)  # what it refused until the end is audited
        self.guard.detach()

    # running ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        from candela_mitm.certs.bundle import ca_env

        assert self.bundle is not None
        return {**os.environ, **ca_env(self.bundle)}

    def launcher(self) -> list[str]:
        from candela_mitm.enforcement import cgroups

        assert self.record is not None and self.etc_dir is not None
        argv = [sys.executable, "-m", "candela_mitm.netns.enter", "--netns", self.record.netns]
        argv += ["--etc", str(self.etc_dir)]
        if self.record.cgroup:
            argv += ["--cgroup", self.record.cgroup, "--readonly", str(cgroups.cgroup2_root())]
        return [*argv, "--", *self.command]

    def run(self) -> int:
        """Start CMD, pass signals on to it, audit what the guard refuses; CMD's exit status."""
        self._phase = "starting"
        # the command must not inherit the blocked signals; one that came during setup acts now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED_SIGNALS)
        self.proc = subprocess.Popen(self.launcher(), env=self.env())
        self._phase = "running"
        while self.proc.poll() is None:
            self._drain_events(100)
        code = self.proc.returncode
        self._drain_events(0)
        self._audit(
            SANDBOX_ACTION_STOP, sandbox=self.record.netns if self.record else None, exit_code=code
        )
        return code if code >= 0 else 128 - code

    def _drain_events(self, timeout_ms: int) -> None:
        if self.guard is None:
            if timeout_ms:
                time.sleep(timeout_ms / 1000)
            return
        from candela_mitm.enforcement.bypass import audit_record

        for ev in self.guard.poll(timeout_ms):
            print(f"candela run: {ev.describe()}", file=sys.stderr, flush=True)
            assert self.record is not None
            self._audit(
                *audit_record(
                    ev, sandbox=self.record.netns, user_id=self.user, tenant_id=self.tenant
                )
            )

    def _audit(self, action: str, fields: dict[str, Any] | None = None, **more: Any) -> None:
        if self.audit is None:
            return
        entry = {"user_id": self.user, "tenant_id": self.tenant, **(fields or {}), **more}
        if not self.audit.record(action, **entry):
            log.error("audit entry %s was not accepted", action)


# -- one run ----------------------------------------------------------------------------------


def run(
    config: Any,
    command: Sequence[str],
    *,
    user: str,
    tenant: str | None = None,
    add_hosts: Sequence[tuple[str, str]] = (),
    ebpf: bool = True,
    registry: SandboxRegistry | None = None,
) -> int:
    """`candela run`: clean up what killed runs left, run `command` in a sandbox, take it down.

    The command's exit status (128+N when a signal ended it, or ended the setup); 125 when the
    sandbox cannot be set up (the reason on stderr).
    """
    from candela_mitm.audit import AuditWriter

    registry = registry if registry is not None else SandboxRegistry()
    audit = AuditWriter(config.audit)
    audit.start()
    try:
        cleanup_leftovers(registry, audit)
        sandbox = Sandbox(
            config,
            registry,
            user=user,
            tenant=tenant,
            add_hosts=add_hosts,
            command=command,
            audit=audit,
            ebpf=ebpf,
        )
        try:
            with sandbox:
                return sandbox.run()
        except Interrupted as e:
            return 128 + e.signum
        except Exception as e:
            log.debug("sandbox setup failed", exc_info=True)
            print(f"candela run: cannot set up the sandbox: {e}", file=sys.stderr)
            return 125
    finally:
        audit.close()
