"""Governed sandboxes: `candela run` and the registry that lets the proxy attribute their traffic.

`candela run [--user U] [--tenant T] [--add-host NAME:IP] -- CMD ARGS...` runs CMD unchanged in
its own network namespace and cgroup. Its TCP to ports 80 and 443 is redirected to Candela's
transparent listener; everything else it sends is dropped (iptables) and refused with EPERM and
audited (the eBPF guard). The registry (one JSON file per sandbox under the run directory) maps
the sandbox's source address to its user and tenant; the proxy reads it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import getpass
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from candela_mitm.enforcement import procnet

log = logging.getLogger("candela.sandbox")

RUN_DIR_ENV = "CANDELA_RUN_DIR"
DEFAULT_RUN_DIR = "/run/candela"
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


def run_dir() -> Path:
    """Where sandboxes are registered: $CANDELA_RUN_DIR, else /run/candela."""
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


# -- the registry ---------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): a pid plus this names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields resume after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


@dataclass(frozen=True)
class SandboxRecord:
    """One running sandbox, as the proxy needs to know it."""

    index: int
    address: str  # the sandbox's own address: the source the proxy sees
    user: str
    tenant: str | None
    pid: int  # the `candela run` that owns the sandbox
    pid_start: int | None
    netns: str
    host_if: str
    cgroup: str | None = None
    netns_inode: int | None = None
    hosts: tuple[tuple[str, str], ...] = ()  # (name, address) the sandbox resolves
    command: str = ""
    started: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.netns

    def owner_alive(self) -> bool:
        start = process_start_time(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SandboxRecord:
        data = json.loads(text)
        data["hosts"] = tuple(tuple(h) for h in data.get("hosts") or ())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class SandboxRegistry:
    """One JSON file per sandbox, `<run_dir>/sandboxes/<index>.json`, published atomically.

    Claiming an index is creating its file (os.link refuses an existing name), so two `candela
    run` never share one. Readers reload only when the folder changes (its mtime), which keeps
    a lookup on the proxy's event loop to one stat().
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else run_dir()
        self.dir = self.root / "sandboxes"
        self._stamp: int | None = None
        self._records: dict[int, SandboxRecord] = {}
        self._by_address: dict[str, SandboxRecord] = {}

    def _path(self, index: int) -> Path:
        return self.dir / f"{index}.json"

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o755)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Claims and leftover cleanup exclude each other (an flock on `<root>/sandboxes.lock`).

        A run claims its record before it creates anything and releases it after removing
        everything, so under this lock a namespace, veth, rule or cgroup with no record is a
        leftover, never a sandbox being built.
        """
        self._ensure_dir()
        fd = os.open(self.root / "sandboxes.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def claim(
        self,
        make: Callable[[int], SandboxRecord],
        in_use: Callable[[], set[int]] = set,
        limit: int = 16384,
    ) -> SandboxRecord:
        """The record `make(index)` for the lowest index with no record and nothing `in_use`
        reports, published; OSError if none is free."""
        with self.locked():
            taken = {int(p.stem) for p in self.dir.glob("*.json") if p.stem.isdigit()}
            taken |= in_use()
            for index in range(limit):
                if index in taken:
                    continue
                record = make(index)
                if self._publish(index, record.to_json(), replace=False):
                    return record
        raise OSError(errno.ENOSPC, "no free sandbox index")

    def update(self, record: SandboxRecord) -> None:
        """Rewrite a claimed record (atomically: readers see the old or the new one)."""
        self._publish(record.index, record.to_json(), replace=True)

    def _publish(self, index: int, text: str, replace: bool) -> bool:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{index}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            if replace:
                os.replace(tmp, self._path(index))
                return True
            try:
                os.link(tmp, self._path(index))
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def release(self, index: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(index).unlink()

    def _reload(self) -> None:
        try:
            stamp = os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and stamp is not None:
            return
        records: dict[int, SandboxRecord] = {}
        if stamp is not None:
            for p in self.dir.glob("*.json"):
                if not p.stem.isdigit():
                    continue
                try:
                    records[int(p.stem)] = SandboxRecord.from_json(p.read_text())
                except (OSError, ValueError, TypeError) as e:
                    log.warning("ignoring sandbox record %s: %s", p, e)
        self._stamp = stamp
        self._records = records
        self._by_address = {r.address: r for r in records.values()}

    def records(self) -> list[SandboxRecord]:
        self._reload()
        return sorted(self._records.values(), key=lambda r: r.index)

    def lookup(self, address: str | None) -> SandboxRecord | None:
        """The sandbox a source address belongs to (IPv4-mapped IPv6 is read as IPv4)."""
        if not address:
            return None
        self._reload()
        if address.startswith("::ffff:"):
            address = address[len("::ffff:") :]
        return self._by_address.get(address)

    def get(self, index: int) -> SandboxRecord | None:
        self._reload()
        return self._records.get(index)


def peer_process(record: SandboxRecord, address: str, port: int) -> tuple[int, str] | None:
    """(pid, comm) of the sandboxed process whose TCP socket has this local address and port.

    Reads /proc: the processes in the sandbox's network namespace, the socket's inode from their
    TCP table, then which of them holds it. For audit entries of proxy-side refusals; slow (a
    scan of /proc), so call it off the event loop and only when refusing.
    """
    if record.netns_inode is None:
        return None
    members = _pids_in_netns(record.netns_inode)
    if not members:
        return None
    inode = None
    for pid in members:
        try:
            table = Path(f"/proc/{pid}/net/tcp").read_text()
        except OSError:
            continue
        inode = procnet.socket_inode(table, address, port)
        break  # every member shares the namespace's table
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in members:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) == target:
                        comm = Path(f"/proc/{pid}/comm").read_text().strip()
                        return pid, comm
        except OSError:
            continue
    return None


# -- building one sandbox -------------------------------------------------------------------


def parse_add_host(value: str) -> tuple[str, str]:
    """NAME:IP (IPv4; IPv6 is dropped in a sandbox anyway, so it is refused here)."""
    name, sep, ip = value.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--add-host wants NAME:IP, got {value!r}")
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--add-host {value!r}: {ip!r} is not an IPv4 address"
        ) from None
    return name.strip().lower().rstrip("."), str(addr)


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
    """The sandbox's name table: --add-host first, then every provider host.

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
    """Everything one `candela run` creates, undone in reverse order however the run ends."""

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
        self._undo = contextlib.ExitStack()
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
            self._undo.close()
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
        index = self.record.index
        self._undo.callback(self.registry.release, index)
        net = network.SandboxNet(index)

        # /etc files and the CA bundle, in the run directory
        self.etc_dir = self.registry.root / "etc" / net.netns
        shutil.rmtree(self.etc_dir, ignore_errors=True)
        self.etc_dir.mkdir(parents=True, mode=0o755)
        self._undo.callback(shutil.rmtree, self.etc_dir, True)
        ensure_ca(icfg.certs_dir)
        self.bundle = build_bundle(
            ca_certificate_pem(icfg.certs_dir), self.registry.root / "etc" / f"{net.netns}-ca.pem"
        )
        self._undo.callback(_unlink, self.bundle)
        host_map = HostMap(icfg.hosts)
        entries = sandbox_hosts(self.add_hosts, host_map.exact_names(), net.host_address)
        (self.etc_dir / "hosts").write_text(hosts_file(entries))
        (self.etc_dir / "resolv.conf").write_text(RESOLV_CONF)

        cgroup = cgroups.create(f"{CGROUP_PARENT}/sandbox-{index}")
        self._undo.callback(_remove_cgroup, cgroup)
        network.create(net)
        self._undo.callback(network.remove, net)
        self._register_with_host_guard(net)
        rules = firewall.sandbox_rules(index, net.host_if, icfg.listen_port)
        firewall.add(rules)
        self._undo.callback(firewall.delete, rules)
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

            self.guard = CgroupGuard(
                allow_v4=[("127.0.0.1", 0)],  # the sandbox's own loopback
                allow_tcp_ports_v4=(80, 443),  # redirected to Candela by the firewall
                deny_udp_ports=(443, 853),  # QUIC, DNS over QUIC
                deny_all_v6=True,
                allow_dns_to=["127.0.0.1"],  # where resolv.conf points: no other resolver
                # only the firewall of this namespace redirects 80/443: from a namespace made
                # inside (unshare -Urn), or a process moved in from outside, they go nowhere
                netns_cookies=[netns_cookie(network.netns_path(net))],
            )
            self.guard.attach(str(cgroup))
            self._undo.callback(self._stop_guard)
        # registered last, so it runs first: nothing may outlive the sandbox in it
        self._undo.callback(_kill_members, cgroup, net)
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
        self._undo.callback(_unregister_netns, cookie)

    def _stop_guard(self) -> None:
        self._drain_events(0)
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


