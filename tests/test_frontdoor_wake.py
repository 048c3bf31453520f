"""Waiting requests ask again as soon as the scheduler says that an instance went idle.

Without it, a request queued at the front door (no instance had room and no start was possible)
learnt of memory freed by another model's idle instance only at its next poll
(``admission.POLL``), which added up to a poll interval to its time to first token. The poll is
set to an hour here, so a request that gets through was woken by the event.

Real schedulers in this process (with the WarmServe preload where the extension is under test),
a real asynchronous Dask client and the front door's own connect path.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from distributed import Client, Scheduler

from warmserve import protocol
from warmserve.frontdoor import admission
from warmserve.frontdoor.catalog import Catalog
from warmserve.frontdoor.door import FrontDoor
from warmserve.policy.state import DeviceSnapshot
from warmserve.registry import ModelSpec, Registry
from warmserve.scheduler_plugin.extension import NAME

MODELS = Registry([ModelSpec("a", "f", 100), ModelSpec("b", "f", 100)])
WAIT = 60  # a guard against a hang, never reached when the code works


async def _scheduler(preload: list[str] | None = None, argv: list | None = None) -> Scheduler:
    return await Scheduler(
        host="127.0.0.1",
        port=0,
        dashboard_address=":0",
        preload=preload or [],
        preload_argv=argv or [],
    )


async def _subscribed(s: Scheduler, heard: asyncio.Queue) -> None:
    """Return once events reach the subscriber (a subscription travels on the client's batched
    stream, so the scheduler may not know it yet when the next RPC arrives)."""
    while heard.empty():
        s.log_event(protocol.SCHEDULER_CHANGED, "probe")
        await asyncio.sleep(0.05)
    while not heard.empty():
        heard.get_nowait()
        await asyncio.sleep(0.05)  # probes still on their way


def test_a_request_ending_an_instances_work_is_announced(tmp_path):
    registry_file = os.fspath(tmp_path / "registry.yaml")
    MODELS.to_yaml(registry_file)

    async def run() -> list:
        async with await _scheduler(
            ["warmserve.scheduler_plugin"], [["--warmserve-registry", registry_file]]
        ) as s:
            ext = s.extensions[NAME]
            device = DeviceSnapshot("n/cpu:0", "n", 1000)
            ext.state.update_worker("tcp://w0", [device], [("i0", "a", ("n/cpu:0",))], [], 1.0)
            heard: asyncio.Queue = asyncio.Queue()
            async with Client(s.address, asynchronous=True) as client:
                client.subscribe_topic(protocol.SCHEDULER_CHANGED, heard.put_nowait)
                await _subscribed(s, heard)
                await client.scheduler.warmserve_route(model="a", request_id="r0")
                await client.scheduler.warmserve_route(model="a", request_id="r1")
                await client.scheduler.warmserve_done(request_id="r0")  # i0 still busy
                await client.scheduler.warmserve_done(request_id="r1")  # i0 idle
                _, model = await asyncio.wait_for(heard.get(), WAIT)
                return [model, heard.qsize()]

    model, more = asyncio.run(run())
    assert model == "a"
    assert more == 0  # one event: the first done left r1 on the instance


def test_the_event_wakes_a_waiting_request(monkeypatch):
    monkeypatch.setattr(admission, "POLL", 3600.0)

    async def run() -> tuple[admission.Route, list[str]]:
        async with await _scheduler() as s:
            door = FrontDoor(
                s.address,
                Catalog(MODELS),
                max_queue=8,
                retry_after=1,
                request_timeout=30,
                max_body=1 << 20,
            )
            await door.connect()
            try:
                asked: list[str] = []
                room = asyncio.Event()

                async def route(model, request_id, exclude, lease) -> dict:
                    """Stands in for the scheduler's routing: no room until ``room`` is set."""
                    asked.append(request_id)
                    if not room.is_set():
                        return {"status": "queued"}
                    return {"status": "ok", "worker": "tcp://w0", "instance": "i0"}

                assert door.admission is not None
                door.admission._route = route
                waiting = asyncio.ensure_future(door.admission.admit("b", "r0"))
                while door.admission.depth("b") == 0:
                    await asyncio.sleep(0.01)
                room.set()
                async with asyncio.timeout(WAIT):
                    while not waiting.done():  # again until the subscription has arrived
                        s.log_event(protocol.SCHEDULER_CHANGED, "a")  # another model's instance
                        await asyncio.sleep(0.05)
                got = waiting.result()
                return got, asked
            finally:
                await door.close()

    got, asked = asyncio.run(run())
    assert got == admission.Route("tcp://w0", "i0")
    assert asked == ["r0", "r0"]


@pytest.mark.parametrize("queued", [["b"], []])
def test_only_waiting_models_are_woken(queued):
    adm = admission.Admission(None, 8, 1, metrics=None)  # type: ignore[arg-type]
    for model in queued:
        adm._queues[model].append("r0")
    events = {m: adm._changed[m] for m in ("a", "b")}
    adm.wake_all()
    assert [m for m, e in events.items() if e.is_set()] == queued
