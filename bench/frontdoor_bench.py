"""What the front door and Dask add to a request, and requests/s through the front door.

One run, one resident tiny model (``tiny-0``), ``max_tokens=1`` so the engine's own work is as
small as it gets:

1. ``engine``: ``Engine.complete`` on an engine in this process (no HTTP, no Dask).
2. ``dask``: what the front door does per request, minus HTTP: ``warmserve_route`` on the
   scheduler, the stream from the worker over a Dask comm, ``warmserve_done``.
3. ``frontdoor``: ``POST /v1/completions`` to ``warmserve up``'s stack (``launcher.serving``),
   which fills slots leased from the scheduler and reports to it in batches.
4. ``frontdoor_route_each``: the same through a second front door on the same cluster with
   leasing off (``lease=0``): a route and a done round trip to the scheduler per request.
   The four are measured in turn, request by request, so all see the same machine load; the
   added latency is the paired difference with the engine in this process.
5. ``throughput``: requests/s through the (leasing) front door with ``--concurrency`` clients.
6. ``versus_vllm``: output tokens/s of closed loops of ``--versus`` concurrent streams (``--stream
   -tokens`` each, greedy, ``ignore_eos``) through ``warmserve up``'s front door and through
   vLLM's own OpenAI server on the same model and settings, both up, their loads alternated
   ``--rounds`` times (``bench.gpu_decode``'s loads, which that benchmark runs on a GPU), and
   the median ratio.

Run: ``python -m bench.frontdoor_bench [--requests N]`` -> bench/results/frontdoor.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import dask.config
import httpx
import numpy as np
import uvicorn
from dask.utils import parse_bytes
from distributed import Client

from bench import gpu_decode
from warmserve import config, protocol
from warmserve.engine.engine import Engine
from warmserve.frontdoor.app import create_app
from warmserve.launcher import HOST, run, serving
from warmserve.models.make import ensure_default_models
from warmserve.protocol import GenerateRequest
from warmserve.registry import Registry
from warmserve.worker_plugin.channel import Channels

MODEL = "tiny-0"
PROMPT = "The scheduler assigns each task to a worker"


def pct(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


async def measure(models_dir: str, requests: int, concurrency: int, throughput_n: int) -> dict:
    registry = ensure_default_models(models_dir)
    engine = await asyncio.to_thread(Engine, registry[MODEL])
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    registry_file = os.path.join(models_dir, "registry.yaml")
    try:
        async with (
            serving(registry, registry_file, devices=1) as st,
            httpx.AsyncClient(base_url=st.url, timeout=300) as http,
            Client(st.cluster.scheduler_address, asynchronous=True) as client,
            _front_door(st.cluster.scheduler_address, registry, lease=0) as plain_url,
            httpx.AsyncClient(base_url=plain_url, timeout=300) as plain,
        ):
            (await http.post("/v1/completions", json=body)).raise_for_status()  # activate
            channels = Channels(protocol.WORKER_CHANNEL, client.connection_args)
            for _ in range(20):  # warm every path (connections, caches)
                await http.post("/v1/completions", json=body)
                await plain.post("/v1/completions", json=body)
                await engine.complete(_request())
            in_process, direct, front, routed = [], [], [], []
            for _ in range(requests):
                t0 = time.perf_counter()
                await engine.complete(_request())
                t1 = time.perf_counter()
                await _through_dask(client, channels, _request())
                t2 = time.perf_counter()
                r = await http.post("/v1/completions", json=body)
                t3 = time.perf_counter()
                r.raise_for_status()
                r = await plain.post("/v1/completions", json=body)
                t4 = time.perf_counter()
                r.raise_for_status()
                in_process.append(t1 - t0)
                direct.append(t2 - t1)
                front.append(t3 - t2)
                routed.append(t4 - t3)
            await channels.close()
            rps = await _throughput(http, body, concurrency, throughput_n)
    finally:
        await asyncio.to_thread(engine.shutdown)
    added = [f - e for f, e in zip(front, in_process, strict=True)]
    added_routed = [f - e for f, e in zip(routed, in_process, strict=True)]
    return {
        "model": MODEL,
        "max_tokens": 1,
        "requests": requests,
        "engine_in_process_ms": pct(in_process),
        "dask_route_stream_done_ms": pct(direct),
        "frontdoor_ms": pct(front),
        "frontdoor_route_each_ms": pct(routed),
        "added_ms": {**pct(added), "mean": statistics.fmean(added) * 1000},
        "added_route_each_ms": {
            **pct(added_routed),
            "mean": statistics.fmean(added_routed) * 1000,
        },
        "throughput": {"concurrency": concurrency, "requests": throughput_n, "rps": rps},
    }


@contextlib.asynccontextmanager
async def _front_door(scheduler: str, registry, **options) -> AsyncIterator[str]:
    """A second front door on the same cluster, served at 127.0.0.1 for the block; its URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(scheduler, registry, **options), host=HOST, port=0, log_level="warning"
        )
    )
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://{HOST}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


