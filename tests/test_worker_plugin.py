"""The worker plugin in a real LocalCluster (one worker process, two CPU slots) with real engines.

Budgets are small so that memory pressure is reachable with tiny models: each slot has 22 MiB,
an engine takes its 8 MiB KV cache plus its weights, widened to float32 (set for any CPU; 14 MiB in
2 MiB chunks), and a tiny model's weights take 4 MiB, so a slot with an engine holds two
prewarmed models and no more.
Tests run in order and share the cluster; each says what it starts from.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import replace

import dask
import psutil
import pytest
from distributed import Client, LocalCluster
from distributed.core import rpc

from warmserve import protocol
from warmserve.protocol import GenerateRequest
from warmserve.registry import Registry
from warmserve.worker_plugin import generate
from warmserve.worker_plugin.channel import Channels
from warmserve.worker_plugin.errors import EngineDied, NoInstance, UnknownModel

pytestmark = pytest.mark.engine

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tiny_registry: Registry, models_dir: str):
    with (
        # float32 engines on any CPU, so the budgets below hold with or without native bf16
        dask.config.set(
            {"warmserve.worker.engine-kv": "8MiB", "warmserve.engine.dtype": "float32"}
        ),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            preload=["warmserve.worker_plugin"],
            preload_argv=[
                "--warmserve-devices",
                "cpu:0,cpu:1",
                "--warmserve-device-memory",
                "22MiB",
                "--warmserve-node",
                "node-a",
                "--warmserve-registry",
                os.path.join(models_dir, "registry.yaml"),
            ],
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(1)
        yield client, next(iter(client.scheduler_info()["workers"]))


def call(cluster, op: str, **kwargs):
    """Call a worker handler over a Dask comm, as the scheduler plugin does.

    Lists come back as tuples (Dask's msgpack settings); ``as_lists`` turns them back.
    """
    client, address = cluster

    async def go():
        async with rpc(address) as worker:
            return await getattr(worker, op)(**kwargs)

    return as_lists(client.sync(go))


def as_lists(value):
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_lists(v) for v in value]
    return value


def stream(cluster, request: GenerateRequest):
    """Collect a streamed request; returns (chunks, error raised or None)."""
    client, address = cluster

    async def go():
        chunks, error = [], None
        channels = Channels(protocol.WORKER_CHANNEL, {})
        try:
            async for chunk in channels.generate(address, request):
                chunks.append(chunk)
        except Exception as e:
            error = e
        finally:
            await channels.close()
        return chunks, error

    return client.sync(go)


def event(client: Client, kind: str, **match) -> dict:
    """The latest ``"warmserve"`` event of ``kind`` matching ``match``, waiting for it to arrive
    (events reach the scheduler on the worker's batched stream, after the handler's reply)."""
    while True:
        found = [
            m
            for _, m in client.get_events("warmserve")
            if m["event"] == kind and all(m.get(k) == v for k, v in match.items())
        ]
        if found:
            return found[-1]
        time.sleep(0.05)


def device(status: dict, device_id: str) -> dict:
    return next(d for d in status["devices"] if d["id"] == device_id)


def request(model: str, rid: str, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(
        rid,
        model,
        prompt="the quick brown fox",
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
    )


A, B = "node-a/cpu:0", "node-a/cpu:1"
OUTPUTS: dict[str, str] = {}  # greedy outputs, kept for comparison by later tests


def test_status_reports_devices(cluster):
    client, address = cluster
    status = call(cluster, "warmserve_status")
    assert [d["id"] for d in status["devices"]] == [A, B]
    assert all(d["memory"] == 22 * MiB and d["node"] == "node-a" for d in status["devices"])
    assert status["instances"] == [] and status["host_cache"] == []
    assert client.scheduler_info()["workers"][address]["resources"] == {"warmserve-device": 2}


def test_prewarm_to_host_then_device(cluster):
    ack = call(cluster, "warmserve_prewarm", model="tiny-0", tier="host")
    assert ack["state"] in ("running", "done") and ack["tier"] == "host"
    done = call(cluster, "warmserve_prewarm", model="tiny-0", tier="host", wait=True)
    assert done["state"] == "done"
    assert "tiny-0" in call(cluster, "warmserve_status")["host_cache"]

    done = call(cluster, "warmserve_prewarm", model="tiny-0", tier=2, devices=[A], wait=True)
    assert done["state"] == "done", done
    status = call(cluster, "warmserve_status")
    assert device(status, A)["resident"] == ["tiny-0"]
    assert device(status, A)["free"] == 18 * MiB


def test_activate_prewarmed_and_generate(cluster):
    client, address = cluster
    iid = call(cluster, "warmserve_activate", model="tiny-0", device=A)
    assert event(client, "activated", id=iid)["from_tier"] == "device"

    full = client.submit(generate, request("tiny-0", "full-0"), workers=[address], pure=False)
    full = full.result()
    chunks, error = stream(cluster, request("tiny-0", "stream-0"))
    assert error is None
    assert len(chunks) == 8 and chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == full.text and full.text
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    OUTPUTS["tiny-0"] = full.text
    status = call(cluster, "warmserve_status")
    assert device(status, A)["engines"] == {"tiny": "tiny-0"}
    assert device(status, A)["instances"] == [iid]
    call(cluster, "warmserve_deactivate", instance=iid)


def test_a_channel_stops_one_request_and_streams_the_other(cluster):
    """Two requests share a front door's channel: abandoning one mid-stream aborts it on the
    worker (its instance counts one request in flight, then none) while the other streams on."""
    client, address = cluster
    iid = call(cluster, "warmserve_activate", model="tiny-0", device=A)

    def in_flight() -> int:
        status = call(cluster, "warmserve_status")
        return next(i["in_flight"] for i in status["instances"] if i["id"] == iid)

    async def go() -> list[int]:
        seen = []
        channels = Channels(protocol.WORKER_CHANNEL, {})
        try:  # ignore_eos and 1,500 tokens: neither ends by itself while the test runs
            kept = channels.generate(address, request("tiny-0", "kept", max_tokens=1500))
            dropped = channels.generate(address, request("tiny-0", "dropped", max_tokens=1500))
            await anext(kept)
            await anext(dropped)
            seen.append(await asyncio.to_thread(in_flight))
            await dropped.aclose()
            while (n := await asyncio.to_thread(in_flight)) > 1:
                await asyncio.sleep(0.05)
            seen.append(n)
            await anext(kept)  # the channel still carries the other
            await kept.aclose()
            while (n := await asyncio.to_thread(in_flight)) > 0:
                await asyncio.sleep(0.05)
            seen.append(n)
        finally:
            await channels.close()
        return seen

    assert client.sync(go) == [2, 1, 0]
    call(cluster, "warmserve_deactivate", instance=iid)


def test_second_model_of_family_switches_in_place(cluster):
    client, address = cluster
    before = call(cluster, "warmserve_status")
    assert device(before, A)["instances"] == [] and device(before, A)["engines"]
    done = call(cluster, "warmserve_prewarm", model="tiny-1", devices=[A], wait=True)
    assert done["state"] == "done"
    iid = call(cluster, "warmserve_activate", model="tiny-1")  # picks A: its engine is up
    activated = event(client, "activated", id=iid)
    assert activated["device"] == A and activated["from_tier"] == "engine"

    one = client.submit(generate, request("tiny-1", "full-1"), workers=[address], pure=False)
    assert one.result().text != OUTPUTS["tiny-0"]
    # A request names the instance the scheduler chose: served there, or NoInstance when it is
    # gone (the front door then asks the scheduler again), never served by another instance.
    chunks, error = stream(cluster, replace(request("tiny-1", "named"), instance=iid))
    assert error is None and "".join(c.text for c in chunks) == one.result().text
    chunks, error = stream(cluster, replace(request("tiny-1", "gone"), instance="node-a/gone"))
    assert isinstance(error, NoInstance) and chunks == []
    status = call(cluster, "warmserve_status")
    assert device(status, A)["engines"] == {"tiny": "tiny-1"}
    assert [i["id"] for i in status["instances"]] == [iid]


class _Records(logging.Handler):
    """Keeps what Dask's comm layer logs on the worker (its log deque keeps only
    ``distributed.worker``), so a test can see whether a handler's error was logged."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _watch_comm_log(dask_worker) -> None:
    dask_worker._warmserve_test_records = records = _Records()
    logging.getLogger("distributed.core").addHandler(records)


