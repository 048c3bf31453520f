"""The memory switcher: a fixed pool of physical chunks mapped, on demand, behind tagged regions.

Why: a device holds prewarmed weights of several models; when one model becomes active, the
others are evicted and their memory becomes that model's KV cache. Copying is what makes such a
switch slow, so the pool never copies: physical chunks stay allocated for the pool's whole life,
and a switch only changes which virtual range they are mapped behind (a driver call per run of
chunks, no data movement). Tags name what a region holds (``"weights:llama-8b"``,
``"kv:llama-8b"``), as vLLM's sleep-mode allocator tags its pools.

Nothing here knows about CUDA or mmap; a backend (``host_memory`` or ``cuda_memory``) supplies
the mapping calls.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from warmserve.kernels.chunks import ChunkPool, Run


class OutOfChunks(MemoryError):
    """Not enough free chunks for a reservation; the switcher was left unchanged."""


class PhysicalMemory(Protocol):
    """What a backend provides: physical chunks, and mapping runs of them at one address."""

    name: str
    chunk_size: int
    chunk_count: int
    map_calls: int
    unmap_calls: int

    def map(self, runs: Sequence[Run]) -> int:
        """Reserve a virtual range, map ``runs`` there in order, and return its address."""

    def unmap(self, address: int, runs: Sequence[Run]) -> None:
        """Unmap a range made by ``map`` and free its virtual addresses; chunks stay allocated."""

    def as_tensor(self, address: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over mapped memory, without copying."""

    def trim(self, runs: Sequence[Run]) -> None:
        """Give the physical memory of unmapped chunks back to the OS or driver."""

    def physical_bytes(self) -> int:
        """Bytes of physical memory the pool holds now (trimmed chunks excluded)."""

    def share_info(self, runs: Sequence[Run]) -> dict[str, Any]:
        """What another process needs to map the same chunks."""

    def close(self) -> None:
        """Free every chunk; the backend is unusable afterwards."""


