"""Host enforcement: `candela enforce host|off|status|exec`, every process's provider traffic via the proxy.

What `candela enforce host --proxy-port P` puts in place (as root):

1. Candela's own cgroup (v2, default `<root>/candela`): processes in it (the proxy, started with
   `candela enforce exec -- candela ...` or moved with `--proxy-pid`) are exempt from all of the
   below, so the proxy reaches the real providers. Exemption is by cgroup, not uid or mark:
   it needs no cooperation from mitmproxy and covers root processes as well.
2. iptables, nat table: chain CANDELA-ENFORCE, jumped to first from OUTPUT. It RETURNs for
   sockets of Candela's cgroup (`-m cgroup --path`) and, with a scope, for sockets outside it;
   then REDIRECTs every TCP 443 connection, whatever its address, to the proxy port, where the
   transparent listener decides by SNI (a provider host is governed, any other name relayed
   untouched, never decrypted): no list of resolved addresses to go stale when a provider's
   front end answers from a new one. Plain HTTP has no SNI: TCP 80 is redirected only to the
   provider addresses resolved at start. The chain is replaced atomically (`iptables-restore -n`).
3. eBPF (ebpf/guard.c, host policy) at the scope's cgroup (the v2 root by default), pinned in
   /sys/fs/bpf/candela:
   refuses what redirection cannot cover: UDP 443/853 (QUIC, DNS over QUIC), TCP 443 over IPv6
   to any address but loopback (IPv4's is redirected; clients fall back to it), IPv6 to providers,
   provider addresses on other ports, and provider connects from other network namespaces
   (containers, whose traffic the host's OUTPUT chain never sees).

Fail closed: the programs stay attached after this command exits (legacy attach, pinned) and
the redirect targets the proxy port whether or not the proxy runs, so with Candela stopped the
provider traffic of every other process gets "connection refused", never a way out.
Provider addresses are resolved once (DNS and /etc/hosts, or `--hosts-file`) for what is decided
by address (the eBPF refusals, plain HTTP, and the listener's refusal of a non-provider name or
no name at all towards a provider address): re-run `enforce host` when they change; re-running
replaces everything without a gap. HTTPS itself is decided by name and needs no re-run.

The scope (`--scope CGROUP`, interception.enforce_scope) confines all of it to the processes of
one cgroup and its descendants: a CI runner's jobs, a systemd slice of agents, a test's own group
on a machine others share. Without one, every process of the machine but Candela's is enforced.
`candela enforce off` removes the chain, the programs, the pins, the cgroup and the state file.
Refusals are counted in the pinned `counts` map (shown by `status`) and sent to the pinned ring
buffer. A proxy running in Candela's cgroup reads it (RefusalFeed) and audits each refusal.

`candela-server --enforce host` (or `interception.enforce: host`) does all of this at start for
its own transparent listener, with itself in Candela's cgroup (`enable_for_proxy`); when it
stops, enforcement stays until `candela enforce off` (fail closed).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from candela_mitm.config import Config
from candela_mitm.enforcement import cgroups
from candela_mitm.enforcement.iptables import Iptables
from candela_mitm.errors import ConfigError

log = logging.getLogger("candela.enforce")

CHAIN = "CANDELA-ENFORCE"
STATE_PATH = "/run/candela/enforce.json"
EVENTS_LOCK = "/run/candela/enforce-events.lock"  # held by the one proxy reading the refusals
DEFAULT_CGROUP = "candela-proxy"  # not "candela": sandboxes live under that one, never exempt
REDIRECT_PORTS = (80, 443)  # TCP ports to a provider address that reach the proxy, not refused
REDIRECT_ALL_PORTS = (443,)  # every destination: TLS carries the name the listener decides by
REDIRECT_PROVIDER_PORTS = (80,)  # only to provider addresses: plain HTTP names no server up front
DENY_UDP_PORTS = (443, 853)
# The providers' public API hosts that can be resolved ahead (providers.py base URLs, OpenAI's
# data-residency hosts, the regional Vertex and Bedrock endpoints of the default regions); the
# families (interception.py DEFAULT_HOSTS) are what the proxy intercepts by SNI. Config
# interception.hosts (its names, not its patterns) and --provider add more.
DEFAULT_PROVIDER_HOSTS = (
    "api.openai.com",
    *(f"{region}.api.openai.com" for region in ("us", "eu", "au", "in", "jp", "ae")),
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "us-east5-aiplatform.googleapis.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "bedrock-runtime-fips.us-east-1.amazonaws.com",
    "bedrock-mantle.us-east-1.api.aws",
)

Resolver = Callable[[str], list[str]]


# -- providers ---------------------------------------------------------------------------------


def parse_hosts(text: str) -> dict[str, list[str]]:
    """A hosts(5) file as {name: [addresses]} (names lowercased, order kept)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            addrs = out.setdefault(name.lower().rstrip("."), [])
            if ip not in addrs:
                addrs.append(ip)
    return out