def _comm_log(dask_worker) -> list[str]:
    records = dask_worker._warmserve_test_records
    logging.getLogger("distributed.core").removeHandler(records)
    return records.lines


def test_request_without_instance_is_a_clear_error(cluster):
    client, address = cluster
    client.run(_watch_comm_log, workers=[address])
    chunks, error = stream(cluster, request("tiny-0", "no-instance"))
    assert isinstance(error, NoInstance) and chunks == []
    chunks, error = stream(cluster, request("no-such-model", "unknown"))
    assert isinstance(error, NoInstance)  # routing knows only instances
    with pytest.raises(NoInstance):
        client.submit(generate, request("tiny-2", "x"), workers=[address], pure=False).result()
    with pytest.raises(UnknownModel):
        call(cluster, "warmserve_activate", model="no-such-model")
    # An expected error is the handler's answer: the caller raises it, and the worker logs no
    # traceback (Dask logs one for every exception a handler raises).
    assert client.run(_comm_log, workers=[address])[address] == []


def test_prewarm_that_does_not_fit_leaves_residents(cluster):
    # A: engine (14 MiB) + tiny-0 + tiny-1 (4 MiB each) = 22 MiB, full.
    before = device(call(cluster, "warmserve_status"), A)
    assert sorted(before["resident"]) == ["tiny-0", "tiny-1"] and before["free"] == 0
    failed = call(cluster, "warmserve_prewarm", model="tiny-2", devices=[A], wait=True)
    assert failed["state"] == "failed" and failed["kind"] == "does-not-fit", failed
    after = call(cluster, "warmserve_status")
    assert sorted(device(after, A)["resident"]) == ["tiny-0", "tiny-1"]
    assert device(after, A)["free"] == 0
    assert "tiny-2" not in after["host_cache"]  # the device was charged first: nothing staged


