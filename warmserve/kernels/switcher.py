"""The memory switcher: a fixed pool of physical chunks mapped, on demand, behind tagged regions.

Why: a device holds prewarmed weights of several models; when one model becomes active, the
others are evicted and their memory becomes that model's KV cache. Copying is what makes such a
switch slow, so the pool never copies: physical chunks stay allocated for the pool's whole life,
and a switch only changes which virtual range they are mapped behind (a driver call per run of
chunks, no data movement). Tags name what a region holds (``"weights:llama-8b"``,
``"kv:llama-8b"``), as vLLM's sleep-mode allocator tags its pools.

A *slot* is the other half of that idea: a fixed virtual range, sized for the largest model,
behind which the chunks of any resident region can be mapped in turn. Kernels captured once over
a slot (a CUDA graph of the forward pass) then run on whichever model is bound to it.

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

CHUNK_SIZE = {"host": 2 << 20, "cuda": 64 << 20}
"""Default chunk per backend. Host: a page-table-friendly 2 MiB. CUDA: a chunk is one handle and
one cuMemMap, so 15 GiB in 64 MiB chunks is 240 map calls (11 ms on the H100) where 2 MiB chunks
would be 7,659 (0.30 s; bench/results/gpu_switch.json); a region wastes under one chunk."""


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

    def reserve_va(self, size: int) -> int:
        """Reserve ``size`` bytes of virtual addresses (a slot) with nothing mapped behind them."""

    def remap(self, address: int, old: Sequence[Run], new: Sequence[Run]) -> None:
        """Replace the chunks mapped at ``address`` (``old``, maybe none) by ``new`` (maybe none).

        ``new`` is mapped in order from ``address``; the range keeps its virtual addresses. On
        error nothing is left mapped there.
        """

    def free_va(self, address: int, size: int) -> None:
        """Give back a range from ``reserve_va``; nothing may be mapped in it."""

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
        if self._base is None:
            self._base = self._memory.as_tensor(self.address, self.nbytes)
        return _view(self._base, dtype, shape, offset)

    def share_info(self) -> dict[str, Any]:
        """How a child process can map this region's memory (see ``host_memory.open_shared``)."""
        if self.released:
            raise RuntimeError(f"region {self.tag!r} was released")
        info = self._memory.share_info(self.runs)
        info["nbytes"] = self.nbytes
        return info


