"""Instances on one device, without vLLM: engines are stand-ins that switch and serve instantly.

What is checked is the worker's bookkeeping: how many instances a device takes (as many as its
memory holds engines, as the ``share`` baseline places two per device), which engine an
activation reuses, and that making room never stops an engine serving an instance.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

from warmserve.engine.engine import Switch
from warmserve.policy.state import Tier
from warmserve.protocol import GenerateRequest, TokenChunk
from warmserve.registry import ModelSpec
from warmserve.worker_plugin import instances as instances_module
from warmserve.worker_plugin.devices import Device
from warmserve.worker_plugin.errors import DeviceBusy, DoesNotFit
from warmserve.worker_plugin.instances import Instances
from warmserve.worker_plugin.weight_store import WeightStore

MiB = 1 << 20
DEV = "node/cpu:0"


class FakeEngine:
    """What Instances uses of warmserve.engine.Engine."""

    started: ClassVar[list[str]] = []

    def __init__(self, model: ModelSpec, config) -> None:
        self.model = model
        self.switches: list[str] = []
        self.closed = False
        self.in_flight = 0
        FakeEngine.started.append(model.name)

    def alive(self) -> bool:
        return not self.closed

    def switch(self, model: ModelSpec, weights) -> Switch:
        if self.in_flight:  # as Engine.switch: EngineBusy
            raise RuntimeError(f"{self.in_flight} requests in flight")
        self.switches.append(model.name)
        self.model = model
        return Switch(0.0, "copy")

    def shutdown(self) -> None:
        self.closed = True

    async def generate(self, req: GenerateRequest):
        """One chunk naming the model that served it. As in Engine, the request counts in
        ``in_flight`` only once the engine has added it, a step after the call."""
        await asyncio.sleep(0)
        self.in_flight += 1
        try:
            await asyncio.sleep(0)
            yield TokenChunk(self.model.name, [], "stop")
        finally:
            self.in_flight -= 1


def spec(name: str, family: str) -> ModelSpec:
    # 2 MiB of weights: with 4 MiB of KV an engine takes 6 MiB of its device.
    return ModelSpec(name=name, family=family, nbytes=2 * MiB, path=f"/nonexistent/{name}")


A0, A1, A2 = spec("a-0", "a"), spec("a-1", "a"), spec("a-2", "a")
B0 = spec("b-0", "b")


async def _blocking(fn, *args):
    return fn(*args)


@pytest.fixture
def make(monkeypatch):
    monkeypatch.setattr(instances_module, "Engine", FakeEngine)
    FakeEngine.started = []
    made = []

    def build(device_memory: int) -> Instances:
        store = WeightStore([Device("node", "cpu", 0, device_memory)], 64 * MiB, _blocking)
        inst = Instances(store, _blocking, 4 * MiB, 1.0, lambda *a: None)
        made.append(store)
        return inst

    yield build
    for store in made:
        store.close()


def run(coro):
    return asyncio.run(coro)


def test_device_serves_two_models_of_one_family(make):
    inst = make(16 * MiB)  # room for two engines of 6 MiB
    first = run(inst.activate(A0, DEV))
    second = run(inst.activate(A1, DEV))
    assert first.slot is not second.slot
    assert sorted(i.model for i in inst.instances.values()) == ["a-0", "a-1"]
    assert FakeEngine.started == ["a-0", "a-1"]
    assert inst.store.memory[DEV].free_bytes == 4 * MiB
    with pytest.raises(DoesNotFit):  # a third engine does not fit, and nothing was stopped
        run(inst.activate(A2, DEV))
    assert len(inst.instances) == 2 and all(s.engine.alive() for s in inst.engines.values())


def test_device_serves_two_families(make):
    inst = make(16 * MiB)
    run(inst.activate(A0, DEV))
    run(inst.activate(B0, DEV))
    assert {s.family for s in inst.slots(DEV)} == {"a", "b"}
    assert len(inst.instances) == 2


def test_same_model_twice_on_a_device_is_busy(make):
    inst = make(16 * MiB)
    run(inst.activate(A0, DEV))
    with pytest.raises(DeviceBusy):
        inst.pick_device(A0, [DEV])
    with pytest.raises(DeviceBusy):
        run(inst.activate(A0, DEV))


def test_idle_engine_is_reused_before_a_new_one_starts(make):
    inst = make(16 * MiB)
    first = run(inst.activate(A0, DEV))
    second = run(inst.activate(A1, DEV))
    run(inst.deactivate(first.id))
    assert inst.tier(A2, DEV) == Tier.ENGINE
    third = run(inst.activate(A2, DEV))  # switches the idle engine in place
    assert third.slot is first.slot and first.slot.engine.switches == ["a-2"]
    assert len(FakeEngine.started) == 2
    run(inst.deactivate(second.id))
    again = run(inst.activate(A1, DEV))  # the idle engine that holds a-1: no switch
    assert again.slot is second.slot and second.slot.engine.switches == []


def test_making_room_stops_idle_engines_only(make):
    inst = make(12 * MiB)  # two engines exactly
    serving = run(inst.activate(A0, DEV))
    idle = run(inst.activate(A1, DEV))
    run(inst.deactivate(idle.id))
    b = run(inst.activate(B0, DEV))  # no idle engine of b: the idle engine of a makes room
    assert idle.slot.engine.closed and not serving.slot.engine.closed
    assert {i.model for i in inst.instances.values()} == {"a-0", "b-0"}
    assert b.slot.key in inst.store.memory[DEV].engines
    assert idle.slot.key not in inst.store.memory[DEV].engines
    with pytest.raises(DoesNotFit):  # both engines serve: neither is stopped
        run(inst.activate(A2, DEV))
    assert not serving.slot.engine.closed and not b.slot.engine.closed


def test_dead_engine_frees_its_share_of_the_device(make):
    inst = make(12 * MiB)
    first = run(inst.activate(A0, DEV))
    run(inst.activate(B0, DEV))
    first.slot.engine.closed = True  # died
    dead = run(inst.check())
    assert dead == [first.slot]
    assert [i.model for i in inst.instances.values()] == ["b-0"]
    assert inst.store.memory[DEV].free_bytes == 6 * MiB
    run(inst.activate(A1, DEV))
    assert len(inst.instances) == 2


def test_a_switch_waits_for_the_idle_engine_to_let_its_last_request_go(make):
    """The scheduler may stop an instance a moment before its engine has finished the last
    request; the activation that reuses the engine waits for it instead of failing."""
    inst = make(16 * MiB)

    async def main():
        first = await inst.activate(A0, DEV)
        engine = first.slot.engine
        await inst.deactivate(first.id)
        engine.in_flight = 1
        asyncio.get_running_loop().call_later(0.05, setattr, engine, "in_flight", 0)
        second = await inst.activate(A1, DEV)
        assert second.slot.engine is engine and engine.switches == ["a-1"]
        await inst.deactivate(second.id)
        engine.in_flight = 1  # never lets go: the device is busy, nothing switched
        with pytest.raises(DeviceBusy, match="in flight"):
            await inst.activate(A2, DEV)
        assert engine.switches == ["a-1"]

    run(main())


def test_a_switch_waits_for_a_request_routed_before_the_engine_counts_it(make):
    """A front door may send a request on a lease the scheduler has just ended: routed to the
    instance before its deactivation, the request is not yet in the engine's count when the
    next activation switches the engine. The switch waits for it, and it is served by its own
    model (the switch went first and the request was served by the new one)."""
    inst = make(16 * MiB)

    async def main():
        first = await inst.activate(A0, DEV)
        engine = first.slot.engine
        served = []

        async def request():
            async for chunk in inst.generate(GenerateRequest("r1", "a-0")):
                served.append(chunk.text)

        task = asyncio.ensure_future(request())
        while not first.in_flight:  # routed, not yet added by the engine
            await asyncio.sleep(0)
        assert engine.in_flight == 0
        await inst.deactivate(first.id)
        second = await inst.activate(A1, DEV)
        await task
        assert served == ["a-0"]
        assert second.slot.engine is engine and engine.switches == ["a-1"]
        assert first.slot.requests == 0

    run(main())
