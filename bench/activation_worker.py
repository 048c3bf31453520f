"""Activation through the worker plugin, and what a streamed chunk costs over Dask.

1. Activate-to-first-token per starting tier and family, through the handlers as the scheduler
   plugin calls them: ``warmserve_activate`` then the first chunk over a front door's channel (the
   prompt of bench/activation_bench.py, one token). Tiers disk, host and device each start an
   engine on a fresh CPU slot; tier engine switches an idle engine of the family in place. A
   first engine is started and stopped before measuring: the first engine in a process also
   pays for initializing vLLM (and waits for the import the plugin starts at setup).
2. Per-chunk transport cost, without an engine: a worker handler writing N chunk messages on one
   comm (a channel's cost when each message holds one chunk) against a task feeding a
   ``distributed.Queue`` read by the client (the obvious alternative).

Run: ``python -m bench.activation_worker [--models DIR] [--sizes tiny small]``
-> bench/results/worker_activation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import dask
from distributed import Client, LocalCluster, Queue
from distributed.comm import connect
from distributed.core import rpc

from bench.activation_bench import PROMPT
from warmserve import protocol
from warmserve.models.make import make_family
from warmserve.protocol import GenerateRequest
from warmserve.worker_plugin.channel import Channels

CHUNKS = 2000
CHUNK = {"text": " token", "token_ids": [123], "finish_reason": None, "prompt_tokens": 0}


def add_echo_handler(dask_worker=None) -> None:
    """Bench-only handler: N chunk messages on the caller's comm, as the generate handler does."""

    async def echo(comm, n: int) -> dict:
        for _ in range(n):
            await comm.write({"chunk": CHUNK})
        return {"done": True}

    dask_worker.handlers["bench_echo"] = echo


def feed_queue(name: str, n: int) -> None:
    queue = Queue(name)
    for _ in range(n):
        queue.put({"chunk": CHUNK})


async def first_token(address: str, model: str, device: str) -> dict:
    start = time.perf_counter()
    async with rpc(address) as worker:
        iid = await getattr(worker, protocol.WORKER_ACTIVATE)(model=model, device=device)
    activated = time.perf_counter()
    req = GenerateRequest(f"bench-{model}", model, prompt=PROMPT, max_tokens=1, temperature=0.0)
    channels = Channels(protocol.WORKER_CHANNEL, {})
    stream = channels.generate(address, req)
    await anext(stream)
    first = time.perf_counter()
    await stream.aclose()
    await channels.close()
    async with rpc(address) as worker:
        await getattr(worker, protocol.WORKER_DEACTIVATE)(instance=iid)
    return {"activate_s": activated - start, "first_token_s": first - start}


async def echo_per_chunk(address: str) -> float:
    comm = await connect(address)
    start = time.perf_counter()
    await comm.write({"op": "bench_echo", "n": CHUNKS, "reply": True})
    while "chunk" in await comm.read():
        pass
    seconds = time.perf_counter() - start
    await comm.close()
    return seconds / CHUNKS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="models")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--out", default="bench/results/worker_activation.json")
    args = parser.parse_args()
    registries = {size: make_family(size, size, replicas=4, out=args.models) for size in args.sizes}
    registry_file = os.path.join(os.path.abspath(args.models), "registry.yaml")
    devices = [f"cpu:{i}" for i in range(4 * len(args.sizes))]  # four fresh slots per family
    load_before = os.getloadavg()[0]
    with (
        dask.config.set({"warmserve.worker.engine-kv": "64MiB"}),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            preload=["warmserve.worker_plugin"],
            preload_argv=[
                *("--warmserve-devices", ",".join(devices), "--warmserve-node", "bench"),
                *("--warmserve-device-memory", "1GiB", "--warmserve-registry", registry_file),
            ],
        ) as cluster,
        Client(cluster) as client,
    ):
        address = next(iter(client.scheduler_info()["workers"]))

        async def handler(op: str, **kwargs):
            async with rpc(address) as worker:
                return await getattr(worker, op)(**kwargs)

        call = client.sync
        tiers: dict[str, dict] = {}
        for n, size in enumerate(args.sizes):
            ids = [f"bench/{d}" for d in devices[4 * n : 4 * n + 4]]
            m = [f"{size}-{i}" for i in range(4)]
            t: dict[str, dict] = {}
            if n == 0:
                t["first_engine_in_process"] = call(first_token, address, m[3], ids[3])
            t["disk"] = call(first_token, address, m[0], ids[0])
            call(handler, protocol.WORKER_PREWARM, model=m[1], tier="host", wait=True)
            t["host"] = call(first_token, address, m[1], ids[1])
            call(handler, protocol.WORKER_PREWARM, model=m[2], devices=[ids[2]], wait=True)
            t["device"] = call(first_token, address, m[2], ids[2])
            call(handler, protocol.WORKER_PREWARM, model=m[3], devices=[ids[0]], wait=True)
            t["engine"] = call(first_token, address, m[3], ids[0])
            call(handler, protocol.WORKER_PREWARM, model=m[1], devices=[ids[0]], wait=True)
            t["engine_again"] = call(first_token, address, m[1], ids[0])
            tiers[size] = t
            for model in m:  # give the host tier back before the next family
                call(handler, protocol.WORKER_EVICT, model=model, tier="disk")

        client.run(add_echo_handler, workers=[address])
        comm_chunk = min(call(echo_per_chunk, address) for _ in range(3))
        queue_times = []
        for i in range(3):
            name = f"bench-queue-{i}"
            start = time.perf_counter()
            client.submit(feed_queue, name, CHUNKS, workers=[address], pure=False)
            queue = Queue(name, client=client)
            for _ in range(CHUNKS):
                queue.get()
            queue_times.append((time.perf_counter() - start) / CHUNKS)

    result = {
        "command": " ".join(["python", "-m", "bench.activation_worker", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0],
        },
        "models": {size: {"bytes": r[f"{size}-0"].nbytes} for size, r in registries.items()},
        "tiers": {
            "first_engine_in_process": "disk, the worker's first engine (vLLM set up then)",
            "disk": "a new engine on a fresh slot, weights from the file",
            "host": "a new engine on a fresh slot, weights staged in host memory",
            "device": "a new engine on a fresh slot, weights in its device pool",
            "engine": "an idle engine of the family switches in place (weights in its pool)",
            "engine_again": "the same, a second time",
        },
        "activate_to_first_token": tiers,
        "stream_per_chunk_s": {"comm_messages": comm_chunk, "dask_queue": min(queue_times)},
        "chunks": CHUNKS,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
