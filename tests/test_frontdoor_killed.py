"""A front door killed (SIGKILL) while its requests stream: the scheduler frees their slots.

The cluster is a LocalCluster with both plugins (one worker, one CPU slot); the front door is
``warmserve frontdoor --scheduler ...`` in its own session, as an operator runs it. Two streams
run through it; once one has tokens, its process group is killed. Such a front door
never reports its requests done, so the scheduler ends them when their Dask client goes away;
otherwise their slots stayed taken for good and the instance never went idle.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import dask.config
import httpx
import pytest
from distributed import Client

from tests.stack import plugin_cluster
from tests.test_deploy import DEADLINE, answers, free_port, wait_until
from warmserve.registry import Registry
from warmserve.scheduler_plugin.proxy import WarmServeProxy

pytestmark = pytest.mark.engine

STREAMS = 2


async def stream_until_killed(url: str, started: list[int]) -> None:
    """A long stream that notes its first token in ``started`` and ends when the door dies."""
    body = {
        "model": "tiny-0",
        "prompt": "killed",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        async with (
            httpx.AsyncClient(base_url=url, timeout=DEADLINE) as http,
            http.stream("POST", "/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200
            first = True
            async for line in r.aiter_lines():
                if first and line.startswith("data: "):
                    started.append(1)
                    first = False
    except httpx.HTTPError:
        pass  # the door was killed mid-stream


async def kill_mid_stream(url: str, door: subprocess.Popen) -> None:
    started: list[int] = []
    tasks = [asyncio.ensure_future(stream_until_killed(url, started)) for _ in range(STREAMS)]
    deadline = time.monotonic() + DEADLINE
    # The kill comes within a poll of a stream's first token, hundreds of tokens before its end;
    # the other stream streams too by then, or waits: either way its slot must come free.
    while not started:
        assert time.monotonic() < deadline, "no stream produced a token"
        await asyncio.sleep(0.05)
    assert not all(t.done() for t in tasks), "every stream ended before the kill"
    os.killpg(door.pid, signal.SIGKILL)
    await asyncio.gather(*tasks)


def test_killed_front_door_frees_its_slots(tiny_registry: Registry, models_dir: str, tmp_path):
    registry = os.path.join(models_dir, "registry.yaml")
    # One instance takes both streams; no second one meanwhile.
    limits = dask.config.set(
        {"warmserve.planner.instance-capacity": STREAMS, "warmserve.autoscaler.scale-up": 1e6}
    )
    with (
        limits,
        plugin_cluster(registry, "cpu:0", "node-k") as cluster,
        Client(cluster) as client,
    ):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(tmp_path / "frontdoor.log", "w") as log:
            door = subprocess.Popen(
                [
                    *(os.path.join(os.path.dirname(sys.executable), "warmserve"), "frontdoor"),
                    *("--scheduler", cluster.scheduler_address, "--port", str(port)),
                    *("--registry", registry),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(lambda: answers(f"{url}/health"), "the front door serves", door)
            asyncio.run(kill_mid_stream(url, door))
        finally:
            if door.poll() is None:
                os.killpg(door.pid, signal.SIGKILL)
            door.wait()

        proxy = WarmServeProxy(client)

        def freed() -> bool:
            s = proxy.status()
            tiny = [i for i in s["instances"] if i["model"] == "tiny-0"]
            return (
                all(i["load"] == 0 and i["on_lease"] == 0 for i in tiny)
                and not s["queued"]
                and not s["leases"]
            )

        wait_until(freed, "the killed front door's slots are free")
