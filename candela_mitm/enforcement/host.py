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

The pieces: addresses.py (which provider addresses), host_chain.py (the nat chain),
refusals.py (the refusals into the audit trail); here the state file and the commands.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from candela_mitm.config import Config
from candela_mitm.enforcement import cgroups
from candela_mitm.enforcement.addresses import provider_names, resolve_providers, split_families
from candela_mitm.enforcement.host_chain import (
    REDIRECT_ALL_PORTS,
    REDIRECT_PROVIDER_PORTS,
    HostChain,
    restore_text,
)
from candela_mitm.errors import ConfigError

STATE_PATH = "/run/candela/enforce.json"
DEFAULT_CGROUP = "candela-proxy"  # not "candela": sandboxes live under that one, never exempt
REDIRECT_PORTS = (80, 443)  # TCP ports to a provider address that reach the proxy, not refused
DENY_UDP_PORTS = (443, 853)


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
