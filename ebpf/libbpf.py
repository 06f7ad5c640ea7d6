"""libbpf through ctypes: the few bpf(2) calls bcc's Python does not expose (pin, query, detach)."""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import os
from collections.abc import Callable
from functools import cache

# enum bpf_attach_type (UAPI)
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
# Several programs per cgroup, and descendants may attach their own: all of them must allow.
BPF_F_ALLOW_MULTI = 2

BPFFS = "/sys/fs/bpf"

_RINGBUF_CB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


@cache
def lib() -> ct.CDLL:
    """libbpf, which bcc's libbcc links against (Debian: libbpf1)."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    so = ct.CDLL(name, use_errno=True)
    so.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    so.bpf_obj_get.argtypes = [ct.c_char_p]
    so.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
    so.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
    so.bpf_prog_query.argtypes = [
        ct.c_int,
        ct.c_int,
        ct.c_uint,
        ct.POINTER(ct.c_uint),
        ct.POINTER(ct.c_uint),
        ct.POINTER(ct.c_uint),
    ]
    so.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint]
    so.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint)]
    so.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    so.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    so.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    so.ring_buffer__new.argtypes = [ct.c_int, _RINGBUF_CB, ct.c_void_p, ct.c_void_p]
    so.ring_buffer__new.restype = ct.c_void_p
    so.ring_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
    so.ring_buffer__free.argtypes = [ct.c_void_p]
    so.ring_buffer__free.restype = None
    return so


def _check(rc: int, what: str) -> int:
    # libbpf 1.x returns -errno (and sets errno); older versions return -1 with errno set.
    if rc < 0:
        err = -rc if rc != -1 else (ct.get_errno() or 1)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    """A new fd for a pinned program or map; the caller closes it."""
    return _check(lib().bpf_obj_get(path.encode()), f"open pinned {path}")


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    _check(
        lib().bpf_prog_attach(prog_fd, cgroup_fd, attach_type, BPF_F_ALLOW_MULTI), "attach program"
    )


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    _check(lib().bpf_prog_detach2(prog_fd, cgroup_fd, attach_type), "detach program")


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to this cgroup itself (not inherited) for one hook."""
    ids = (ct.c_uint * 64)()
    cnt = ct.c_uint(len(ids))
    flags = ct.c_uint(0)
    _check(
        lib().bpf_prog_query(cgroup_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)),
        "query programs",
    )
    return list(ids[: cnt.value])


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ct.create_string_buffer(key, len(key))
    v = ct.create_string_buffer(value, len(value))
    _check(lib().bpf_map_update_elem(fd, k, v, 0), "update map")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ct.create_string_buffer(key, len(key))
    v = ct.create_string_buffer(value_size)
    rc = lib().bpf_map_lookup_elem(fd, k, v)
    if rc < 0:
        err = -rc if rc != -1 else ct.get_errno()
        if err == errno.ENOENT:
            return None
        _check(rc, "look up map")
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    k = ct.create_string_buffer(key, len(key))
    rc = lib().bpf_map_delete_elem(fd, k)
    if rc < 0:
        err = -rc if rc != -1 else ct.get_errno()
        if err == errno.ENOENT:
            return False
        _check(rc, "delete from map")
    return True


class _ProgInfo(ct.Structure):
    # The head of struct bpf_prog_info (UAPI); the kernel fills only what fits info_len.
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
    ]


class _MapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32)]


def prog_info(fd: int) -> tuple[int, str]:
    """(id, name) of a program."""
    info = _ProgInfo()
    size = ct.c_uint(ct.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "program info")
    return int(info.id), info.name.decode("ascii", "replace")


def map_id(fd: int) -> int:
    info = _MapInfo()
    size = ct.c_uint(ct.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "map info")
    return int(info.id)


class RingBuffer:
    """A consumer of a BPF ring buffer given its map fd (for example a pinned one)."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]):
        def _cb(_ctx: int | None, data: int | None, size: int) -> int:
            if data:
                on_record(ct.string_at(data, size))
            return 0

        self._cb = _RINGBUF_CB(_cb)  # kept referenced: libbpf calls it later
        ptr = lib().ring_buffer__new(map_fd, self._cb, None, None)
        if not ptr:
            err = ct.get_errno() or 1
            raise OSError(err, f"ring buffer: {os.strerror(err)}")
        self._ptr: int | None = ptr

    def poll(self, timeout_ms: int) -> int:
        """Records consumed (0 on timeout or when a signal interrupted the wait)."""
        if self._ptr is None:
            raise ValueError("ring buffer is closed")
        rc = lib().ring_buffer__poll(self._ptr, timeout_ms)
        if rc == -errno.EINTR:
            return 0
        return _check(rc, "poll ring buffer")

    def close(self) -> None:
        if self._ptr is not None:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None
