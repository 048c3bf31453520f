"""bench/gpu_e2e.py's pure parts: its GPU memory plan, the cluster file fitted to it, P99 over
every request, and the GPU budget it gives the workers (no stack, no vLLM: fast)."""

from __future__ import annotations

import argparse
import os

import pyarrow as pa
import pytest

from bench import gpu_e2e
from warmserve.policy.config import PolicyConfig
from warmserve.registry import ModelSpec, Registry
from warmserve.sim.cluster import load_cluster
from warmserve.sim.policies import policy_config

BYTES_8B = 16_060_522_496  # bench/results/gpu_live.json model.bytes


@pytest.fixture
def virtual() -> Registry:
    return Registry(ModelSpec(f"v{i}", "l8b", BYTES_8B) for i in range(6))


def gpu_plan(registry: Registry) -> tuple[dict, dict]:
    args = argparse.Namespace(kv_gib=2.0, devices=["cuda:0"], stage_host=True)
    vars(args).update(gpu_e2e.GPU_DEFAULTS)
    return gpu_e2e.settings_for(args, registry, "cuda")


def test_gpu_plan_holds_fewer_engines_than_models(virtual):
    extra, plan = gpu_plan(virtual)
    assert plan["share_slots"] == 4  # 4 engines of 20.2 GB in 82 GB, not 6
    assert 4 * plan["worker_engine_bytes"] <= plan["device_budget_bytes"]
    assert 5 * plan["worker_engine_bytes"] > plan["device_budget_bytes"]
    assert plan["models_in_host"] == 6
    assert extra["warmserve.worker.gpu-memory"] == gpu_e2e.GPU_DEFAULTS["device_memory"]
    assert extra["warmserve.policy.kv-bytes"] == dict.fromkeys(virtual, 2**31 // 32)


def test_cluster_file_plans_as_the_live_run(virtual, tmp_path):
    extra, plan = gpu_plan(virtual)
    registry = os.fspath(tmp_path / "registry.yaml")
    virtual.to_yaml(registry)
    spec = load_cluster(gpu_e2e.CLUSTER, registry)
    spec.check()
    planned = policy_config(spec, PolicyConfig())
    assert spec.device_count == 1
    assert spec.device_memory == plan["device_budget_bytes"]
    assert spec.host_memory >= 6 * BYTES_8B
    assert planned.engine_bytes == plan["engine_bytes"]
    assert planned.kv_bytes == extra["warmserve.policy.kv-bytes"]
    assert spec.costs.request_timeout_s == gpu_e2e.REQUEST_TIMEOUT
    assert spec.costs.profile(virtual["v0"]).name == "8b"


def test_p99_all_counts_requests_not_served_as_never():
    def table(ttfts: list[float]) -> pa.Table:
        status = ["ok" if t == t else "error" for t in ttfts]
        return pa.table({"ttft": ttfts, "status": status})

    served = [float(i) for i in range(1, 100)]
    assert gpu_e2e.p99_all(table([*served, float("nan")]), 100) == 99.0
    assert gpu_e2e.p99_all(table([*served[:-1], float("nan")]), 100) == float("inf")
    assert gpu_e2e.p99_all(table(served), 100) == 99.0  # a request never recorded: rank 99
    assert gpu_e2e.p99_all(table(served[:-1]), 100) == float("inf")
