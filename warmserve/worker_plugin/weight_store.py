"""The weight store: a model's weights on disk, in the node's host memory, in device memory.

Tiers, coldest first (``warmserve.policy.state.Tier``):

- DISK: the safetensors checkpoint (one file or shards) in the folder the registry names.
- HOST: one memfd per model, filled straight from the files' data sections
  (``warmserve.models.weights.WeightLayout``: the shards one after another). A memfd rather than a
  file in /dev/shm because its memory goes back to the OS when the last mapping goes, even when
  the worker is killed: nothing is left behind for a janitor to delete. Another process on the
  node (an engine's child) maps it without a copy through ``/proc/<pid>/fd/<fd>``
  (:meth:`HostCopy.share_info`).
- DEVICE: a region of the device's memory pool (``warmserve.kernels.MemorySwitcher``: CUDA
  memory on a GPU, the host backend on a CPU slot), laid out as the host copy so one flat copy
  fills it.

Each device's memory is one ledger (:class:`DeviceMemory`): weights regions and engine
reservations are charged when accepted, before any byte moves, so two prewarms (or a prewarm and
an activation) never spend the same memory, and a prewarm that does not fit raises
:class:`DoesNotFit` having changed nothing. Copies run in a thread and check a cancel flag
between slices, so an eviction can stop a prewarm of a large model midway.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from warmserve.kernels.cuda_memory import CudaError
from warmserve.kernels.switcher import MemorySwitcher, OutOfChunks, Region
from warmserve.models.weights import WeightLayout, read_layout
from warmserve.registry import ModelSpec
from warmserve.worker_plugin.devices import Device
from warmserve.worker_plugin.errors import Cancelled, DoesNotFit

logger = logging.getLogger("warmserve.worker.weights")

SLICE = 64 << 20  # bytes copied between two looks at the cancel flag
PAGE = mmap.PAGESIZE


def _check(cancel: threading.Event, model: str) -> None:
    if cancel.is_set():
        raise Cancelled(f"prewarm of {model!r} was cancelled")


@dataclass(eq=False)
class HostCopy:
    """One model's weights in a memfd mapped into this process."""

    model: str
    layout: WeightLayout
    fd: int
    mapping: mmap.mmap
    flat: torch.Tensor  # uint8 over the whole mapping
    pinned: bool = False  # page-locked for the GPU (cudaHostRegister)
    filled: bool = False
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        self.last_used = time.monotonic()
        return self.layout.views(self.flat)

    def share_info(self) -> dict:
        """How another process on the node maps these bytes without a copy."""
        return {"path": f"/proc/{os.getpid()}/fd/{self.fd}", "nbytes": self.nbytes}

    def fill(self, cancel: threading.Event) -> None:
        """Read the checkpoint's data into the mapping (blocking; run in a thread)."""
        with memoryview(self.mapping) as view:
            self.layout.read_into(view, lambda: _check(cancel, self.model), SLICE)
        self.filled = True

    def close(self) -> None:
        """Unmap and close; the memory returns to the OS once no other process maps it."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.pinned = False
        self.flat = torch.empty(0, dtype=torch.uint8)
        try:
            self.mapping.close()
        except BufferError:  # a view escaped; the mapping goes when it is collected
            logger.debug("host copy of %s still has views; unmapped on collection", self.model)
        os.close(self.fd)


class HostTier:
    """This worker's host-memory tier, within a byte budget.

    With ``pin`` (a worker with GPUs), each copy is page-locked when it is made, so the copies
    to a device pool or an engine run at the bus's speed and without a staging buffer; the
    locking costs about a second per 16 GB, paid by the prewarm, not by an activation.
    """

    def __init__(self, budget: int, pin: bool = False) -> None:
        self.budget = budget
        self.pin = pin
        self.copies: dict[str, HostCopy] = {}

    @property
    def used_bytes(self) -> int:
        return sum(_pages(c.nbytes) for c in self.copies.values())

    def ready(self, model: str) -> HostCopy | None:
        copy = self.copies.get(model)
        return copy if copy is not None and copy.filled else None

    def reserve(self, spec: ModelSpec) -> HostCopy:
        """An empty memfd for ``spec``; DoesNotFit when the budget cannot take it."""
        layout = read_layout(spec.path)
        need = _pages(layout.nbytes)
        if self.used_bytes + need > self.budget:
            raise DoesNotFit(
                f"host memory: {spec.name!r} needs {need} bytes, "
                f"{self.budget - self.used_bytes} of {self.budget} free"
            )
        fd = os.memfd_create(f"warmserve-{spec.name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, need)
            mapping = mmap.mmap(fd, need, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        flat = torch.frombuffer(mapping, dtype=torch.uint8)[: layout.nbytes]
        copy = HostCopy(spec.name, layout, fd, mapping, flat)
        if self.pin:
            _pin(flat)
            copy.pinned = True
        self.copies[spec.name] = copy
        return copy

    def drop(self, model: str) -> bool:
        copy = self.copies.pop(model, None)
        if copy is None:
            return False
        copy.close()
        return True

    def close(self) -> None:
        for model in list(self.copies):
            self.drop(model)


@dataclass(eq=False)
class Resident:
    """A model's weights in a device pool region."""

    model: str
    layout: WeightLayout
    region: Region
    filled: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def tensors(self) -> dict[str, torch.Tensor]:
        self.last_used = time.monotonic()
        flat = self.region.tensor(torch.uint8, (self.layout.nbytes,))
        return self.layout.views(flat)

    def fill(self, source: torch.Tensor, cancel: threading.Event) -> None:
        """Copy the flat host bytes into the region (blocking; run in a thread)."""
        flat = self.region.tensor(torch.uint8, (self.layout.nbytes,))
        for start in range(0, self.layout.nbytes, SLICE):
            _check(cancel, self.model)
            end = min(self.layout.nbytes, start + SLICE)
            flat[start:end].copy_(source[start:end])
        self.filled = True


