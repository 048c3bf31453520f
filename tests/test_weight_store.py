"""The weight store on generated models: copies to host and device memory, one per destination.

Copies run in threads (``asyncio.to_thread``, as the worker runs them), so two requests for the
same model on the same device really overlap, as a prewarm and an activation do on a worker.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from warmserve.registry import Registry
from warmserve.worker_plugin.devices import Device
from warmserve.worker_plugin.weight_store import WeightStore

MiB = 1 << 20
DEV = "node/cpu:0"


async def _in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


@pytest.fixture
def store():
    s = WeightStore([Device("node", "cpu", 0, 64 * MiB)], 64 * MiB, _in_thread)
    yield s
    s.close()


def test_concurrent_copies_to_one_device_share_one_region(store, tiny_registry: Registry):
    spec = tiny_registry["tiny-0"]

    async def both():
        return await asyncio.gather(
            *(store.to_device(spec, DEV, threading.Event()) for _ in range(3))
        )

    first, *others = asyncio.run(both())
    assert all(r is first for r in others)
    assert first.filled
    assert store.resident_on(DEV) == ["tiny-0"]
    assert store.host_models() == ["tiny-0"]
    memory = store.memory[DEV]
    assert memory.used_bytes == memory._chunks(first.layout.nbytes)  # one region, not three


def test_a_failed_copy_fails_its_waiters_and_leaves_nothing(store, tiny_registry: Registry):
    spec = tiny_registry["tiny-1"]
    cancel = threading.Event()
    cancel.set()  # the first caller's copy is cancelled before it starts

    async def both():
        return await asyncio.gather(
            store.to_device(spec, DEV, cancel),
            store.to_device(spec, DEV, threading.Event()),
            return_exceptions=True,
        )

    results = asyncio.run(both())
    assert all(isinstance(r, BaseException) for r in results), results
    assert store.resident_on(DEV) == [] and store.memory[DEV].used_bytes == 0
    # Nothing is left half-reserved: the next request copies the model afresh.
    resident = asyncio.run(store.to_device(spec, DEV, threading.Event()))
    assert resident.filled and store.resident_on(DEV) == ["tiny-1"]
