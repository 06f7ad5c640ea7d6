"""Governed sandboxes: what one `candela run` builds around a command, and takes down again.

`candela run [--user U] [--tenant T] [--add-host NAME:IP] -- CMD ARGS...` (cli/run.py) runs CMD
unchanged in its own network namespace and cgroup. Its TCP to ports 80 and 443 is redirected to
Candela's transparent listener; everything else it sends is dropped (iptables) and refused with
EPERM and audited (the eBPF guard). Its record in the registry (registry.py) maps the sandbox's
source address to its user and tenant; the proxy reads it.

A sandbox is taken down by one function, `teardown`, however it ends: when its command exits,
when setting it up fails or is interrupted, and when a later run finds it left over by a run
that was killed (`cleanup_leftovers`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from candela_mitm.enforcement.registry import (
    SandboxRecord,
    SandboxRegistry,
    pids_in_netns,
    process_start_time,
)

log = logging.getLogger("candela.sandbox")

SANDBOX_ACTION_START = "sandbox_start"
SANDBOX_ACTION_STOP = "sandbox_stop"
SANDBOX_ACTION_CLEANUP = "sandbox_cleanup"
CGROUP_PARENT = "candela"
# Name lookups inside go to the sandbox's own loopback, where nothing answers: a name that is not
# in its hosts file fails at once instead of after resolver timeouts (UDP out is dropped).
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
RESOLVE_TIMEOUT_S = 3.0
RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A signal arrived while the sandbox was being set up: what exists is taken down."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


# -- building one sandbox -------------------------------------------------------------------


def resolve_ipv4(names: Sequence[str], timeout: float = RESOLVE_TIMEOUT_S) -> dict[str, str]:
    """The first IPv4 address of each name that resolves within the timeout (in parallel)."""
    if not names:
        return {}

    def one(name: str) -> str | None:
        try:
            infos = socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            return None
        return str(infos[0][4][0]) if infos else None

    out: dict[str, str] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(names)))
    futures = {pool.submit(one, n): n for n in names}
    try:
        for fut in concurrent.futures.as_completed(futures, timeout=timeout):
            ip = fut.result()
            if ip:
                out[futures[fut]] = ip
    except concurrent.futures.TimeoutError:
        log.warning("name resolution did not finish in %.0fs; using the sandbox gateway", timeout)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def sandbox_hosts(
    add_hosts: Sequence[tuple[str, str]],
    provider_names: Sequence[str],
    gateway: str,
    resolve: Callable[[Sequence[str]], dict[str, str]] = resolve_ipv4,
) -> list[tuple[str, str]]:
    """The sandbox's name table: the given entries (--add-host) first, then every provider host.

    A provider host that does not resolve here maps to the sandbox's gateway: its port 443 is
    redirected to Candela like any other address, and Candela routes by SNI, so the app reaches
    its provider (through Candela) even where it could not resolve the name itself.
    """
    given = {name for name, _ in add_hosts}
    wanted = [n for n in provider_names if n not in given]
    resolved = resolve(wanted)
    return list(add_hosts) + [(n, resolved.get(n, gateway)) for n in wanted]


def hosts_file(entries: Sequence[tuple[str, str]], system: str = "/etc/hosts") -> str:
    lines = ["# written by candela run: the sandbox's names come first", "127.0.0.1\tlocalhost"]
    lines += [f"{ip}\t{name}" for name, ip in entries]
    with contextlib.suppress(OSError):  # a host without one
        lines += ["", "# the host's /etc/hosts", Path(system).read_text()]
    return "\n".join(lines) + "\n"


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


# -- taking sandboxes down ------------------------------------------------------------------


def _unregister_netns(cookie: int) -> None:
    from candela_mitm.ebpf import host

    with contextlib.suppress(OSError):
        host.register_netns(cookie, redirected=False)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _kill_members(cgroup: Path | None, net: Any) -> None:
    """SIGKILL whatever is left in the sandbox: its cgroup and, if it left that, its namespace."""
    from candela_mitm.enforcement import cgroups
    from candela_mitm.netns import network

    if cgroup is not None and cgroup.is_dir():
        kill = cgroup / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        with contextlib.suppress(OSError):
            for pid in cgroups.pids(cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    inode = network.netns_inode(net)
    if inode is not None:
        for pid in pids_in_netns(inode):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        alive = (cgroup is not None and cgroup.is_dir() and bool(_safe_pids(cgroup))) or (
            inode is not None and bool(pids_in_netns(inode))
        )
        if not alive:
            return
        time.sleep(0.02)


def _safe_pids(cgroup: Path) -> list[int]:
    from candela_mitm.enforcement import cgroups

    try:
        return cgroups.pids(cgroup)
    except OSError:
        return []


def cgroup_name(index: int) -> str:
    """Sandbox `index`'s cgroup, relative to the cgroup v2 root."""
    return f"{CGROUP_PARENT}/sandbox-{index}"