async def _through_dask(client: Client, channels: Channels, req: GenerateRequest) -> None:
    """The front door's Dask work for one request, without HTTP."""
    route = await getattr(client.scheduler, protocol.SCHEDULER_ROUTE)(
        model=MODEL, request_id=req.request_id, exclude=[]
    )
    async for _ in channels.generate(route["worker"], replace(req, instance=route["instance"])):
        pass
    await getattr(client.scheduler, protocol.SCHEDULER_DONE)(request_id=req.request_id)


def _request() -> GenerateRequest:
    return GenerateRequest(
        request_id=f"bench-{uuid.uuid4().hex}",
        model=MODEL,
        prompt=PROMPT,
        max_tokens=1,
        temperature=0.0,
    )


async def _throughput(http: httpx.AsyncClient, body: dict, concurrency: int, n: int) -> float:
    remaining = n

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            (await http.post("/v1/completions", json=body)).raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


def versus_vllm(
    models_dir: str, concurrencies: list[int], tokens: int, rounds: int, log: str
) -> dict:
    """Streams through WarmServe's front door against vLLM's server, per concurrency. Both
    servers are up side by side and their loads alternate ``rounds`` times, so a change in the
    machine's load (a shared 2-core machine) falls on both alike; the ratio is the median of
    the rounds' ratios."""
    registry = ensure_default_models(models_dir)
    spec = registry[MODEL]
    kv_bytes = int(parse_bytes(config.get("worker.engine-kv")))
    fair, settings = gpu_decode.setup(spec, kv_bytes, gpu=False)
    jobs = [gpu_decode.load_job(spec, c, tokens, 4 * c) for c in concurrencies]
    registry_file = os.path.join(models_dir, "registry.yaml")
    with gpu_decode.vllm_server(spec, fair, False, log) as (url, _, command):
        loads = run(_alternate(spec, registry_file, settings, url, jobs, rounds))
    by_concurrency = {}
    for c, (ours, theirs) in zip(concurrencies, loads, strict=True):
        if not all(load["all_full_length"] for load in ours + theirs):
            raise RuntimeError(f"a stream at concurrency {c} ended early")
        ratios = [o["output_tok_s"] / t["output_tok_s"] for o, t in zip(ours, theirs, strict=True)]
        by_concurrency[str(c)] = {
            "warmserve_output_tok_s": [load["output_tok_s"] for load in ours],
            "vllm_server_output_tok_s": [load["output_tok_s"] for load in theirs],
            "warmserve_ttft_p50_s": [load["ttft_p50_s"] for load in ours],
            "vllm_server_ttft_p50_s": [load["ttft_p50_s"] for load in theirs],
            "ratios": ratios,
            "ratio_warmserve_over_vllm": statistics.median(ratios),
        }
    return {
        "fairness": {**fair, "max_tokens": tokens, "requests": "4 x concurrency"},
        "rounds": rounds,
        "vllm_command": command,
        "by_concurrency": by_concurrency,
        "target": 0.9,
    }


async def _alternate(
    spec, registry_file: str, settings: dict, vllm_url: str, jobs: list[dict], rounds: int
) -> list[tuple[list[dict], list[dict]]]:
    """Per job, ``rounds`` of (WarmServe's load, then vLLM's), with ``warmserve up``'s stack."""
    out = []
    with dask.config.set(settings):
        async with serving(Registry([spec]), registry_file, "autoscale", "1") as stack:
            for job in jobs:
                ours, theirs = [], []
                for _ in range(rounds):
                    ours.append(await gpu_decode.run_load({**job, "url": stack.url}))
                    theirs.append(await gpu_decode.run_load({**job, "url": vllm_url}))
                out.append((ours, theirs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--throughput-requests", type=int, default=600)
    parser.add_argument("--models", default=None, help="Models folder (default: a temp folder).")
    parser.add_argument("--versus", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--stream-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/frontdoor.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or tmp
        result = run(measure(models, args.requests, args.concurrency, args.throughput_requests))
        log = os.path.join(tmp, "vllm_server.log")
        result["versus_vllm"] = versus_vllm(
            models, args.versus, args.stream_tokens, args.rounds, log
        )
    result = {
        "command": "python -m bench.frontdoor_bench "
        f"--requests {args.requests} --concurrency {args.concurrency} "
        f"--throughput-requests {args.throughput_requests} "
        f"--versus {' '.join(map(str, args.versus))} --stream-tokens {args.stream_tokens} "
        f"--rounds {args.rounds}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **result,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
