"""CUDA backend: physical memory from cuMemCreate, mapped with cuMemMap (CUDA VMM).

Why slabs: a cuMemMap call costs tens of microseconds from Python whatever its size, and 16 GiB
is 8,192 chunks of the 2 MiB granularity, so one call per chunk costs as much as copying the
weights over PCIe. cuMemMap can map a sub-range of a handle (``offset``), so the pool creates a
few large handles (slabs) once, at start, and maps a run of adjacent chunks inside one slab with
one call: a 16 GiB run in 1 GiB slabs is 16 calls. One cuMemSetAccess covers a whole region.
``slab_size == chunk_size`` gives the plain one-handle-per-chunk layout, for comparison.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from warmserve.kernels.chunks import Run, split_at_slabs

DEFAULT_SLAB_SIZE = 1 << 30


def available() -> bool:
    """True when torch sees a CUDA device and cuda-python's driver bindings are installed."""
    return importlib.util.find_spec("cuda.bindings") is not None and torch.cuda.is_available()


class CudaMemory:
    """Physical chunks carved from a few slabs on one device; regions are reserved VA ranges."""

    name = "cuda"

    def __init__(
        self, chunk_size: int, chunk_count: int, device: int, slab_size: int | None = None
    ) -> None:
        self.device = device
        self.chunk_size = chunk_size
        self.chunk_count = chunk_count
        self.map_calls = 0
        self.unmap_calls = 0
        self._slabs: list[Any] = []
        self._pieces: dict[int, list[tuple[int, int]]] = {}
        self._context = _retain_primary_context(device)
        try:
            granularity = _granularity(device)
            if chunk_size % granularity:
                raise ValueError(f"chunk size {chunk_size} is not a multiple of {granularity}")
            slab_size = min(slab_size or DEFAULT_SLAB_SIZE, chunk_size * chunk_count)
            if slab_size % chunk_size:
                raise ValueError(f"slab size {slab_size} is not a multiple of {chunk_size}")
            self.chunks_per_slab = slab_size // chunk_size
            slab_count = -(-chunk_count // self.chunks_per_slab)
            self._slab_chunks = [
                min(self.chunks_per_slab, chunk_count - i * self.chunks_per_slab)
                for i in range(slab_count)
            ]
            self._mapped_per_slab = [0] * slab_count
            for count in self._slab_chunks:
                self._slabs.append(_create(count * chunk_size, device))
        except BaseException:
            self.close()
            raise

    def map(self, runs: Sequence[Run]) -> int:
        size = sum(length for _, length in runs) * self.chunk_size
        _make_current(self._context)
        address = _reserve(size, self.chunk_size)
        pieces: list[tuple[int, int]] = []
        try:
            at = address
            for slab, first, length in split_at_slabs(list(runs), self.chunks_per_slab):
                if self._slabs[slab] is None:
                    self._slabs[slab] = _create(
                        self._slab_chunks[slab] * self.chunk_size, self.device
                    )
                nbytes = length * self.chunk_size
                _map(at, nbytes, first * self.chunk_size, self._slabs[slab])
                pieces.append((at, nbytes))
                self._mapped_per_slab[slab] += length
                at += nbytes
            _set_access(address, size, self.device)
        except BaseException:
            self._undo(address, size, pieces, runs)
            raise
        self.map_calls += len(pieces)
        self._pieces[address] = pieces
        return address

    def unmap(self, address: int, runs: Sequence[Run]) -> None:
        _make_current(self._context)
        _synchronize()
        pieces = self._pieces.pop(address)
        for at, nbytes in pieces:
            _unmap(at, nbytes)
        _free_va(address, sum(nbytes for _, nbytes in pieces))
        for slab, _, length in split_at_slabs(list(runs), self.chunks_per_slab):
            self._mapped_per_slab[slab] -= length
        self.unmap_calls += len(pieces)

    def as_tensor(self, address: int, nbytes: int) -> torch.Tensor:
        return torch.as_tensor(_DeviceBytes(address, nbytes), device=f"cuda:{self.device}")

    def trim(self, runs: Sequence[Run]) -> None:
        """Release whole slabs that nothing maps; a partly used slab cannot shrink."""
        del runs
        for slab, handle in enumerate(self._slabs):
            if handle is not None and self._mapped_per_slab[slab] == 0:
                _release(handle)
                self._slabs[slab] = None

    def physical_bytes(self) -> int:
        return sum(
            n * self.chunk_size
            for n, handle in zip(self._slab_chunks, self._slabs, strict=True)
            if handle is not None
        )

    def share_info(self, runs: Sequence[Run]) -> dict[str, Any]:
        raise NotImplementedError(
            "sharing device memory with another process needs exportable handles "
            "(cuMemExportToShareableHandle); the CUDA pool creates private ones"
        )

    def close(self) -> None:
        for address, pieces in list(self._pieces.items()):
            for at, nbytes in pieces:
                _unmap(at, nbytes)
            _free_va(address, sum(nbytes for _, nbytes in pieces))
        self._pieces.clear()
        for slab, handle in enumerate(self._slabs):
            if handle is not None:
                _release(handle)
                self._slabs[slab] = None
        if self._context is not None:
            _release_primary_context(self.device)
            self._context = None

    def _undo(
        self, address: int, size: int, pieces: list[tuple[int, int]], runs: Sequence[Run]
    ) -> None:
        for at, nbytes in pieces:
            _unmap(at, nbytes)
        _free_va(address, size)
        done = sum(nbytes for _, nbytes in pieces) // self.chunk_size
        for slab, _, length in split_at_slabs(list(runs), self.chunks_per_slab):
            undo = min(length, done)
            self._mapped_per_slab[slab] -= undo
            done -= undo


class _DeviceBytes:
    """The minimal ``__cuda_array_interface__`` torch needs to wrap a device range as uint8."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "strides": None,
            "data": (address, False),
            "version": 3,
        }


class CudaError(RuntimeError):
    """A CUDA driver call returned an error."""


# Driver calls (cuda-python). Everything above goes through these.


def _driver():
    from cuda.bindings import driver

    return driver


def _check(result: tuple) -> Any:
    driver = _driver()
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaError(f"CUDA driver error {name.decode() if name else err}")
    return values[0] if len(values) == 1 else tuple(values)


def _retain_primary_context(device: int) -> Any:
    """Hold the device's primary context (the one torch uses) and make it current here."""
    driver = _driver()
    _check(driver.cuInit(0))
    ctx = _check(driver.cuDevicePrimaryCtxRetain(_check(driver.cuDeviceGet(device))))
    _make_current(ctx)
    return ctx


def _release_primary_context(device: int) -> None:
    driver = _driver()
    _check(driver.cuDevicePrimaryCtxRelease(_check(driver.cuDeviceGet(device))))


def _make_current(ctx: Any) -> None:
    """Driver calls act on the calling thread's context; a worker may call from any thread."""
    _check(_driver().cuCtxSetCurrent(ctx))


def _prop(device: int):
    driver = _driver()
    prop = driver.CUmemAllocationProp()
    prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    return prop


def _granularity(device: int) -> int:
    driver = _driver()
    flag = driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(_check(driver.cuMemGetAllocationGranularity(_prop(device), flag)))


def _create(size: int, device: int) -> Any:
    return _check(_driver().cuMemCreate(size, _prop(device), 0))


def _release(handle: Any) -> None:
    _check(_driver().cuMemRelease(handle))


def _reserve(size: int, alignment: int) -> int:
    return int(_check(_driver().cuMemAddressReserve(size, alignment, 0, 0)))


def _free_va(address: int, size: int) -> None:
    _check(_driver().cuMemAddressFree(address, size))


def _map(address: int, size: int, offset: int, handle: Any) -> None:
    _check(_driver().cuMemMap(address, size, offset, handle, 0))


def _unmap(address: int, size: int) -> None:
    _check(_driver().cuMemUnmap(address, size))


def _set_access(address: int, size: int, device: int) -> None:
    driver = _driver()
    desc = driver.CUmemAccessDesc()
    desc.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = device
    desc.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    _check(driver.cuMemSetAccess(address, size, [desc], 1))


def _synchronize() -> None:
    """Wait for queued kernels, which may still read the range about to be unmapped."""
    _check(_driver().cuCtxSynchronize())