class DeviceMemory:
    """One device's memory: a pool for weights plus reservations for engines, in one ledger.

    Engine reservations are accounting only (the engine allocates its own memory); weights
    regions are real pool regions. Both are charged in whole pool chunks.
    """

    def __init__(self, device: Device, backend: str = "auto") -> None:
        self.device = device
        if device.kind == "cpu":
            backend = "host"
        self.pool = MemorySwitcher(device.memory, backend=backend, device=device.local_index)
        self.resident: dict[str, Resident] = {}
        self.engines: dict[str, int] = {}  # engine key -> bytes reserved for it

    def _chunks(self, nbytes: int) -> int:
        c = self.pool.chunk_size
        return -(-nbytes // c) * c

    @property
    def used_bytes(self) -> int:
        return self.pool.used_bytes + sum(self.engines.values())

    @property
    def free_bytes(self) -> int:
        return self.pool.capacity - self.used_bytes

    def fits(self, nbytes: int) -> bool:
        return self._chunks(nbytes) <= self.free_bytes

    def reserve_weights(self, spec: ModelSpec, layout: WeightLayout) -> Resident:
        """A region for ``spec``'s weights; DoesNotFit (nothing changed) when there is no room."""
        if not self.fits(layout.nbytes):
            raise DoesNotFit(self._no_room(spec.name, layout.nbytes))
        try:
            region = self.pool.reserve(f"weights:{spec.name}", layout.nbytes)
        except (OutOfChunks, CudaError) as e:  # CudaError: the driver has no memory left
            raise DoesNotFit(f"{self._no_room(spec.name, layout.nbytes)} ({e})") from e
        resident = Resident(spec.name, layout, region)
        self.resident[spec.name] = resident
        return resident

    def drop_weights(self, model: str) -> bool:
        """Release a model's region and give its physical memory back."""
        if self.resident.pop(model, None) is None:
            return False
        self.pool.release(f"weights:{model}")
        self.pool.trim()
        return True

    def reserve_engine(self, key: str, nbytes: int) -> None:
        """Charge an engine (``key`` names it; a device may run several, of any families)."""
        if key in self.engines:
            raise ValueError(f"{self.device.id}: engine {key!r} is already reserved")
        if not self.fits(nbytes):
            raise DoesNotFit(self._no_room(f"engine {key}", nbytes))
        self.engines[key] = self._chunks(nbytes)

    def release_engine(self, key: str) -> None:
        self.engines.pop(key, None)

    def _no_room(self, what: str, nbytes: int) -> str:
        return (
            f"{self.device.id}: {what} needs {self._chunks(nbytes)} bytes, "
            f"{self.free_bytes} of {self.device.memory} free"
        )

    def close(self) -> None:
        self.resident.clear()
        self.engines.clear()
        self.pool.close()


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def _pin(flat: torch.Tensor) -> None:
    """Page-lock a host buffer for CUDA copies (CUDA's cudaHostRegister, portable flag)."""
    err = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 1)
    if int(err) != 0:
        raise DoesNotFit(f"cannot page-lock {flat.numel()} bytes of host memory: CUDA error {err}")


