"""Host backend: one memfd is the physical memory, mmap(MAP_FIXED) maps its chunks.

Why a memfd: it gives the same remap semantics as CUDA VMM (a physical chunk can be mapped at
any virtual address, and two mappings of one chunk see the same bytes), so the switcher and its
tests run on machines without a GPU; and a child process can map the same memory through
``/proc/<pid>/fd/<fd>``, which is how a worker could hand resident weights to an engine process.
A run of adjacent chunks is adjacent in the file, so it maps with one mmap call.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from warmserve.kernels.chunks import Run


class HostMemory:
    """Physical chunks in one memfd; each region is a reserved range with runs mapped into it."""

    name = "host"

    def __init__(self, chunk_size: int, chunk_count: int) -> None:
        if chunk_size % mmap.PAGESIZE:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of {mmap.PAGESIZE}")
        self.chunk_size = chunk_size
        self.chunk_count = chunk_count
        self.map_calls = 0
        self.unmap_calls = 0
        self.fd = os.memfd_create("warmserve-pool", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, chunk_size * chunk_count)

    def map(self, runs: Sequence[Run]) -> int:
        size = sum(length for _, length in runs) * self.chunk_size
        address = _reserve(size)
        try:
            _map_runs(self.fd, address, runs, self.chunk_size)
        except OSError:
            _unmap(address, size)
            raise
        self.map_calls += len(runs)
        return address

    def unmap(self, address: int, runs: Sequence[Run]) -> None:
        _unmap(address, sum(length for _, length in runs) * self.chunk_size)
        self.unmap_calls += 1

    def reserve_va(self, size: int) -> int:
        return _reserve(size)

    def remap(self, address: int, old: Sequence[Run], new: Sequence[Run]) -> None:
        """MAP_FIXED replaces the old pages in place; only a longer old tail needs clearing.

        The tail goes back to a PROT_NONE reservation (not munmap), so no other mapping can land
        inside the slot's addresses.
        """
        old_size = sum(length for _, length in old) * self.chunk_size
        new_size = sum(length for _, length in new) * self.chunk_size
        try:
            _map_runs(self.fd, address, new, self.chunk_size)
        except OSError:
            _reserve(max(old_size, new_size), at=address)
            raise
        self.map_calls += len(new)
        if old_size > new_size:
            _reserve(old_size - new_size, at=address + new_size)
            self.unmap_calls += 1

    def free_va(self, address: int, size: int) -> None:
        _unmap(address, size)

    def as_tensor(self, address: int, nbytes: int) -> torch.Tensor:
        return _tensor_at(address, nbytes)

    def trim(self, runs: Sequence[Run]) -> None:
        for first, length in runs:
            _punch_hole(self.fd, first * self.chunk_size, length * self.chunk_size)

    def physical_bytes(self) -> int:
        """Bytes of the memfd that hold pages (touched and not trimmed)."""
        return os.fstat(self.fd).st_blocks * 512

    def share_info(self, runs: Sequence[Run]) -> dict[str, Any]:
        return {
            "backend": "host",
            "path": f"/proc/{os.getpid()}/fd/{self.fd}",
            "extents": [
                (first * self.chunk_size, length * self.chunk_size) for first, length in runs
            ],
        }

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class SharedMapping:
    """Another process's view of a region, made by ``open_shared``."""

    address: int
    size: int
    nbytes: int

    def tensor(self) -> torch.Tensor:
        """The region's bytes as a uint8 tensor, without copying."""
        return _tensor_at(self.address, self.nbytes)

    def close(self) -> None:
        _unmap(self.address, self.size)


def open_shared(info: dict[str, Any]) -> SharedMapping:
    """Map a region described by ``Region.share_info()`` into this process, at a new address."""
    size = sum(length for _, length in info["extents"])
    fd = os.open(info["path"], os.O_RDWR)
    try:
        address = _reserve(size)
        at = address
        for offset, length in info["extents"]:
            _mmap(
                at,
                length,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_SHARED | _MAP_FIXED,
                fd,
                offset,
            )
            at += length
    finally:
        os.close(fd)
    return SharedMapping(address, size, info["nbytes"])


# libc calls. Python's mmap module cannot map at a chosen address, hence ctypes.

_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _mmap(address: int, size: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _libc.mmap(address, size, prot, flags, fd, offset)
    if result == _MAP_FAILED or result is None:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
    return result


def _reserve(size: int, at: int = 0) -> int:
    """Reserve ``size`` bytes of address space with no access and no memory behind it.

    With ``at``, the reservation replaces whatever is mapped there (MAP_FIXED).
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | (_MAP_FIXED if at else 0)
    return _mmap(at, size, _PROT_NONE, flags, -1, 0)


def _map_runs(fd: int, address: int, runs: Sequence[Run], chunk_size: int) -> None:
    """One MAP_FIXED mmap per run of adjacent chunks, each placed right after the previous."""
    at = address
    for first, length in runs:
        size = length * chunk_size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        _mmap(at, size, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, first * chunk_size)
        at += size


def _unmap(address: int, size: int) -> None:
    if _libc.munmap(address, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap failed: {os.strerror(err)}")


def _punch_hole(fd: int, offset: int, size: int) -> None:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")


def _tensor_at(address: int, nbytes: int) -> torch.Tensor:
    return torch.frombuffer((ctypes.c_ubyte * nbytes).from_address(address), dtype=torch.uint8)