@dataclass
class Slot:
    """A fixed virtual range that shows one resident region at a time, without copying.

    Why: a CUDA graph records the addresses its kernels read. An engine captures its forward pass
    once over a slot; activating another resident model is then ``bind`` (that model's physical
    chunks are mapped behind the same addresses, the previous model's are unmapped from them) and
    a replay of the same graph. Nothing is copied and nothing is captured again.

    A bind costs a cuMemMap per chunk: for 15 GiB on the H100, 1.7 ms in 1 GiB chunks, 4.4 ms
    in 256 MiB, 14 ms in 64 MiB (bench/results/gpu_activate_graph.json), so weight pools that
    back slots want large chunks.

    The bound region also stays mapped at its own address: both ranges alias the same chunks,
    which costs no memory, keeps the region's views (the weight store's) valid, and spares a bind
    the calls that moving the mapping would cost (unmapping it there, mapping it back on unbind).
    Releasing a region unbinds it from every slot first, so a slot never shows chunks that the
    pool may hand out again. Views from ``tensor`` keep their addresses across binds; reading
    them while nothing is bound, or past the bound region's mapped bytes, faults.
    """

    name: str
    address: int
    nbytes: int
    va_bytes: int
    _switcher: MemorySwitcher = field(repr=False)
    _base: torch.Tensor | None = field(default=None, repr=False)
    bound: str | None = None
    closed: bool = False

    def bind(self, tag: str) -> None:
        """Map region ``tag``'s chunks behind this slot, replacing whatever was bound."""
        self._switcher._bind(self, tag)

    def unbind(self) -> None:
        """Unmap whatever is bound; the slot keeps its virtual addresses."""
        self._switcher._bind(self, None)

    def tensor(self, dtype: torch.dtype, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
        """A view at fixed addresses that reads whichever region is bound when it is used.

        Needs a region bound now: on CUDA, torch finds a pointer's device from its mapping.
        """
        if self.closed:
            raise RuntimeError(f"slot {self.name!r} was closed")
        if self.bound is None:
            raise RuntimeError(f"slot {self.name!r} has no region bound; bind one first")
        if self._base is None:
            self._base = self._switcher._memory.as_tensor(self.address, self.nbytes)
        return _view(self._base, dtype, shape, offset)

    def close(self) -> None:
        """Unbind and give the virtual range back."""
        self._switcher._close_slot(self)


class MemorySwitcher:
    """Owns one pool of physical memory and the tagged regions mapped over it."""

    def __init__(
        self,
        capacity: int,
        chunk_size: int | None = None,
        backend: str = "auto",
        device: int = 0,
    ) -> None:
        """On CUDA each chunk is one physical handle: larger chunks mean fewer map calls.

        ``chunk_size`` defaults to the backend's ``CHUNK_SIZE``.
        """
        backend = _resolve(backend)
        chunk_size = chunk_size or CHUNK_SIZE[backend]
        if chunk_size <= 0 or capacity < chunk_size:
            raise ValueError(f"capacity {capacity} must hold at least one chunk of {chunk_size}")
        count = capacity // chunk_size
        self._memory = _open_backend(backend, chunk_size, count, device)
        self.backend = self._memory.name
        self.chunk_size = chunk_size
        self._pool = ChunkPool(count)
        self._regions: dict[str, Region] = {}
        self._slots: dict[str, Slot] = {}
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

    def slot(self, name: str, nbytes: int) -> Slot:
        """Reserve a fixed virtual range of ``nbytes`` (the largest model it will show), unbound.

        A slot takes no chunks from the pool: only addresses, rounded up to whole chunks.
        """
        if nbytes <= 0:
            raise ValueError(f"a slot needs a positive size, got {nbytes}")
        with self._lock:
            self._check_open()
            if name in self._slots:
                raise ValueError(f"slot {name!r} already exists")
            va_bytes = -(-nbytes // self.chunk_size) * self.chunk_size
            address = self._memory.reserve_va(va_bytes)
            slot = Slot(name, address, nbytes, va_bytes, self)
            self._slots[name] = slot
            return slot

    def release(self, tag: str) -> None:
        """Unmap ``tag``'s range; its chunks return to the pool, still allocated, for reuse."""
        with self._lock:
            self._check_open()
            region = self._regions.pop(tag)
            for slot in self._slots.values():
                if slot.bound == tag:
                    self._remap(slot, region.runs, None)
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
            "slots": {name: slot.bound for name, slot in self._slots.items()},
            "map_calls": self._memory.map_calls,
            "unmap_calls": self._memory.unmap_calls,
        }

    def close(self) -> None:
        """Unmap every region and free the whole pool."""
        with self._lock:
            if self._closed:
                return
            for slot in list(self._slots.values()):
                self._drop_slot(slot)
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

    def _bind(self, slot: Slot, tag: str | None) -> None:
        with self._lock:
            self._check_open()
            if slot.closed:
                raise RuntimeError(f"slot {slot.name!r} was closed")
            if tag == slot.bound:
                return
            region = self._regions[tag] if tag is not None else None
            if region is not None and region.nbytes > slot.nbytes:
                raise ValueError(
                    f"region {tag!r} of {region.nbytes} bytes does not fit slot {slot.name!r} "
                    f"of {slot.nbytes}"
                )
            old = self._regions[slot.bound].runs if slot.bound is not None else ()
            self._remap(slot, old, region)

    def _remap(self, slot: Slot, old: Sequence[Run], region: Region | None) -> None:
        """Swap what ``slot`` shows; a failed remap leaves it unbound (nothing mapped)."""
        slot.bound = None
        self._memory.remap(slot.address, old, region.runs if region is not None else ())
        slot.bound = region.tag if region is not None else None

    def _close_slot(self, slot: Slot) -> None:
        with self._lock:
            if not slot.closed:
                self._check_open()
                self._drop_slot(slot)

    def _drop_slot(self, slot: Slot) -> None:
        if slot.bound is not None:
            self._remap(slot, self._regions[slot.bound].runs, None)
        self._memory.free_va(slot.address, slot.va_bytes)
        slot.closed = True
        slot._base = None
        del self._slots[slot.name]


def _view(
    base: torch.Tensor, dtype: torch.dtype, shape: Sequence[int], offset: int
) -> torch.Tensor:
    """``shape`` elements of ``dtype`` at ``offset`` bytes into the uint8 tensor ``base``."""
    itemsize = dtype.itemsize
    count = 1
    for dim in shape:
        count *= int(dim)
    end = offset + count * itemsize
    if offset < 0 or end > base.numel():
        raise ValueError(f"bytes [{offset}, {end}) fall outside range of {base.numel()}")
    if offset % itemsize:
        raise ValueError(f"offset {offset} is not aligned to {dtype} ({itemsize} bytes)")
    return base[offset:end].view(dtype).view(tuple(int(d) for d in shape))


def _resolve(name: str) -> str:
    """The backend ``name`` stands for: ``auto`` means CUDA when a device and cuda-python are
    both there, else host."""
    if name == "auto":
        from warmserve.kernels import cuda_memory

        return "cuda" if cuda_memory.available() else "host"
    if name not in CHUNK_SIZE:
        raise ValueError(f"unknown backend {name!r}; expected 'auto', 'host' or 'cuda'")
    return name


def _open_backend(name: str, chunk_size: int, count: int, device: int) -> PhysicalMemory:
    if name == "host":
        from warmserve.kernels.host_memory import HostMemory

        return HostMemory(chunk_size, count)
    from warmserve.kernels.cuda_memory import CudaMemory

    return CudaMemory(chunk_size, count, device)
