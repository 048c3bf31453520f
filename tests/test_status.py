"""``warmserve status`` against a real cluster (scheduler and worker plugins, two CPU slots, no
engines: a prewarm to device memory is enough to give one device a model and a state), and its
exit status 2 when there is no scheduler or no WarmServe on it."""

from __future__ import annotations

import json
import os
import socket
import time

import dask
import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster
from distributed.core import rpc

from tests.stack import plugin_cluster
from warmserve.registry import Registry
from warmserve.scheduler_plugin.proxy import WarmServeProxy
from warmserve.status import command


@pytest.fixture(scope="module")
def cluster(tiny_registry: Registry, models_dir: str):
    registry = os.path.join(models_dir, "registry.yaml")
    with (
        dask.config.set({"distributed.worker.daemon": False}),
        plugin_cluster(registry, "cpu:0,cpu:1", "node-s") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(1)
        worker = next(iter(client.scheduler_info()["workers"]))

        async def prewarm():
            async with rpc(worker) as w:
                return await w.warmserve_prewarm(
                    model="tiny-1", tier="device", devices=["node-s/cpu:1"], wait=True
                )

        assert client.sync(prewarm)["state"] == "done"
        WarmServeProxy(client).run_once()  # the extension reads the workers' state now
        yield cluster


def status(*args: str):
    return CliRunner().invoke(command, list(args))


def served_models(models_dir: str) -> set[str]:
    """Every model the session's registry file lists (other tests may add families to it)."""
    return set(Registry.from_yaml(os.path.join(models_dir, "registry.yaml")))


def test_tables(cluster: LocalCluster, models_dir: str):
    for _ in range(50):  # the observer samples every second: wait for a sample after the prewarm
        result = status("--scheduler", cluster.scheduler_address)
        if "tiny-1 (device)" in result.output:
            break
        time.sleep(0.2)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"policy warmserve, 2 devices, {len(served_models(models_dir))} models" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "idle" in lines["node-s/cpu:0"]
    assert "universal" in lines["node-s/cpu:1"]
    assert "tiny-1 (device)" in lines["node-s/cpu:1"]
    assert "/ 2.00 GiB" in lines["node-s/cpu:1"]
    for model in ("tiny-0", "tiny-1", "tiny-2"):
        assert lines[model].split()[1] == "tiny"  # family column


def test_json(cluster: LocalCluster, models_dir: str):
    result = status("--scheduler", cluster.scheduler_address, "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.output)["view"]
    assert {d["id"] for d in view["devices"]} == {"node-s/cpu:0", "node-s/cpu:1"}
    assert {m["name"] for m in view["models"]} == served_models(models_dir)


def test_unreachable():
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = status("--scheduler", f"tcp://127.0.0.1:{port}", "--timeout", "2")
    assert result.exit_code == 2
    assert "cannot reach the scheduler" in result.output


def test_without_warmserve():
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as plain:
        result = status("--scheduler", plain.scheduler_address)
    assert result.exit_code == 2
    assert "no WarmServe plugin" in result.output