class WeightStore:
    """Moves models between tiers for one worker: host copies and one pool per device.

    Methods that change what is resident run on the worker's event loop; the byte copies they
    start go to ``run_blocking`` (a thread), so the loop keeps serving heartbeats and requests.
    """

    def __init__(
        self,
        devices: list[Device],
        host_budget: int,
        run_blocking: Callable,
        backend: str = "auto",
    ) -> None:
        self.host = HostTier(host_budget, pin=any(d.kind == "cuda" for d in devices))
        self.memory: dict[str, DeviceMemory] = {d.id: DeviceMemory(d, backend) for d in devices}
        self._run_blocking = run_blocking
        self._moving: dict[Hashable, asyncio.Future] = {}  # copies under way, by destination

    async def _once(self, key: Hashable, move: Callable[[], Awaitable]) -> Any:
        """Run ``move()`` unless a move to the same place is under way; then wait for that one.

        A prewarm and an activation (or two prewarms) can ask for the same model on the same
        device at once; both must get the one copy, not reserve a second region for it (or
        drop the first one's when theirs fails). The first caller's cancel event governs the
        copy; a waiter gets its outcome, failure included."""
        running = self._moving.get(key)
        if running is None:
            running = self._moving[key] = asyncio.ensure_future(move())
            running.add_done_callback(lambda f: self._moving.pop(key, None))
        return await asyncio.shield(running)

    async def to_host(self, spec: ModelSpec, cancel: threading.Event) -> HostCopy:
        """Stage ``spec`` in host memory (no-op when it is there)."""
        copy = self.host.ready(spec.name)
        if copy is not None:
            return copy
        return await self._once(("host", spec.name), lambda: self._fill_host(spec, cancel))

    async def _fill_host(self, spec: ModelSpec, cancel: threading.Event) -> HostCopy:
        copy = self.host.reserve(spec)
        try:
            await self._run_blocking(copy.fill, cancel)
        except BaseException as e:
            self.host.drop(spec.name)
            # No space for the bytes (ENOSPC, as a full disk says; ENOMEM): the model does not
            # fit, as when the budget says so, and the job fails with that reason. Left an
            # OSError, it was logged with a traceback at every prewarm the planner asked for.
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise DoesNotFit(f"host memory: {spec.name!r} does not fit ({e})") from e
            raise
        logger.debug("%s: in host memory (%d bytes)", spec.name, copy.nbytes)
        return copy

    async def to_device(self, spec: ModelSpec, device: str, cancel: threading.Event) -> Resident:
        """Put ``spec`` in ``device``'s pool, staging it in host memory first if needed."""
        resident = self.memory[device].resident.get(spec.name)
        if resident is not None and resident.filled:
            return resident
        return await self._once(
            (device, spec.name), lambda: self._fill_device(spec, device, cancel)
        )

    async def _fill_device(self, spec: ModelSpec, device: str, cancel: threading.Event) -> Resident:
        memory = self.memory[device]
        layout = read_layout(spec.path)
        # Charge the device before the host copy, so a model that cannot fit costs nothing.
        resident = memory.reserve_weights(spec, layout)
        try:
            copy = await self.to_host(spec, cancel)
            await self._run_blocking(resident.fill, copy.flat, cancel)
        except BaseException:
            memory.drop_weights(spec.name)
            raise
        logger.debug("%s: in device memory of %s", spec.name, device)
        return resident

    def drop_device(self, model: str, device: str) -> bool:
        return self.memory[device].drop_weights(model)

    def drop_host(self, model: str) -> bool:
        return self.host.drop(model)

    def weights(self, model: str, device: str) -> Mapping[str, torch.Tensor] | None:
        """The warmest copy of ``model``'s tensors for an engine on ``device``, or None (disk)."""
        resident = self.memory[device].resident.get(model)
        if resident is not None and resident.filled:
            return resident.tensors()
        copy = self.host.ready(model)
        return copy.tensors() if copy is not None else None

    def resident_on(self, device: str) -> list[str]:
        return [m for m, r in self.memory[device].resident.items() if r.filled]

    def host_models(self) -> list[str]:
        return [m for m, c in self.host.copies.items() if c.filled]

    def close(self) -> None:
        for memory in self.memory.values():
            memory.close()
        self.host.close()
