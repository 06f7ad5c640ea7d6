"""The sandbox registry: which running sandbox a source address belongs to, read by the proxy to
attribute sandbox traffic to its user and tenant.

One JSON file per sandbox under the run directory (`$CANDELA_RUN_DIR`, else /run/candela),
written by `candela run` (enforcement/sandbox.py) and read by the transparent proxy
(addons/sni.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from candela_mitm.enforcement import workload
from candela_mitm.state.liveness import process_start_time  # a zombie's is None: it is gone

log = logging.getLogger("candela.sandbox")

RUN_DIR_ENV = "CANDELA_RUN_DIR"
DEFAULT_RUN_DIR = "/run/candela"


def run_dir() -> Path:
    """Where sandboxes are registered: $CANDELA_RUN_DIR, else /run/candela."""
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


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


def peer_process(
    record: SandboxRecord, address: str, port: int, remote: tuple[str, int] | None = None
) -> tuple[int, str] | None:
    """(pid, comm) of the sandboxed process whose TCP socket has this local address and port.

    The socket asked of the sandbox namespace's kernel tables, then which of its processes
    holds it (workload.peer_in_netns: the processes are listed, a scan of /proc, only when the
    ones remembered do not answer). Reads of /proc: off the event loop.
    """
    found = peer_workload(record, address, port, remote)
    return (found.pid, found.comm or "") if found is not None else None


def peer_workload(
    record: SandboxRecord, address: str, port: int, remote: tuple[str, int] | None = None
) -> workload.Workload | None:
    """The sandboxed process (pid, executable and its hash, uid, cgroup) of a connection
    (`remote`: its original destination, when known)."""
    if record.netns_inode is None:
        return None
    inode = record.netns_inode
    return workload.peer_in_netns(address, port, inode, remote, lambda: pids_in_netns(inode))


def pids_in_netns(inode: int) -> list[int]:
    """Processes whose network namespace is the one with this inode (a scan of /proc)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino == inode:
                    out.append(int(entry.name))
    return out