@dataclass
class Region:
    """A tagged, contiguous virtual range with pool chunks mapped behind it.

    Views from ``tensor`` point into the mapping; after ``MemorySwitcher.release`` they point at
    unmapped addresses and must not be used (as with any allocator, the caller owns that rule).
    """

    tag: str
    address: int
    nbytes: int
    runs: tuple[Run, ...]
    chunk_size: int
    _memory: PhysicalMemory = field(repr=False)
    _base: torch.Tensor | None = field(default=None, repr=False)
    released: bool = False

    @property
    def mapped_bytes(self) -> int:
        return sum(length for _, length in self.runs) * self.chunk_size

    def tensor(self, dtype: torch.dtype, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
        """A zero-copy view of ``shape`` elements of ``dtype`` starting ``offset`` bytes in."""
        if self.released:
            raise RuntimeError(f"region {self.tag!r} was released")
        itemsize = dtype.itemsize
        count = 1
        for dim in shape:
            count *= int(dim)
        end = offset + count * itemsize
        if offset < 0 or end > self.nbytes:
            raise ValueError(f"bytes [{offset}, {end}) fall outside region of {self.nbytes}")
        if offset % itemsize:
            raise ValueError(f"offset {offset} is not aligned to {dtype} ({itemsize} bytes)")
        if self._base is None:
            self._base = self._memory.as_tensor(self.address, self.nbytes)
        return self._base[offset:end].view(dtype).view(tuple(int(d) for d in shape))

    def share_info(self) -> dict[str, Any]:
        """How a child process can map this region's memory (see ``host_memory.open_shared``)."""
        if self.released:
            raise RuntimeError(f"region {self.tag!r} was released")
        info = self._memory.share_info(self.runs)
        info["nbytes"] = self.nbytes
        return info


class MemorySwitcher:
    """Owns one pool of physical memory and the tagged regions mapped over it."""

    def __init__(
        self,
        capacity: int,
        chunk_size: int = 2 << 20,
        backend: str = "auto",
        device: int = 0,
    ) -> None:
        """On CUDA each chunk is one physical handle: larger chunks mean fewer map calls."""
        if chunk_size <= 0 or capacity < chunk_size:
            raise ValueError(f"capacity {capacity} must hold at least one chunk of {chunk_size}")
        count = capacity // chunk_size
        self._memory = _open_backend(backend, chunk_size, count, device)
        self.backend = self._memory.name
        self.chunk_size = chunk_size
        self._pool = ChunkPool(count)
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def capacity(self) -> int:
        return self._pool.count * self.chunk_size

    @property
    def free_bytes(self) -> int:
        return self._pool.free_count * self.chunk_size

    @property
    def used_bytes(self) -> int:
        return self.capacity - self.free_bytes

    def tags(self) -> list[str]:
        return list(self._regions)

    def region(self, tag: str) -> Region:
        return self._regions[tag]

    def reserve(self, tag: str, nbytes: int) -> Region:
        """Map enough free chunks behind one new virtual range, named ``tag``.

        Raises OutOfChunks, changing nothing, when the free chunks do not cover ``nbytes``.
        """
        if nbytes <= 0:
            raise ValueError(f"a region needs a positive size, got {nbytes}")
        with self._lock:
            self._check_open()
            if tag in self._regions:
                raise ValueError(f"tag {tag!r} is already reserved")
            needed = -(-nbytes // self.chunk_size)
            runs = self._pool.take(needed)
            if runs is None:
                raise OutOfChunks(
                    f"{tag!r} needs {needed} chunks of {self.chunk_size} bytes; "
                    f"{self._pool.free_count} are free"
                )
            try:
                address = self._memory.map(runs)
            except BaseException:
                self._pool.give(runs)
                raise
            region = Region(tag, address, nbytes, tuple(runs), self.chunk_size, self._memory)
            self._regions[tag] = region
            return region

    def release(self, tag: str) -> None:
        """Unmap ``tag``'s range; its chunks return to the pool, still allocated, for reuse."""
        with self._lock:
            self._check_open()
            region = self._regions.pop(tag)
            region.released = True
            region._base = None
            self._memory.unmap(region.address, region.runs)
            self._pool.give(list(region.runs))

    def trim(self) -> None:
        """Give the physical memory of free chunks back; they are allocated again on reuse."""
        with self._lock:
            self._check_open()
            self._memory.trim(self._pool.free_runs())

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "capacity": self.capacity,
            "chunk_size": self.chunk_size,
            "chunks": self._pool.count,
            "free_chunks": self._pool.free_count,
            "free_runs": len(self._pool.free_runs()),
            "used_bytes": self.used_bytes,
            "physical_bytes": self._memory.physical_bytes(),
            "regions": {tag: r.nbytes for tag, r in self._regions.items()},
            "map_calls": self._memory.map_calls,
            "unmap_calls": self._memory.unmap_calls,
        }

    def close(self) -> None:
        """Unmap every region and free the whole pool."""
        with self._lock:
            if self._closed:
                return
            for region in self._regions.values():
                region.released = True
                region._base = None
                self._memory.unmap(region.address, region.runs)
            self._regions.clear()
            self._memory.close()
            self._closed = True

    def __enter__(self) -> MemorySwitcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the memory switcher is closed")


def _open_backend(name: str, chunk_size: int, count: int, device: int) -> PhysicalMemory:
    """Pick the backend: ``auto`` means CUDA when a device and cuda-python are both there."""
    if name == "auto":
        from warmserve.kernels import cuda_memory

        name = "cuda" if cuda_memory.available() else "host"
    if name == "host":
        from warmserve.kernels.host_memory import HostMemory

        return HostMemory(chunk_size, count)
    if name == "cuda":
        from warmserve.kernels.cuda_memory import CudaMemory

        return CudaMemory(chunk_size, count, device)
    raise ValueError(f"unknown backend {name!r}; expected 'auto', 'host' or 'cuda'")
