"""``dask worker ... --preload warmserve.worker_plugin --warmserve-devices ...`` as real commands.

A ``dask scheduler`` and a ``dask worker`` subprocess; the test only asks the worker for its
status (no engine), so it stays quick.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from distributed import Client
from distributed.core import rpc

from warmserve.registry import Registry

DASK = os.path.join(os.path.dirname(sys.executable), "dask")


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in reversed(started):
        proc.terminate()
    for proc in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dask_worker_command_line(tmp_path, processes, tiny_registry: Registry, models_dir: str):
    scheduler_file = os.fspath(tmp_path / "scheduler.json")
    processes.append(
        subprocess.Popen(
            [
                *(DASK, "scheduler", "--scheduler-file", scheduler_file, "--port", "0"),
                *("--dashboard-address", ":0"),
            ],
        )
    )
    # The address goes first, as documented: with --scheduler-file and no address, dask worker's
    # click parser would take the first unknown option (--warmserve-devices) as the address.
    with Client(scheduler_file=scheduler_file, timeout="60s") as client:
        scheduler = client.scheduler.address
    processes.append(
        subprocess.Popen(
            [
                *(DASK, "worker", scheduler, "--nthreads", "1"),
                *("--no-dashboard", "--preload", "warmserve.worker_plugin"),
                *("--warmserve-devices", "cpu:0,cpu:1", "--warmserve-device-memory", "1GiB"),
                *("--warmserve-node", "cli-node"),
                *("--warmserve-registry", os.path.join(models_dir, "registry.yaml")),
            ],
        )
    )
    with Client(scheduler, timeout="60s") as client:
        client.wait_for_workers(1, timeout=120)
        address, info = next(iter(client.scheduler_info()["workers"].items()))
        assert info["resources"] == {"warmserve-device": 2}

        async def status():
            async with rpc(address) as worker:
                return await worker.warmserve_status()

        status = client.sync(status)
    assert [d["id"] for d in status["devices"]] == ["cli-node/cpu:0", "cli-node/cpu:1"]
    assert all(d["memory"] == 1 << 30 for d in status["devices"])
