"""Control groups (v2): find the unified mount, create and remove groups, move processes in."""

from __future__ import annotations

import errno
import functools
import os
import re
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

PROC_MOUNTS = "/proc/mounts"
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    """Entries of a /proc/mounts (or /proc/self/mountinfo-free fstab-style) text."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mounts.append(
            Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2], tuple(parts[3].split(",")))
        )
    return mounts


def find_cgroup2_mount(mounts_text: str) -> str | None:
    """Where cgroup v2 is mounted (`/sys/fs/cgroup` or, on hybrid hosts, `.../unified`)."""
    targets = [m.target for m in parse_mounts(mounts_text) if m.fstype == "cgroup2"]
    if not targets:
        return None
    # Several mounts of the same hierarchy (bind mounts, containers) are equivalent; the
    # shortest path is the conventional one.
    return min(targets, key=len)


def cgroup2_root(mounts_path: str = PROC_MOUNTS) -> Path:
    """The cgroup v2 mount of this host; FileNotFoundError (with the fix) if there is none."""
    text = Path(mounts_path).read_text()
    found = find_cgroup2_mount(text)
    if found is None:
        raise FileNotFoundError(
            f"no cgroup2 mount in {mounts_path}; mount one: "
            "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified"
        )
    return Path(found)


def parse_proc_cgroup(text: str) -> str | None:
    """The v2 path ('/a/b') in a /proc/<pid>/cgroup text, from its `0::` line."""
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            return path.split(" (deleted)")[0] or "/"
    return None


def cgroup_of(pid: int | str = "self") -> str | None:
    """The v2 cgroup of a process, relative to the v2 root ('/' for the root group)."""
    return parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def resolve(name_or_path: str | os.PathLike[str], root: Path | None = None) -> Path:
    """An absolute cgroup directory: absolute paths inside the v2 mount are kept, names and
    relative paths are taken under the v2 root."""
    root = root if root is not None else cgroup2_root()
    p = Path(name_or_path)
    if p.is_absolute() and (p == root or root in p.parents):
        return p
    rel = str(p).lstrip("/")
    if rel in ("", "."):
        return root
    path = (root / rel).resolve()
    if path != root and root.resolve() not in path.parents:
        raise ValueError(f"{name_or_path} is outside the cgroup v2 mount {root}")
    return path


def relative(path: str | os.PathLike[str], root: Path | None = None) -> str:
    """The path iptables `-m cgroup --path` and /proc/<pid>/cgroup use: relative to the root."""
    root = root if root is not None else cgroup2_root()
    rel = Path(path).relative_to(root)
    return "/" + str(rel) if str(rel) != "." else "/"


def create(name_or_path: str | os.PathLike[str], root: Path | None = None) -> Path:
    """Make the cgroup (and missing parents); an existing one is reused."""
    path = resolve(name_or_path, root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cgroup_id(path: str | os.PathLike[str]) -> int:
    """The kernel's id for a v2 cgroup (what bpf_get_current_cgroup_id returns): the inode
    number of its directory in the cgroup2 filesystem."""
    return os.stat(path).st_ino


def pids(path: str | os.PathLike[str]) -> list[int]:
    """Processes directly in the cgroup."""
    text = (Path(path) / "cgroup.procs").read_text()
    return [int(x) for x in text.split()]


def join(path: str | os.PathLike[str], pid: int | None = None) -> None:
    """Move a whole process (all its threads; default: this one) into the cgroup.

    The one way Candela joins a cgroup: `candela enforce` moving the proxy into its exempt group,
    `enter` in a child between fork and exec, and the sandbox launcher (netns/enter.py). Plain
    os.open/os.write, no buffered file object, so it is safe in that forked child as well.
    """
    fd = os.open(
        os.path.join(os.fspath(path), "cgroup.procs"), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC
    )
    try:
        os.write(fd, str(os.getpid() if pid is None else pid).encode())
    finally:
        os.close(fd)


def enter(path: str | os.PathLike[str]) -> Callable[[], None]:
    """A `preexec_fn` that moves the child into the cgroup before it execs, so nothing the
    program does runs outside it."""
    return functools.partial(join, os.fspath(path))


def remove(path: str | os.PathLike[str], timeout: float = 2.0) -> None:
    """Remove the cgroup and its children, moving processes still in them to its parent (they
    are not ours to kill). Missing cgroups are fine."""
    path = Path(path)
    if not path.is_dir():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), key=str, reverse=True):
        remove(child, timeout)
    parent = path.parent
    deadline = time.monotonic() + timeout
    while True:
        try:
            for pid in pids(path):
                with suppress(ProcessLookupError):  # it exited meanwhile
                    join(parent, pid)
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            # EBUSY while exiting tasks (zombies) still count as members: retry briefly.
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
