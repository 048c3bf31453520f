"""A worker process killed (SIGKILL) while it prewarms: the cluster forgets it, the nanny's new
worker starts clean, and prewarming works there again.

The cluster is a LocalCluster with both plugins (one worker under a nanny, one CPU slot). A tiny
model's copy takes milliseconds, too short to kill a process inside of it; so the test holds
the prewarm where the host copy would begin (the device's pool region is already reserved), a
stand-in for a slow disk that says so here, and kills the process there.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import pytest
from distributed import Client
from distributed.core import rpc

from tests.stack import plugin_cluster
from tests.test_deploy import wait_until
from warmserve.registry import Registry
from warmserve.scheduler_plugin.proxy import WarmServeProxy

pytestmark = pytest.mark.engine

DEVICE = "node-p/cpu:0"


def _hold_host_copies(dask_worker) -> None:
    """Make the worker's host copies wait for ever, noting when one has begun."""
    store = dask_worker.plugins["warmserve"].store

    async def held(spec, cancel):
        store.held = spec.name
        await asyncio.Event().wait()

    store.held = None
    store.to_host = held


def _held(dask_worker) -> str | None:
    return dask_worker.plugins["warmserve"].store.held


def call(address: str, op: str, **kwargs):
    async def go():
        async with rpc(address) as worker:
            return await getattr(worker, op)(**kwargs)

    return asyncio.run(go())


def test_worker_killed_while_it_prewarms(tiny_registry: Registry, models_dir: str):
    registry = os.path.join(models_dir, "registry.yaml")
    shm_files = len(os.listdir("/dev/shm"))
    with (
        plugin_cluster(registry, "cpu:0", "node-p") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(1)
        (victim,) = client.scheduler_info()["workers"]
        proxy = WarmServeProxy(client)
        wait_until(
            lambda: any(d["worker"] == victim for d in proxy.status()["devices"]),
            "the worker's device in the scheduler's accounting",
        )
        client.run(_hold_host_copies, workers=[victim])
        job = call(victim, "warmserve_prewarm", model="tiny-1", tier="device", devices=[DEVICE])
        assert job["state"] == "running", job
        wait_until(
            lambda: client.run(_held, workers=[victim])[victim] == "tiny-1",
            "the prewarm is under way",
        )
        (nanny,) = cluster.workers.values()
        os.kill(nanny.process.pid, signal.SIGKILL)

        def restarted() -> str | None:
            workers = list(client.scheduler_info()["workers"])
            return workers[0] if workers and workers[0] != victim else None

        wait_until(lambda: restarted() is not None, "the nanny's new worker")
        fresh = restarted()
        wait_until(
            lambda: [d["worker"] for d in proxy.status()["devices"]] == [fresh],
            "the device back in the accounting, on the new worker only",
        )
        status = call(fresh, "warmserve_status")
        (device,) = status["devices"]
        assert not device["resident"] and device["free"] == device["memory"]
        assert not status["jobs"] and not status["host_cache"]
        assert not proxy.status()["instances"]

        done = call(fresh, "warmserve_prewarm", model="tiny-1", devices=[DEVICE], wait=True)
        assert done["state"] == "done", done
        wait_until(
            lambda: list(proxy.status()["devices"][0]["resident"]) == ["tiny-1"],
            "the scheduler sees the new worker's prewarmed model",
        )
    # The killed process's host and pool memory went with it; nothing stays in /dev/shm.
    assert len(os.listdir("/dev/shm")) <= shm_files, shutil.disk_usage("/dev/shm")