def bundle_path(registry: SandboxRegistry, net: Any) -> Path:
    """The CA bundle a sandbox's programs trust (Candela's CA with the system's)."""
    return registry.root / "etc" / f"{net.netns}-ca.pem"


def teardown(
    registry: SandboxRegistry,
    index: int,
    *,
    stop_guard: Callable[[], None] | None = None,
    netns_cookie: int | None = None,
) -> None:
    """Take down whatever exists of sandbox `index`, in reverse order of creation, each piece
    attempted even when another fails (and logged): the one cleanup path, for a run that ends,
    a setup that fails half-way, and a leftover of a run that was killed.

    The processes go first (nothing may outlive the sandbox in it); `stop_guard` (the run's own
    eBPF guard: its last refusals are audited, then it detaches) and `netns_cookie` (the
    namespace registered with the host guard) are what only a live run holds. The record goes
    last: until then no other run can claim the index.
    """
    from candela_mitm.enforcement import cgroups
    from candela_mitm.netns import firewall, network

    net = network.SandboxNet(index)
    try:
        cgroup: Path | None = cgroups.resolve(cgroup_name(index))
    except (FileNotFoundError, ValueError):  # no cgroup v2 here: none was made
        cgroup = None
    steps: list[tuple[str, Callable[[], object] | None]] = [
        ("processes", lambda: _kill_members(cgroup, net)),
        ("guard", stop_guard),
        ("firewall", lambda: firewall.delete_tagged({index})),
        ("host guard", None if netns_cookie is None else lambda: _unregister_netns(netns_cookie)),
        ("network", lambda: network.remove(net)),
        ("cgroup", None if cgroup is None else lambda: cgroups.remove(cgroup)),
        ("files", lambda: shutil.rmtree(registry.root / "etc" / net.netns, ignore_errors=True)),
        ("bundle", lambda: _unlink(bundle_path(registry, net))),
        ("record", lambda: registry.release(index)),
    ]
    for what, step in steps:
        if step is None:
            continue
        try:
            step()
        except Exception as e:  # one stuck piece must not keep the others
            log.warning("cleaning sandbox %d (%s): %s", index, what, e)


def cleanup_leftovers(registry: SandboxRegistry, audit: Any = None) -> list[int]:
    """Remove what killed runs left behind: their namespaces, veths, rules, cgroups and records.

    A sandbox is left over when its record's owner is dead, or when its namespace, veth or rules
    exist with no record at all. Live sandboxes are never touched. Returns the indexes cleaned.
    """
    from candela_mitm.enforcement import cgroups
    from candela_mitm.netns import firewall, network

    with registry.locked():
        present = network.sandbox_indexes_present()
        tagged = {i for i, _ in firewall.tagged_rules("iptables")} | {
            i for i, _ in firewall.tagged_rules("ip6tables")
        }
        try:
            groups = {
                int(p.name.split("-", 1)[1])
                for p in (cgroups.cgroup2_root() / CGROUP_PARENT).glob("sandbox-*")
                if p.name.split("-", 1)[1].isdigit()
            }
        except (FileNotFoundError, OSError):
            groups = set()
        records = registry.records()
        live = {r.index for r in records if r.owner_alive()}
        stale_records = {r.index: r for r in records if r.index not in live}
        indexes = (set(stale_records) | present | tagged | groups) - live
        for index in sorted(indexes):
            teardown(registry, index)
            if audit is not None:
                rec = stale_records.get(index)
                audit.record(
                    SANDBOX_ACTION_CLEANUP,
                    sandbox=network.SandboxNet(index).netns,
                    user_id=rec.user if rec else None,
                    tenant_id=rec.tenant if rec else None,
                    owner_pid=rec.pid if rec else None,
                )
    return sorted(indexes)


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