def test_evict_moves_down_a_tier(cluster):
    out = call(cluster, "warmserve_evict", model="tiny-0", devices=[A])
    assert out["devices"] == [A] and not out["host_dropped"]
    status = call(cluster, "warmserve_status")
    assert device(status, A)["resident"] == ["tiny-1"] and "tiny-0" in status["host_cache"]
    out = call(cluster, "warmserve_evict", model="tiny-0", tier="disk")
    assert out["host_dropped"]
    assert "tiny-0" not in call(cluster, "warmserve_status")["host_cache"]


def _fail_engine_after(device_id: str, family: str, steps: int, dask_worker=None) -> None:
    """Fault injection (the engine runs in the worker process, so it cannot be killed alone):
    its vLLM step raises after ``steps`` more steps, which ends the engine's thread as a crash
    inside vLLM would."""
    (slot,) = dask_worker.plugins["warmserve"].instances.slots(device_id, family)
    engine = slot.engine
    real_step, left = engine._llm.step, [steps]

    def step():
        left[0] -= 1
        if left[0] < 0:
            raise RuntimeError("injected engine fault")
        return real_step()

    engine._llm.step = step


def test_engine_death_is_reported_and_frees_device(cluster):
    client, address = cluster
    free_before = device(call(cluster, "warmserve_status"), A)["free"]
    client.run(_fail_engine_after, A, "tiny", 3, workers=[address])
    chunks, error = stream(cluster, request("tiny-1", "dies", max_tokens=64))
    assert isinstance(error, EngineDied), error
    assert 0 < len(chunks) < 64
    status = call(cluster, "warmserve_status")
    assert status["instances"] == [] and device(status, A)["engines"] == {}
    assert device(status, A)["free"] == free_before + 14 * MiB
    assert status["deaths"][-1]["device"] == A and status["deaths"][-1]["instances"]
    assert event(client, "engine-died", device=A)["family"] == "tiny"
    with pytest.raises(NoInstance):
        client.submit(generate, request("tiny-1", "after"), workers=[address], pure=False).result()


def test_activation_evicts_only_what_memory_demands(cluster):
    for model in ("tiny-0", "tiny-1", "tiny-2"):  # tiny-0 is the least recently used
        assert (
            call(cluster, "warmserve_prewarm", model=model, devices=[B], wait=True)["state"]
            == "done"
        )
    assert device(call(cluster, "warmserve_status"), B)["free"] == 10 * MiB
    iid = call(cluster, "warmserve_activate", model="tiny-2", device=B)
    # The engine needs 14 MiB: evicting tiny-0 alone makes room; tiny-1 stays.
    status = call(cluster, "warmserve_status")
    assert sorted(device(status, B)["resident"]) == ["tiny-1", "tiny-2"]
    assert device(status, B)["instances"] == [iid]
    chunks, error = stream(cluster, request("tiny-2", "on-b"))
    assert error is None and chunks[-1].finish_reason == "length"
    call(cluster, "warmserve_deactivate", instance=iid)


def test_prewarm_to_engine_beside_a_serving_engine_of_its_family(cluster):
    # B: the idle engine of tiny-2 (14 MiB) and tiny-1, tiny-2 in the pool: full.
    iid = call(cluster, "warmserve_activate", model="tiny-2", device=B)
    call(cluster, "warmserve_evict", model="tiny-1", devices=[B])
    # The family's engine serves, so it is the engine tier the planner charged for: tiny-0
    # goes to the pool beside it. A second engine (14 MiB more) would not fit.
    done = call(cluster, "warmserve_prewarm", model="tiny-0", tier="engine", devices=[B], wait=True)
    assert done["state"] == "done", done
    status = device(call(cluster, "warmserve_status"), B)
    assert sorted(status["resident"]) == ["tiny-0", "tiny-2"]
    assert [s["model"] for s in status["engine_slots"]] == ["tiny-2"]
    call(cluster, "warmserve_deactivate", instance=iid)


def _memory(dask_worker) -> dict:
    proc = psutil.Process()
    return {"rss": proc.memory_info().rss, "fds": proc.num_fds()}


def test_prewarm_evict_cycles_return_host_memory(cluster):
    client, address = cluster

    def cycle():
        done = call(cluster, "warmserve_prewarm", model="tiny-0", devices=[A], wait=True)
        assert done["state"] == "done"
        call(cluster, "warmserve_evict", model="tiny-0", tier="disk")

    cycle()  # first-use allocations (thread pools, caches) happen once
    start = client.run(_memory, workers=[address])[address]
    shm_start = shutil.disk_usage("/dev/shm").used
    for _ in range(100):
        cycle()
    end = client.run(_memory, workers=[address])[address]
    # Each cycle moves 2 MB through host and device memory: a leak of one copy per cycle
    # would show as 200 MB or more.
    assert end["rss"] - start["rss"] < 16 * MiB, (start, end)
    assert end["fds"] == start["fds"]
    assert shutil.disk_usage("/dev/shm").used - shm_start < 16 * MiB
    assert "tiny-0" not in call(cluster, "warmserve_status")["host_cache"]