def _unregister_netns(cookie: int) -> None:
    from candela_mitm.ebpf import host

    with contextlib.suppress(OSError):
        host.register_netns(cookie, redirected=False)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_cgroup(path: Path) -> None:
    from candela_mitm.enforcement import cgroups

    cgroups.remove(path)


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
        for pid in _pids_in_netns(inode):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        alive = (cgroup is not None and cgroup.is_dir() and bool(_safe_pids(cgroup))) or (
            inode is not None and bool(_pids_in_netns(inode))
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


def _pids_in_netns(inode: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino == inode:
                    out.append(int(entry.name))
    return out


# -- leftovers ------------------------------------------------------------------------------


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
            root: Path | None = cgroups.cgroup2_root()
            groups = {
                int(p.name.split("-", 1)[1])
                for p in (cgroups.cgroup2_root() / CGROUP_PARENT).glob("sandbox-*")
                if p.name.split("-", 1)[1].isdigit()
            }
        except (FileNotFoundError, OSError):
            root, groups = None, set()
        records = registry.records()
        live = {r.index for r in records if r.owner_alive()}
        stale_records = {r.index: r for r in records if r.index not in live}
        indexes = (set(stale_records) | present | tagged | groups) - live
        for index in sorted(indexes):
            cgroup = (root / CGROUP_PARENT / f"sandbox-{index}") if root is not None else None
            _teardown_index(registry, index, cgroup)
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


def _teardown_index(registry: SandboxRegistry, index: int, cgroup: Path | None) -> None:
    """Every piece of one sandbox, each attempted even when another fails."""
    from candela_mitm.enforcement import cgroups
    from candela_mitm.netns import firewall, network

    net = network.SandboxNet(index)
    steps: list[tuple[str, Callable[[], object]]] = [
        ("processes", lambda: _kill_members(cgroup, net)),
        ("firewall", lambda: firewall.delete_tagged({index})),
        ("network", lambda: network.remove(net)),
        ("cgroup", lambda: cgroups.remove(cgroup) if cgroup is not None else None),
        ("files", lambda: shutil.rmtree(registry.root / "etc" / net.netns, ignore_errors=True)),
        ("bundle", lambda: _unlink(registry.root / "etc" / f"{net.netns}-ca.pem")),
        ("record", lambda: registry.release(index)),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as e:  # one stuck piece must not keep the others
            log.warning("cleaning sandbox %d (%s): %s", index, what, e)


# -- the command ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="candela run",
        description="Run a command with all its LLM traffic governed by Candela (needs root).",
    )
    p.add_argument("--config", metavar="PATH", help="YAML config (interception, audit)")
    p.add_argument(
        "--user", help="whom its requests are attributed to (default: the invoking user)"
    )
    p.add_argument("--tenant", help="the tenant its requests act for (default: the user's first)")
    p.add_argument(
        "--add-host",
        metavar="NAME:IP",
        action="append",
        default=[],
        type=parse_add_host,
        help="resolve NAME to IP inside the sandbox (repeatable)",
    )
    p.add_argument(
        "--no-ebpf",
        action="store_true",
        help="run without the eBPF guard (namespace and firewall only; refusals not audited)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return p


def default_user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command: candela run [options] -- CMD ARGS...")
    if os.geteuid() != 0:
        print("candela run: needs root (network namespaces, iptables, cgroups)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING,
        format="candela run: %(message)s",
    )
    if os.environ.get("CANDELA_DEBUG"):
        log.setLevel(logging.DEBUG)
    from candela_mitm.audit import AuditWriter
    from candela_mitm.config import load_config
    from candela_mitm.errors import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"candela run: config error:\n{e}", file=sys.stderr)
        return 2
    registry = SandboxRegistry()
    audit = AuditWriter(config.audit)
    audit.start()
    try:
        cleanup_leftovers(registry, audit)
        _warn_if_no_listener(config.interception.listen_port)
        sandbox = Sandbox(
            config,
            registry,
            user=args.user or default_user(),
            tenant=args.tenant,
            add_hosts=args.add_host,
            command=command,
            audit=audit,
            ebpf=not args.no_ebpf,
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


def _warn_if_no_listener(port: int) -> None:
    if not procnet.listening(port):
        print(
            f"candela run: nothing listens on port {port}: start Candela with "
            "`mode: transparent` (its traffic will fail until then)",
            file=sys.stderr,
        )
