"""A weight store whose writes fail for want of space (ENOSPC, a full disk): prewarms fail
with that reason and leave nothing behind, requests are still served (an engine reads the
checkpoint, which needs no write), and the store works again once there is space.

The fault is injected, and only it: the worker's host copies (``HostCopy.fill``, the store's
one write of a model's bytes) raise ``OSError(ENOSPC)``. A real full filesystem under the store
needs a small tmpfs, which takes root to mount here, and the host tier is a memfd, which no
filesystem's size limits. The cluster is a LocalCluster with both plugins (one worker process,
one CPU slot), the front door uvicorn in a thread, as in :mod:`tests.test_restart_scheduler`.
"""

from __future__ import annotations

import errno
import os
import threading

import httpx
import pytest
from distributed import Client

from tests.leaks import leftovers, shm_left
from tests.stack import plugin_cluster
from tests.test_deploy import wait_until
from tests.test_faults_prewarm import call
from tests.test_restart_scheduler import FrontDoor, poll
from warmserve.registry import Registry
from warmserve.scheduler_plugin.proxy import WarmServeProxy
from warmserve.worker_plugin.weight_store import HostCopy

pytestmark = pytest.mark.engine

DEVICE = "node-f/cpu:0"
FILL = HostCopy.fill


def _disk(dask_worker, full: bool) -> None:
    """Make the worker's host-copy writes fail with ENOSPC (``full``), or work again."""

    def no_space(copy: HostCopy, cancel: threading.Event) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    HostCopy.fill = no_space if full else FILL


def test_disk_full_weight_store(tiny_registry: Registry, models_dir: str):
    registry_file = os.path.join(models_dir, "registry.yaml")
    shm_files = set(os.listdir("/dev/shm"))
    with (
        plugin_cluster(registry_file, "cpu:0", "node-f") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(1)
        (worker,) = client.scheduler_info()["workers"]
        proxy = WarmServeProxy(client)
        wait_until(
            lambda: any(d["worker"] == worker for d in proxy.status()["devices"]),
            "the worker's device in the scheduler's accounting",
        )
        client.run(_disk, full=True)
        for tier, devices in (("host", None), ("device", [DEVICE])):
            job = call(
                worker, "warmserve_prewarm", model="tiny-1", tier=tier, devices=devices, wait=True
            )
            assert job["state"] == "failed" and job["kind"] == "does-not-fit", job
            assert os.strerror(errno.ENOSPC) in job["error"], job
        status = call(worker, "warmserve_status")
        (device,) = status["devices"]
        assert not device["resident"] and device["free"] == device["memory"], device
        assert not status["host_cache"] and status["host"]["used"] == 0, status
        assert client.run(leftovers) == {worker: []}

        door = FrontDoor(cluster.scheduler_address, tiny_registry)
        door.start()
        try:
            body = {"model": "tiny-1", "prompt": "disk full", "max_tokens": 3}
            r = httpx.post(f"{door.url}/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            assert client.run(leftovers) == {worker: []}

            client.run(_disk, full=False)
            job = call(worker, "warmserve_prewarm", model="tiny-2", devices=[DEVICE], wait=True)
            assert job["state"] == "done", job
            assert client.run(leftovers) == {worker: []}
        finally:
            door.stop()
    poll(lambda: not shm_left(shm_files), "nothing left in /dev/shm")
