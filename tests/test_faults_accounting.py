"""A worker lost while an instance starts on it: the accounting forgets the start at once."""

from __future__ import annotations

import asyncio

from warmserve.policy.config import PolicyConfig
from warmserve.policy.state import DeviceSnapshot
from warmserve.registry import ModelSpec, Registry
from warmserve.scheduler_plugin.state import ClusterState, Starting

MODELS = Registry([ModelSpec("a", "f", 100)])


def test_lost_worker_ends_its_starts_and_hides_its_devices():
    async def scenario() -> tuple[ClusterState, Starting]:
        s = ClusterState(MODELS, PolicyConfig(instance_capacity=2))
        for w, dev in (("tcp://w0", "n/cpu:0"), ("tcp://w1", "n/cpu:1")):
            s.update_worker(w, [DeviceSnapshot(dev, "n", 1000)], [], [], now=0.0)
        start = Starting("a", ("n/cpu:0",), "tcp://w0")
        s.starting.append(start)
        s.remove_worker("tcp://w0")
        s.end_start(start, None)  # the activation call fails later: nothing more happens
        return s, start

    s, start = asyncio.run(scenario())
    assert start.ready.done() and start.ready.result() is None
    snap = s.snapshot(0.0, {})
    assert [d.id for d in snap.devices] == ["n/cpu:1"] and snap.instances == ()
