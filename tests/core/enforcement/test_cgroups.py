from __future__ import annotations

import os
from pathlib import Path

import pytest

from candela_mitm.enforcement import cgroups

HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
UNIFIED = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
"""
V1_ONLY = """\
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
"""
TWO_MOUNTS = """\
cgroup2 /run/container/sys/fs/cgroup cgroup2 rw 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw 0 0
"""
ESCAPED = "cgroup2 /mnt/my\\040cgroups cgroup2 rw 0 0\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        (HYBRID, "/sys/fs/cgroup/unified"),
        (UNIFIED, "/sys/fs/cgroup"),
        (V1_ONLY, None),
        ("", None),
        (TWO_MOUNTS, "/sys/fs/cgroup"),
        (ESCAPED, "/mnt/my cgroups"),
    ],
)
def test_find_cgroup2_mount(text: str, expected: str | None) -> None:
    assert cgroups.find_cgroup2_mount(text) == expected


def test_parse_mounts_fields() -> None:
    [sysfs, cg, bpf] = cgroups.parse_mounts(UNIFIED + "garbage\n")
    assert (cg.source, cg.target, cg.fstype) == ("cgroup2", "/sys/fs/cgroup", "cgroup2")
    assert "nsdelegate" in cg.options
    assert (bpf.fstype, sysfs.fstype) == ("bpf", "sysfs")


def test_cgroup2_root_reads_the_mounts_file(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(HYBRID)
    assert cgroups.cgroup2_root(str(mounts)) == Path("/sys/fs/cgroup/unified")
    mounts.write_text(V1_ONLY)
    with pytest.raises(FileNotFoundError, match="mount -t cgroup2"):
        cgroups.cgroup2_root(str(mounts))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("12:pids:/user.slice\n1:name=systemd:/init.scope\n0::/candela/run-1\n", "/candela/run-1"),
        ("0::/\n", "/"),
        ("0::/gone (deleted)\n", "/gone"),
        ("4:memory:/docker/abc\n", None),
        ("", None),
    ],
)
def test_parse_proc_cgroup(text: str, expected: str | None) -> None:
    assert cgroups.parse_proc_cgroup(text) == expected


def test_cgroup_of_this_process_is_readable() -> None:
    # Every Linux process has a v2 line where cgroup v2 is mounted; None elsewhere.
    found = cgroups.cgroup_of()
    assert found is None or found.startswith("/")


@pytest.mark.parametrize(
    "given,expected",
    [
        ("candela-proxy", "candela-proxy"),
        ("/candela/run-1", "candela/run-1"),
        ("a/b", "a/b"),
        ("", ""),
        ("/", ""),
    ],
)
def test_resolve_under_the_root(tmp_path: Path, given: str, expected: str) -> None:
    assert cgroups.resolve(given, tmp_path) == (tmp_path / expected if expected else tmp_path)


def test_resolve_keeps_absolute_paths_inside_the_root(tmp_path: Path) -> None:
    inside = tmp_path / "x" / "y"
    assert cgroups.resolve(str(inside), tmp_path) == inside


def test_resolve_refuses_escapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        cgroups.resolve("../etc", tmp_path)


@pytest.mark.parametrize(
    "sub,expected", [("a/b", "/a/b"), ("", "/"), ("candela-proxy", "/candela-proxy")]
)
def test_relative(tmp_path: Path, sub: str, expected: str) -> None:
    assert cgroups.relative(tmp_path / sub if sub else tmp_path, tmp_path) == expected


def test_create_is_idempotent(tmp_path: Path) -> None:
    p = cgroups.create("a/b", tmp_path)
    assert p == tmp_path / "a" / "b" and p.is_dir()
    assert cgroups.create("a/b", tmp_path) == p


def test_pids_read_cgroup_procs(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("12\n345\n")
    assert cgroups.pids(tmp_path) == [12, 345]


@pytest.mark.parametrize(
    "join, written",
    [
        (lambda p: cgroups.join(p, 77), "77"),
        (lambda p: cgroups.join(str(p), 77), "77"),
        (lambda p: cgroups.join(p), str(os.getpid())),
        (lambda p: cgroups.enter(p)(), str(os.getpid())),  # the preexec_fn form
    ],
    ids=["pid", "str-path", "self", "enter"],
)
def test_every_join_writes_one_pid_to_cgroup_procs(tmp_path: Path, join, written) -> None:
    (tmp_path / "cgroup.procs").write_text("12\n345\n")  # what was there is replaced
    join(tmp_path)
    assert (tmp_path / "cgroup.procs").read_text() == written


def test_join_of_a_missing_cgroup_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cgroups.join(tmp_path / "gone", 1)


def test_the_sandbox_launcher_joins_through_cgroups() -> None:
    """netns/enter.py has no cgroup code of its own: it calls cgroups.join."""
    import inspect

    from candela_mitm.netns import enter

    assert enter.cgroups is cgroups
    assert "cgroup.procs" not in inspect.getsource(enter)


def test_remove_of_a_missing_cgroup_is_fine(tmp_path: Path) -> None:
    cgroups.remove(tmp_path / "never-created")