def system_resolver(name: str) -> list[str]:
    """Addresses from the system resolver (DNS and /etc/hosts); [] when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    seen: list[str] = []
    for info in infos:
        ip = str(info[4][0]).split("%", 1)[0]
        if ip not in seen:
            seen.append(ip)
    return seen


def provider_names(
    interception_hosts: Iterable[str], extra: Iterable[str], *, defaults: bool = True
) -> list[str]:
    names = list(DEFAULT_PROVIDER_HOSTS) if defaults else []
    for n in [*interception_hosts, *extra]:
        n = n.lower().rstrip(".")
        if n and "*" not in n and n not in names:  # a family has no addresses to resolve
            names.append(n)
    return names


def resolve_providers(
    names: Iterable[str],
    *,
    hosts: dict[str, list[str]] | None = None,
    resolver: Resolver = system_resolver,
) -> dict[str, list[str]]:
    """{name: [addresses]}; names in `hosts` take its entries, the rest go to the resolver."""
    return {n: list(hosts[n]) if hosts and n in hosts else resolver(n) for n in names}


def split_families(resolved: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    for addrs in resolved.values():
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if isinstance(ip, ipaddress.IPv4Address):
                v4.add(ip)
            else:
                v6.add(ip)
    return [str(a) for a in sorted(v4)], [str(a) for a in sorted(v6)]


# -- iptables ----------------------------------------------------------------------------------


def restore_text(
    ipv4: Iterable[str], proxy_port: int, exempt_cgroup: str, scope: str | None = None
) -> str:
    """iptables-restore input that (re)defines the chain; with --noflush only it is replaced.

    `exempt_cgroup` and `scope` are cgroup paths relative to the v2 root (`-m cgroup --path`
    matches a socket's cgroup and its descendants); scope None or "/" enforces every process.
    """
    port = int(proxy_port)
    lines = [
        "*nat",
        f":{CHAIN} - [0:0]",
        f'-A {CHAIN} -m cgroup --path "{exempt_cgroup}" -j RETURN',
    ]
    if scope and scope != "/":
        lines.append(f'-A {CHAIN} -m cgroup ! --path "{scope}" -j RETURN')
    lines += [
        f"-A {CHAIN} -p tcp -m multiport --dports {','.join(map(str, REDIRECT_ALL_PORTS))} "
        f"-j REDIRECT --to-ports {port}"
    ]
    lines += [
        f"-A {CHAIN} -d {ip}/32 -p tcp -m multiport "
        f"--dports {','.join(map(str, REDIRECT_PROVIDER_PORTS))} -j REDIRECT --to-ports {port}"
        for ip in ipv4
    ]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass
class HostChain:
    """Candela's nat chain and the jump to it from OUTPUT, through the one iptables runner."""

    ipt: Iptables = field(default_factory=Iptables)

    def apply(self, text: str) -> None:
        p = self.ipt.restore(text)
        if p.returncode != 0:
            raise OSError(f"{self.ipt.binary}-restore failed: {p.stderr.strip()}")
        if not self.jumped() and not self.ipt.ok("nat", "-I", "OUTPUT", "1", "-j", CHAIN):
            raise OSError(f"cannot add the jump to {CHAIN} in nat OUTPUT")

    def rules(self) -> list[str] | None:
        """The chain's rules as `iptables -S` prints them; None if there is no chain."""
        p = self.ipt.table("nat", "-S", CHAIN)
        if p.returncode != 0:
            return None
        return [line for line in p.stdout.splitlines() if line.startswith("-A ")]

    def jumped(self) -> bool:
        return self.ipt.ok("nat", "-C", "OUTPUT", "-j", CHAIN)

    def remove(self) -> bool:
        """Drop every jump and the chain; True if anything was there."""
        found = False
        while self.ipt.ok("nat", "-D", "OUTPUT", "-j", CHAIN):
            found = True
        if self.ipt.ok("nat", "-F", CHAIN):
            found = True
            self.ipt.ok("nat", "-X", CHAIN)
        return found


# -- state -------------------------------------------------------------------------------------


@dataclass
class EnforceState:
    proxy_port: int
    cgroup: str  # absolute directory of Candela's cgroup
    providers: dict[str, list[str]]
    program_ids: list[int] = field(default_factory=list)
    installed_at: float = 0.0
    scope: str | None = None  # absolute directory of the enforced cgroup; None: the whole host

    def save(self, path: str = STATE_PATH) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        tmp.replace(p)

    @classmethod
    def load(cls, path: str = STATE_PATH) -> EnforceState | None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        try:
            return cls(**data)
        except TypeError:
            return None


def joined(pid: int | str = "self", state_path: str = STATE_PATH) -> bool:
    """Whether host enforcement is on and a process (default: this one) is in Candela's cgroup."""
    state = EnforceState.load(state_path)
    if state is None:
        return False
    try:
        mine = cgroups.cgroup_of(pid)
        return mine is not None and mine == cgroups.relative(state.cgroup)
    except (OSError, ValueError):
        return False


def join(pid: int | None = None, state_path: str = STATE_PATH) -> str | None:
    """Move a process (default: this one) into Candela's cgroup when host enforcement is on, so
    its connections to providers are not redirected back to the proxy; returns the cgroup."""
    state = EnforceState.load(state_path)
    if state is None or not Path(state.cgroup).is_dir():
        return None
    cgroups.join(state.cgroup, pid)
    return state.cgroup


# -- commands ----------------------------------------------------------------------------------


def enable(
    names: Sequence[str],
    proxy_port: int,
    *,
    hosts: dict[str, list[str]] | None = None,
    cgroup: str = DEFAULT_CGROUP,
    proxy_pids: Iterable[int] = (),
    scope: str | None = None,
    state_path: str = STATE_PATH,
    chain: HostChain | None = None,
    out: Any = None,
) -> EnforceState:
    """Put host enforcement in place for these provider names (see the module docstring) and save
    its state; prints what it resolved and did to `out`. `scope`: an existing cgroup (name or
    path under the v2 root) to confine it to; None: every process of the host.

    FileNotFoundError if the scope does not exist, ValueError if it is (inside) Candela's own
    cgroup; OSError if the kernel or iptables refuses.
    """
    from candela_mitm.ebpf import host

    out = out if out is not None else sys.stdout
    chain = chain if chain is not None else HostChain()
    resolved = resolve_providers(names, hosts=hosts)
    v4, v6 = split_families(resolved)
    for name, addrs in resolved.items():
        print(f"  {name}: {', '.join(addrs) or 'does not resolve (not enforced)'}", file=out)
    if not v4 and not v6:
        # HTTPS is decided by name whatever the addresses; what is decided by address is not
        print(
            "  warning: no provider address resolved: HTTPS is governed by its server name all "
            "the same, but plain HTTP, TLS without a name and other ports towards providers are "
            "not refused; give addresses with --hosts-file (hosts(5) format) or fix DNS",
            file=out,
        )

    root = cgroups.cgroup2_root()
    scope_dir = enforced_scope(scope, root)
    cg = cgroups.create(cgroup, root)
    if scope_dir is not None and (cg == scope_dir or scope_dir in cg.parents):
        raise ValueError(f"the scope {scope_dir} cannot be (inside) Candela's own cgroup {cg}")
    for pid in proxy_pids:
        cgroups.join(cg, pid)
    policy = host.HostPolicy(
        providers=tuple(v4 + v6),
        exempt_cgroups=(str(cg),),
        redirect_ports=REDIRECT_PORTS,
        deny_udp_ports=DENY_UDP_PORTS,
        deny_v6_tcp_ports=REDIRECT_ALL_PORTS,
    )
    attach = scope_dir if scope_dir is not None else root
    before = EnforceState.load(state_path)
    try:
        ids = host.install(policy, root=attach)
    except (OSError, ImportError):
        raise
    except Exception as e:  # bcc reports compile and load failures as bare Exception
        raise OSError(f"loading the eBPF programs failed: {e}") from e
    previous = Path(before.scope) if before and before.scope else root
    if before is not None and previous != attach:
        host.detach(previous)  # enforcement moved to another scope: the old one is left alone
    rel_scope = cgroups.relative(scope_dir, root) if scope_dir is not None else None
    chain.apply(restore_text(v4, proxy_port, cgroups.relative(cg, root), rel_scope))
    state = EnforceState(
        proxy_port, str(cg), resolved, ids, time.time(), str(scope_dir) if scope_dir else None
    )
    state.save(state_path)
    who = f"the processes of {scope_dir}" if scope_dir else "every process"
    print(
        f"candela enforce: on for {who}. TCP {'/'.join(map(str, REDIRECT_ALL_PORTS))} to any address and TCP "
        f"{'/'.join(map(str, REDIRECT_PROVIDER_PORTS))} to {len(v4)} provider address(es) "
        f"-> port {proxy_port}; eBPF programs {ids} at {attach} pinned in {host.PIN_DIR}; "
        f"exempt cgroup {cg}",
        file=out,
    )
    return state


def enforced_scope(scope: str | None, root: Path | None = None) -> Path | None:
    """The directory of the scope cgroup (None: the whole host); FileNotFoundError if it is not
    there: enforcement confined to a cgroup nobody is in would enforce nothing."""
    if not scope or scope.strip("/") == "":
        return None
    path = cgroups.resolve(scope, root)
    if not path.is_dir():
        raise FileNotFoundError(f"scope cgroup {path} does not exist (create it, or leave it out)")
    return path


def enable_for_proxy(
    config: Config, *, state_path: str = STATE_PATH, out: Any = None
) -> EnforceState:
    """`candela-server --enforce host`: host enforcement towards this proxy's transparent
    listener (`candela enforce host --proxy-port <interception.listen_port>`, providers from
    interception.hosts and the defaults), with this process in Candela's exempt cgroup before
    anything is redirected. Call it before the proxy forks workers: they inherit the cgroup.

    ConfigError unless mode is transparent with a fixed listen port; PermissionError without
    root; FileNotFoundError, ValueError, OSError as `enable`.
    """
    if config.mode != "transparent":
        raise ConfigError(
            "enforce host needs transparent mode (`mode: transparent` or --mode transparent): "
            "provider traffic is redirected to the transparent listener"
        )
    port = config.interception.listen_port
    if not port:
        raise ConfigError("enforce host needs a fixed interception.listen_port, not 0")
    if os.geteuid() != 0:
        raise PermissionError("enforce host needs root (iptables, eBPF, cgroups)")
    names = provider_names(config.interception.hosts, ())
    return enable(
        names,
        port,
        proxy_pids=(os.getpid(),),
        scope=config.interception.enforce_scope,
        state_path=state_path,
        out=out,
    )


class RefusalFeed:
    """The host guard's refusals into the audit trail: a thread of the proxy reads the pinned ring
    buffer and records each as a `bypass_attempt` entry (enforcement="host"), from which
    candela_bypass_attempts_total is counted.

    One reader per host (a ring buffer has one consumer position): the feed holding an flock on
    `lock_path` reads; the others (workers, a second proxy) wait and take over when it exits.
    Refusals made while no proxy reads wait in the ring buffer, as many as fit. An entry the
    audit writer does not accept is counted in `lost` and logged: the kernel refused the
    connection all the same.
    """

    def __init__(
        self,
        record: Callable[..., bool],
        *,
        pin_dir: str | None = None,
        lock_path: str = EVENTS_LOCK,
        poll_ms: int = 200,
        retry_s: float = 1.0,
    ) -> None:
        self.record = record
        self.pin_dir = pin_dir
        self.lock_path = lock_path
        self.poll_ms = poll_ms
        self.retry_s = retry_s  # how often a waiting feed tries the lock again
        self.recorded = 0
        self.lost = 0
        self.reading = threading.Event()  # set while this feed holds the lock and reads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="candela-refusals", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain what the ring buffer holds into the audit writer, then stop (before it closes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _lock(self) -> int | None:
        Path(self.lock_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _run(self) -> None:
        from candela_mitm.ebpf import host

        while not self._stop.is_set():
            try:
                fd = self._lock()
            except OSError as e:
                log.warning("host refusals: cannot take %s: %s", self.lock_path, e)
                fd = None
            if fd is None:
                self._stop.wait(self.retry_s)
                continue
            try:
                with host.PinnedEvents(self.pin_dir or host.PIN_DIR) as events:
                    self.reading.set()
                    while not self._stop.is_set():
                        self._audit(events.poll(self.poll_ms))
                    self._audit(events.poll(0))
            except Exception as e:  # reading fails open: the kernel refuses all the same
                log.warning("host refusals: reading the ring buffer failed: %s", e)
                self._stop.wait(self.retry_s)
            finally:
                self.reading.clear()
                os.close(fd)  # releases the lock

    def _audit(self, events: Sequence[Any]) -> None:
        from candela_mitm.enforcement.bypass import audit_record

        for ev in events:
            action, fields = audit_record(ev, enforcement="host")
            if self.record(action, **fields):
                self.recorded += 1
            else:
                self.lost += 1
                log.error(
                    "host refusal not audited (the audit queue refused it): %s", ev.describe()
                )


def start_refusal_feed(
    record: Callable[..., bool], state_path: str = STATE_PATH
) -> RefusalFeed | None:
    """A running RefusalFeed when host enforcement is on and this process is in Candela's cgroup
    (started with --enforce host or `candela enforce exec`); None otherwise."""
    if not joined(state_path=state_path):
        return None
    feed = RefusalFeed(record)
    feed.start()
    return feed


# -- off and status ------------------------------------------------------------------------------


@dataclass
class Removal:
    """What `disable` took away, and what it could not."""

    programs: int  # eBPF programs detached
    chain: bool  # the nat chain (or a jump to it) was there
    cgroup: str | None  # Candela's cgroup, removed (or tried: see failures)
    failures: list[str]


def disable(
    *, state_path: str = STATE_PATH, cgroup: str = DEFAULT_CGROUP, chain: HostChain | None = None
) -> Removal:
    """Remove host enforcement: the programs and pins, the chain, Candela's cgroup (from the
    state file, else `cgroup` under the v2 root) and the state file. Every piece is attempted."""
    from candela_mitm.ebpf import host

    chain = chain if chain is not None else HostChain()
    state = EnforceState.load(state_path)
    failures = []
    try:
        n = host.uninstall(root=Path(state.scope) if state and state.scope else None)
    except OSError as e:
        n = 0
        failures.append(f"eBPF: {e}")
    removed = chain.remove()
    cg = state.cgroup if state else None
    if cg is None:
        try:
            cg = str(cgroups.resolve(cgroup))
        except (FileNotFoundError, ValueError):
            cg = None
    if cg:
        try:
            cgroups.remove(cg)
        except OSError as e:
            failures.append(f"cgroup {cg}: {e}")
    Path(state_path).unlink(missing_ok=True)
    return Removal(n, removed, cg, failures)


def collect_status(
    *, state_path: str = STATE_PATH, chain: HostChain | None = None
) -> dict[str, Any]:
    """What is in place: state, programs, chain and jump, the exempt cgroup's members, refusal
    counts; `active` when every part is, `partial` when only some are."""
    from candela_mitm.ebpf import host

    chain = chain if chain is not None else HostChain()
    state = EnforceState.load(state_path)
    attach = Path(state.scope) if state and state.scope else None
    try:
        programs = [{"hook": h, "id": i, "name": n} for h, i, n in host.attached(attach)]
    except (OSError, FileNotFoundError):
        programs = []
    cg = state.cgroup if state else None
    members = cgroups.pids(cg) if cg and Path(cg).is_dir() else []
    try:
        counts = host.pinned_counts()
    except OSError:
        counts = {}
    status = {
        "state": asdict(state) if state else None,
        "programs": programs,
        "pinned": Path(host.PIN_DIR).is_dir(),
        "chain": chain.rules(),
        "jump": chain.jumped(),
        "cgroup_pids": members,
        "refusals": counts,
    }
    parts = [bool(programs), status["chain"] is not None, bool(status["jump"]), state is not None]
    status["active"] = all(parts)
    status["partial"] = any(parts) and not all(parts)
    return status
