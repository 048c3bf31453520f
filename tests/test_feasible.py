"""A model that can never serve is named with its numbers, in the policy's rule and live.

The simulator's side (exit 2 at load) is in tests/test_sim.py; here the rule itself and the
live scheduler, which answers such a model's requests at once with the reason instead of
letting them wait for their timeout.
"""

from __future__ import annotations

import asyncio
import os

from distributed import Client, Scheduler

from warmserve import protocol
from warmserve.policy.config import PolicyConfig
from warmserve.policy.feasible import never_serve, share_places_nothing
from warmserve.policy.state import DeviceSnapshot
from warmserve.registry import ModelSpec, Registry
from warmserve.scheduler_plugin.extension import NAME

GB = 10**9
CONFIG = PolicyConfig(engine_bytes=2 * GB, kv_fraction=0.5, instance_capacity=32)


def test_a_group_must_hold_weights_kv_and_engine_on_each_device():
    """Weights, an engine and the smallest useful KV cache, one request's, on each device."""
    models = Registry(
        [
            ModelSpec("fits", "f", 40 * GB, tp=2),  # 20 + 0.3 + 2 GB per device
            # 58 GB of weights fit a 60 GB device; with 0.9 GB of one request's KV and 2 GB of
            # engine they do not.
            ModelSpec("weights-only", "g", 116 * GB, tp=2),
            ModelSpec("too-wide", "h", 1 * GB, tp=4),
        ]
    )
    devices = [("n0", 80 * GB), ("n0", 60 * GB), ("n1", 80 * GB)]
    never = never_serve(models, devices, CONFIG)
    assert sorted(never) == ["too-wide", "weights-only"]
    assert "needs 60.9 GB per device of its 2-device group" in never["weights-only"]
    assert "KV cache for one request" in never["weights-only"]
    assert "more than the 60.0 GB" in never["weights-only"]  # n0's second device bounds it
    assert "tp=4" in never["too-wide"]
    # Two 80 GB devices on one node make a group that holds it.
    assert "weights-only" not in never_serve(models, [*devices, ("n1", 80 * GB)], CONFIG)


def test_share_with_parts_too_small_for_every_model():
    models = Registry([ModelSpec("a", "f", 14 * GB), ModelSpec("b", "f", 20 * GB)])
    two = PolicyConfig(share_slots=2, kv_fraction=0.5)
    assert share_places_nothing(models, [("n0", 48 * GB)], two) is None  # a: 21 GB in 24
    why = share_places_nothing(models, [("n0", 40 * GB)], two)
    assert why is not None and "parts of 20.0 GB" in why and "'a'" in why and "21.0 GB" in why


def test_the_scheduler_answers_at_once_for_a_model_that_cannot_run(tmp_path):
    models = Registry([ModelSpec("small", "f", 1 * GB), ModelSpec("huge", "f", 100 * GB)])
    registry_file = os.fspath(tmp_path / "registry.yaml")
    models.to_yaml(registry_file)

    async def run() -> tuple[dict, dict]:
        async with (
            await Scheduler(
                host="127.0.0.1",
                port=0,
                dashboard_address=":0",
                preload=["warmserve.scheduler_plugin"],
                preload_argv=[["--warmserve-registry", registry_file]],
            ) as s,
            Client(s.address, asynchronous=True) as client,
        ):
            route = getattr(client.scheduler, protocol.SCHEDULER_ROUTE)
            waiting = await route(model="huge", request_id="r0")  # no worker yet: it may come
            ext = s.extensions[NAME]
            ext.state.update_worker(
                "tcp://w0", [DeviceSnapshot("n/cuda:0", "n", 80 * GB)], [], [], 1.0
            )
            return waiting, await route(model="huge", request_id="r1")

    waiting, refused = asyncio.run(run())
    assert waiting["status"] == "queued"
    assert refused["status"] == "failed"
    assert "model 'huge' needs" in refused["reason"] and "80.0 GB" in refused["reason"]
