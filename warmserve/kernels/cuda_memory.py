"""CUDA backend: physical memory from cuMemCreate, mapped with cuMemMap (CUDA VMM).

Each chunk is one physical handle, created when a region first needs it (a prewarm, off the
critical path) and released by ``trim``: a pool sized for a whole GPU holds only what its
regions use, and the rest of the device stays free for engines (their weights, KV cache and
CUDA graphs come from vLLM's own allocator). On the
H100 driver measured here (580), cuMemMap maps only a whole handle (a sub-range gives
CUDA_ERROR_NOT_SUPPORTED), so the chunk size sets the number of map calls: 15 GiB in 2 MiB
chunks is 7,659 calls (0.30 s), in 64 MiB chunks 240 calls (11 ms). Pick large chunks for a GPU
pool (bench/results/gpu_switch.json). One cuMemSetAccess covers a whole region.

Unmapping goes the other way: CUDA's own samples unmap a range made of several mappings with one
cuMemUnmap, so a range is unmapped in one call, falling back to one call per chunk (and staying
there) if a driver refuses it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from warmserve.kernels.chunks import Run


def available() -> bool:
    """True when torch sees a CUDA device and cuda-python's driver bindings are installed.

    ``find_spec("cuda.bindings")`` raises rather than returning None when no ``cuda`` package
    exists at all (a CPU-only install), so that case is caught and answered False.
    """
    if not torch.cuda.is_available():
        return False
    try:
        return importlib.util.find_spec("cuda.bindings") is not None
    except ModuleNotFoundError:
        return False


class CudaMemory:
    """One physical handle per chunk on one device; regions are reserved VA ranges."""

    name = "cuda"

    def __init__(self, chunk_size: int, chunk_count: int, device: int) -> None:
        self.device = device
        self.chunk_size = chunk_size
        self.chunk_count = chunk_count
        self.map_calls = 0
        self.unmap_calls = 0
        self._unmap_whole_range: bool | None = None
        self._handles: list[Any] = [None] * chunk_count
        self._context = _retain_primary_context(device)
        try:
            granularity = _granularity(device)
            if chunk_size % granularity:
                raise ValueError(f"chunk size {chunk_size} is not a multiple of {granularity}")
        except BaseException:
            self.close()
            raise

    def map(self, runs: Sequence[Run]) -> int:
        chunks = _chunks(runs)
        size = len(chunks) * self.chunk_size
        _make_current(self._context)
        address = _reserve(size, self.chunk_size)
        mapped = 0
        created = []
        try:
            for chunk in chunks:
                if self._handles[chunk] is None:
                    self._handles[chunk] = _create(self.chunk_size, self.device)
                    created.append(chunk)
                _map(address + mapped * self.chunk_size, self.chunk_size, self._handles[chunk])
                mapped += 1
            _set_access(address, size, self.device)
        except BaseException:  # out of device memory, most often: leave the pool as it was
            for i in range(mapped):
                _unmap(address + i * self.chunk_size, self.chunk_size)
            _free_va(address, size)
            self.trim([(chunk, 1) for chunk in created])
            raise
        self.map_calls += mapped
        return address

    def unmap(self, address: int, runs: Sequence[Run]) -> None:
        count = len(_chunks(runs))
        _make_current(self._context)
        _synchronize()
        self._unmap_chunks(address, count)
        _free_va(address, count * self.chunk_size)

    def reserve_va(self, size: int) -> int:
        _make_current(self._context)
        return _reserve(size, self.chunk_size)

    def remap(self, address: int, old: Sequence[Run], new: Sequence[Run]) -> None:
        """Unmap ``old``, map each chunk of ``new`` (whole handles), then one cuMemSetAccess.

        The chunks of ``new`` are mapped at their region's address too and so hold handles.
        """
        _make_current(self._context)
        _synchronize()
        old_count = len(_chunks(old))
        if old_count:
            self._unmap_chunks(address, old_count)
        chunks = _chunks(new)
        mapped = 0
        try:
            for chunk in chunks:
                _map(address + mapped * self.chunk_size, self.chunk_size, self._handles[chunk])
                mapped += 1
            if mapped:
                _set_access(address, mapped * self.chunk_size, self.device)
        except BaseException:
            if mapped:
                self._unmap_chunks(address, mapped)
            raise
        self.map_calls += mapped

    def free_va(self, address: int, size: int) -> None:
        _make_current(self._context)
        _free_va(address, size)

    def as_tensor(self, address: int, nbytes: int) -> torch.Tensor:
        return torch.as_tensor(_DeviceBytes(address, nbytes), device=f"cuda:{self.device}")

    def trim(self, runs: Sequence[Run]) -> None:
        for chunk in _chunks(runs):
            if self._handles[chunk] is not None:
                _release(self._handles[chunk])
                self._handles[chunk] = None

    def physical_bytes(self) -> int:
        return sum(h is not None for h in self._handles) * self.chunk_size

    def share_info(self, runs: Sequence[Run]) -> dict[str, Any]:
        raise NotImplementedError(
            "sharing device memory with another process needs exportable handles "
            "(cuMemExportToShareableHandle); the CUDA pool creates private ones"
        )

    def close(self) -> None:
        """Release every handle; the switcher has unmapped all regions before this."""
        for chunk, handle in enumerate(self._handles):
            if handle is not None:
                _release(handle)
                self._handles[chunk] = None
        if self._context is not None:
            _release_primary_context(self.device)
            self._context = None

    def _unmap_chunks(self, address: int, count: int) -> None:
        """Unmap ``count`` adjacent chunk mappings from ``address``; queued work must be done."""
        size = count * self.chunk_size
        if count > 1 and self._unmap_whole_range is not False:
            try:
                _unmap(address, size)
            except CudaError:
                if self._unmap_whole_range:
                    raise
                self._unmap_whole_range = False
            else:
                self._unmap_whole_range = True
                self.unmap_calls += 1
                return
        for i in range(count):
            _unmap(address + i * self.chunk_size, self.chunk_size)
        self.unmap_calls += count


def _chunks(runs: Sequence[Run]) -> list[int]:
    return [first + i for first, length in runs for i in range(length)]


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


def _map(address: int, size: int, handle: Any) -> None:
    _check(_driver().cuMemMap(address, size, 0, handle, 0))


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
