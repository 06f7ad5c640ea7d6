"""Sandbox entry: become the sandboxed program (cgroup, network namespace, its own /etc files, fewer
capabilities), then exec it.

Run as `python -m candela_mitm.netns.enter --netns NAME [--cgroup DIR] [--etc DIR] -- CMD ARGS...`
by `candela run`. The program keeps this process's pid, so what the kernel reports about it (pid,
comm) is the program's from its first instruction.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Sequence

from candela_mitm.enforcement import cgroups

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
NETNS_RUN_DIR = "/run/netns"

# Capabilities that reach around the sandbox's network: joining or making namespaces (SYS_ADMIN),
# changing routes and firewall (NET_ADMIN), raw packets (NET_RAW), other processes' memory
# (SYS_PTRACE), the kernel itself (SYS_MODULE, SYS_RAWIO, BPF, PERFMON, SYS_BOOT), file handles
# outside the mount namespace (DAC_READ_SEARCH), and the LSMs (MAC_ADMIN, MAC_OVERRIDE).
DROPPED_CAPS = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def join_netns(name: str) -> None:
    fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {name}")
    finally:
        os.close(fd)


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    _check(_libc.mount(src, target.encode(), None, flags, None), f"mount {target}")


def private_etc(etc_dir: str | None, readonly: Sequence[str]) -> None:
    """A mount namespace of our own: /etc files from etc_dir bound over the host's (as `ip netns
    exec` does with /etc/netns/<name>), and the given mounts read-only in it."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    # slave: nothing mounted here propagates back to the host
    _mount(None, "/", MS_REC | MS_SLAVE)
    if etc_dir:
        for name in sorted(os.listdir(etc_dir)):
            target = os.path.join("/etc", name)
            if os.path.isfile(target):
                _mount(os.path.join(etc_dir, name), target, MS_BIND)
    for target in readonly:
        if os.path.isdir(target):
            _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY)


def drop_capabilities() -> None:
    for cap in DROPPED_CAPS.values():
        rc = _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        if rc != 0 and ctypes.get_errno() != 22:  # EINVAL: the kernel does not know this cap
            _check(rc, f"drop capability {cap}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="candela-sandbox-enter")
    p.add_argument("--netns", required=True)
    p.add_argument("--cgroup")
    p.add_argument("--etc", help="folder of files to bind over /etc/<name> (hosts, resolv.conf)")
    p.add_argument("--readonly", action="append", default=[], help="mount to make read-only")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no command")
    try:
        if args.cgroup:
            cgroups.join(args.cgroup)
        join_netns(args.netns)
        private_etc(args.etc, args.readonly)
        drop_capabilities()
    except OSError as e:
        print(f"candela run: cannot enter the sandbox: {e}", file=sys.stderr)
        return 126
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"candela run: {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126


if __name__ == "__main__":
    raise SystemExit(main())
