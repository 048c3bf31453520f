"""Capacity from what fits (issue 22, item 3): an instance serves as many requests at once as its
devices hold KV for beside its weights and engine, up to ``instance_capacity``.

A 7B model on a 32 GB device was unservable with a fixed 32 (its KV for 32 requests and its
weights took 37 GB); now it serves fewer at once. The simulator, the policy's ledger, the live
scheduler's slots and the live worker's engines all take the figure from
:meth:`PolicyConfig.capacity`.
"""

from __future__ import annotations

import asyncio

import dask.config
import numpy as np
import pyarrow as pa
import pytest

from warmserve.policy.accounting import Accounting
from warmserve.policy.config import PolicyConfig
from warmserve.policy.feasible import never_serve
from warmserve.policy.state import ClusterSnapshot, DeviceSnapshot
from warmserve.registry import ModelSpec, Registry
from warmserve.scheduler_plugin.state import ClusterState
from warmserve.sim.cluster import ClusterSpec
from warmserve.sim.costs import load_costs
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import build_policy, policy_config
from warmserve.worker_plugin import instances as instances_module
from warmserve.worker_plugin.devices import Device
from warmserve.worker_plugin.instances import Instances
from warmserve.worker_plugin.weight_store import WeightStore

GB = 10**9
MiB = 1 << 20
SEVEN_B = ModelSpec("a", "llama-7b", 14 * GB)


def workload(arrival, model, out: int = 10) -> pa.Table:
    n = len(arrival)
    return pa.table(
        {
            "arrival": np.asarray(arrival, np.float64),
            "model": list(model),
            "input_tokens": np.full(n, 100, np.int32),
            "output_tokens": np.full(n, out, np.int32),
        }
    )


async def _blocking(fn, *args):
    return fn(*args)


def small_cluster(memory: int = 32 * GB) -> ClusterSpec:
    return ClusterSpec(1, 1, memory, 1000 * GB, Registry([SEVEN_B]), load_costs())


def test_the_rule() -> None:
    """min(instance_capacity, what the group holds beside weights and engine / KV per
    request), 0 where not even one request fits."""
    config = PolicyConfig(engine_bytes=2 * GB, kv_bytes={"a": 716 * 10**6})
    assert config.capacity(SEVEN_B, 80 * GB) == 32  # 64 GB of KV room: capped
    assert config.capacity(SEVEN_B, 32 * GB) == 22  # 16 GB / 0.716 GB
    assert config.kv_reservation(SEVEN_B, 32 * GB) == 22 * 716 * 10**6
    assert config.capacity(SEVEN_B, 16 * GB + 716 * 10**6) == 1
    assert config.capacity(SEVEN_B, 16 * GB + 716 * 10**6 - 1) == 0
    two = ModelSpec("b", "f", 40 * GB, tp=2)  # 20 GB a device; the group's KV room adds up
    assert config.capacity(two, 24 * GB) == min(32, 2 * 2 * GB // config.kv_per_request(two))


@pytest.mark.parametrize("policy", ["warmserve", "autoscale"])
def test_a_7b_model_on_a_32_gb_device_serves_fewer_requests_at_once(policy: str) -> None:
    cluster = small_cluster()
    config = policy_config(cluster)
    cap = config.capacity(SEVEN_B, 32 * GB)
    assert 1 <= cap < config.instance_capacity
    assert never_serve(cluster.models, [("n0", 32 * GB)], config) == {}
    # 40 requests at once, each 100 tokens long: cap of them run together, the rest wait.
    table = workload(np.full(40, 30.0), ["a"] * 40, out=100)
    res = Simulator(cluster, build_policy(policy, cluster, config), table, config).run()
    requests = res.requests
    assert requests.column("status").to_pylist() == ["ok"] * 40
    start = requests.column("start").to_numpy()
    finish = requests.column("finish").to_numpy()
    at_once = max(int(((start <= t) & (finish > t)).sum()) for t in start)
    assert at_once == cap
    devices = res.devices
    used = devices.column("weights_bytes").to_numpy() + devices.column("kv_bytes").to_numpy()
    assert used.max() > 29 * GB and (used + config.engine_bytes <= 32 * GB).all()


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, int, int]]:
    """Every call of PolicyConfig.capacity: (model, memory, answer)."""
    seen: list[tuple[str, int, int]] = []
    rule = PolicyConfig.capacity

    def spy(self, spec, memory):
        out = rule(self, spec, memory)
        seen.append((spec.name, memory, out))
        return out

    monkeypatch.setattr(PolicyConfig, "capacity", spy)
    return seen


def test_the_live_and_simulated_paths_call_the_same_rule(calls, monkeypatch) -> None:
    cluster = small_cluster()
    config = policy_config(cluster)
    cap = PolicyConfig.capacity(config, SEVEN_B, 32 * GB)
    calls.clear()

    # The simulator: its instances admit cap requests (above), sized by the rule.
    table = workload([30.0], ["a"])
    Simulator(cluster, build_policy("warmserve", cluster, config), table, config).run()
    assert ("a", 32 * GB, cap) in calls
    calls.clear()

    # The policy's ledger: the KV an instance reserves.
    snap = ClusterSnapshot(0.0, cluster.models, (DeviceSnapshot("n0/d0", "n0", 32 * GB),))
    acc = Accounting(snap, config)
    acc.start("a", ("n0/d0",))
    assert acc.kv["n0/d0"] == config.kv_reservation(SEVEN_B, 32 * GB)
    assert ("a", 32 * GB, cap) in calls
    calls.clear()

    # The live scheduler: an instance's slots.
    state = ClusterState(cluster.models, config)
    device = DeviceSnapshot("n0/d0", "n0", 32 * GB)
    state.update_worker("tcp://w", [device], [("i", "a", ("n0/d0",))], [], 0.0)
    assert state.free(state.instances["i"]) == cap
    assert ("a", 32 * GB, cap) in calls
    calls.clear()

    # The live worker: an engine's max_num_seqs, from the memory it reports for the device
    # (the worker's own figures: toy sizes, the rule's answer 14 here).
    seen: list = []
    monkeypatch.setattr(instances_module, "Engine", lambda spec, cfg: seen.append(cfg) or None)
    toy = ModelSpec("t", "f", 2 * MiB, path="/nonexistent/t")
    with dask.config.set({"warmserve.policy.kv-bytes": {"t": MiB}}):
        store = WeightStore([Device("node", "cpu", 0, 16 * MiB)], 64 * MiB, _blocking)
        try:
            workers = Instances(store, _blocking, 4 * MiB, 1.0, lambda *a: None)
            asyncio.run(workers.start_engine(toy, "node/cpu:0", keep="t"))
        finally:
            store.close()
    assert [c.max_num_seqs for c in seen] == [14]
    assert ("t", 16 * MiB, 14) in calls
