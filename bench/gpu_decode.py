"""Decode throughput of one resident model: WarmServe's front door against vLLM's own OpenAI server.

Issue 21 asks for at least 0.9x of vLLM's decode throughput on the same GPU, model and
concurrency. What stands between a client and vLLM differs: WarmServe's front door hands each
request over a Dask comm to a worker whose engine (vLLM's ``LLMEngine``, stepped by a thread in
the worker process) streams tokens back the same way; vLLM's server runs ``AsyncLLM`` with its
engine core in a child process. The load is the same for both: a closed loop of ``--concurrency``
streamed ``/v1/completions`` (a 128-token prompt, ``--max-tokens`` greedy tokens, ``ignore_eos``)
until ``--requests`` are done, after one warm-up request that is not counted. Per request: time to
first token, output tokens (``usage.completion_tokens`` of the final chunk that
``stream_options.include_usage`` asks for: both servers send it, and a chunk may carry more than
one token when the server's output loop falls behind), and its decode rate, (tokens - 1) over the
time from its first to its last chunk. The figure is output tokens per second over the measured
wall time; the ratio is WarmServe's over vLLM's.

The servers run one after the other on the one GPU, each stopped before the next starts:

1. WarmServe as ``warmserve up`` starts it (``warmserve.launcher.serving``, policy ``autoscale``
   with a long grace and keep-alive, so the one instance the warm-up starts stays resident);
2. ``python -m vllm.entrypoints.openai.api_server`` on the same model folder, in its own process
   group, stopped with SIGTERM (SIGKILL after a timeout).

Both get the same KV cache bytes, ``max_num_seqs`` (WarmServe's ``EngineConfig``), maximum model
length and dtype, with CUDA graphs on a GPU (eager on a CPU, as WarmServe's engine runs there);
the report lists them as ``fairness``. The load runs in a child process for both servers, so the
client's HTTP and JSON work never shares the front door's event loop (it would, in this process).

    python -m bench.gpu_decode --models-dir /tmp/models --out $OUT/gpu_decode.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import dask.config
import httpx
from distributed.core import rpc

from bench.gpu_live import MAX_MODEL_LEN, Report, prompt_text
from warmserve import config
from warmserve.engine.engine import EngineConfig, checkpoint_dtype, compute_dtype
from warmserve.launcher import HOST, run, serving
from warmserve.models.make import REGISTRY_FILE, make_family
from warmserve.registry import ModelSpec, Registry

PROMPT_TOKENS = 128
CHILD_MARK = "GPU_DECODE_LOAD "
START_TIMEOUT = 600  # seconds for vLLM's server to answer /health (graph capture included)
STOP_TIMEOUT = 60  # seconds between SIGTERM and SIGKILL


async def stream_one(client: httpx.AsyncClient, body: dict) -> dict:
    """One streamed completion: time to first token, tokens, chunks and its decode rate."""
    tokens = None
    chunks: list[float] = []
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line.removeprefix("data: "))
            if "error" in doc:
                raise RuntimeError(f"error in the stream: {doc['error']}")
            if doc.get("choices"):
                chunks.append(time.perf_counter())
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
    if tokens is None or not chunks:
        raise RuntimeError(f"no usage or no output in the stream ({len(chunks)} chunks)")
    decode = chunks[-1] - chunks[0]
    return {
        "ttft_s": chunks[0] - start,
        "s": chunks[-1] - start,
        "tokens": tokens,
        "chunks": len(chunks),
        "decode_tok_s": (tokens - 1) / decode if tokens > 1 and decode > 0 else None,
    }


async def closed_loop(job: dict) -> dict:
    """A warm-up request, then ``concurrency`` clients sending back to back until ``requests``
    are done; per-request samples and the aggregate figures."""
    body = {
        "model": job["model"],
        "prompt": job["prompt"],
        "max_tokens": job["max_tokens"],
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=job["concurrency"] + 1)
    async with httpx.AsyncClient(base_url=job["url"], timeout=600, limits=limits) as client:
        warmup = await stream_one(client, body)
        todo = iter(range(job["requests"]))  # shared: each request is taken by one client
        samples: list[dict] = []

        async def user() -> None:
            for _ in todo:
                samples.append(await stream_one(client, body))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(job["concurrency"])))
        wall = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in samples)
    rates = [s["decode_tok_s"] for s in samples if s["decode_tok_s"] is not None]
    return {
        "output_tok_s": tokens / wall,
        "decode_tok_s_median": statistics.median(rates) if rates else None,
        "ttft_p50_s": statistics.median(s["ttft_s"] for s in samples),
        "wall_s": wall,
        "requests": len(samples),
        "tokens": tokens,
        "tokens_per_chunk": tokens / sum(s["chunks"] for s in samples),
        "all_full_length": all(s["tokens"] == job["max_tokens"] for s in samples),
        "warmup": warmup,
        "samples": samples,
    }


async def run_load(job: dict) -> dict:
    """:func:`closed_loop` in a child process (this loop keeps serving meanwhile)."""
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.gpu_decode", "--load-child", json.dumps(job)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate()
    for line in out.decode().splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line.removeprefix(CHILD_MARK))
    raise RuntimeError(f"the load child exited {child.returncode}: {err.decode()[-3000:]}")


async def warmserve_load(
    spec: ModelSpec, registry_file: str, devices: str, settings: dict, jobs: list[dict]
) -> list[dict]:
    """Each load in turn through WarmServe's front door, with the instances serving after it."""
    results = []
    with dask.config.set(settings):
        async with serving(Registry([spec]), registry_file, "autoscale", devices) as stack:
            for job in jobs:
                result = await run_load({**job, "url": stack.url})
                async with rpc(stack.cluster.scheduler_address) as scheduler:
                    status = await scheduler.warmserve_status()
                result["instances"] = [(i["id"], i["devices"]) for i in status["instances"]]
                results.append(result)
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def vllm_command(spec: ModelSpec, port: int, fair: dict, gpu: bool) -> list[str]:
    """vLLM's OpenAI server on ``spec``, with the settings WarmServe's engine runs with."""
    return [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", spec.path, "--served-model-name", spec.name),
        *("--host", HOST, "--port", str(port)),
        *("--max-model-len", str(fair["max_model_len"])),
        *("--kv-cache-memory-bytes", str(fair["kv_cache_bytes"])),
        *("--max-num-seqs", str(fair["max_num_seqs"]), "--dtype", fair["dtype"]),
        *("--gpu-memory-utilization", "0.9"),
        *("--disable-log-stats", "--uvicorn-log-level", "warning"),
        *(() if gpu else ("--enforce-eager",)),
    ]


def log_tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def wait_healthy(url: str, server: subprocess.Popen, log: str) -> float:
    """Seconds until ``GET /health`` answers 200; RuntimeError with the log's tail if the server
    exits or takes longer than START_TIMEOUT."""
    start = time.perf_counter()
    while time.perf_counter() - start < START_TIMEOUT:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM's server exited {server.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM's server not healthy after {START_TIMEOUT} s:\n{log_tail(log)}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server (it stops its engine core), SIGKILL to its process group after
    STOP_TIMEOUT, and to whatever of the group outlives the server: nothing it started may keep
    device memory once it is gone."""
    server.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


@contextlib.contextmanager
def vllm_server(
    spec: ModelSpec, fair: dict, gpu: bool, log: str
) -> Iterator[tuple[str, float, str]]:
    """vLLM's own server on ``spec`` until the block ends: its URL, start seconds and command."""
    port = free_port()
    command = vllm_command(spec, port, fair, gpu)
    # Its default layout, the engine core in a child process, whatever this process was told.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log, "w") as f:
        server = subprocess.Popen(
            command, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        url = f"http://{HOST}:{port}"
        yield url, wait_healthy(url, server, log), shlex.join(command)
    finally:
        stop(server)


def vllm_load(spec: ModelSpec, fair: dict, gpu: bool, log: str, jobs: list[dict]) -> list[dict]:
    """The same loads against vLLM's own server, started here and stopped after them."""
    with vllm_server(spec, fair, gpu, log) as (url, started, command):
        results = [run(run_load({**job, "url": url})) for job in jobs]
    with open(log, errors="replace") as f:
        kv_lines = [line.strip()[-160:] for line in f if "KV cache" in line]
    server_info = {"start_s": started, "command": command, "kv_log": kv_lines}
    return [{**result, **server_info} for result in results]


def setup(spec: ModelSpec, kv_bytes: int, gpu: bool) -> tuple[dict, dict]:
    """What both servers get alike (KV bytes, sequences, length, dtype, graphs), and the
    ``warmserve.*`` settings that give WarmServe's one instance those."""
    fair = {
        "kv_cache_bytes": kv_bytes,
        "max_num_seqs": EngineConfig().max_num_seqs,
        "max_model_len": MAX_MODEL_LEN,
        "dtype": compute_dtype(str(config.get("engine.dtype")), checkpoint_dtype(spec.path)),
        "cuda_graphs": gpu,
        "prompt_tokens": PROMPT_TOKENS,
    }
    settings = {
        "warmserve.engine.max-model-len": MAX_MODEL_LEN,
        "warmserve.worker.engine-kv": kv_bytes,
        # The one instance (the policy keeps one per device) stays up through the test: no stop
        # for being idle or below scale-down. The warm-up's cold start may take minutes.
        "warmserve.autoscaler.grace": 600,
        "warmserve.autoscaler.keep-alive": 600,
        "warmserve.frontdoor.request-timeout": 600,
    }
    return fair, settings


def load_job(spec: ModelSpec, concurrency: int, max_tokens: int, requests: int) -> dict:
    """A closed loop of ``concurrency`` streams of ``max_tokens`` on a 128-token prompt."""
    return {
        "model": spec.name,
        "prompt": prompt_text(spec, PROMPT_TOKENS),
        "max_tokens": max_tokens,
        "concurrency": concurrency,
        "requests": requests,
    }


def step(report: Report, key: str, fn: Callable[[], dict]) -> bool:
    """``report[key] = fn()``, or its error: a failed server still leaves the other measured."""
    try:
        report.set(key, fn())
        return True
    except Exception as e:
        report.set(key, {"error": repr(e), "traceback": traceback.format_exc()[-3000:]})
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default="/tmp/models")
    parser.add_argument("--size", default="8b", help="model size (tiny for a CPU dry run)")
    parser.add_argument("--devices", default="cuda", help="as warmserve up takes them")
    parser.add_argument("--kv-gib", type=float, default=4.0, help="KV cache of each server")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, help="measured requests [2 x concurrency]")
    parser.add_argument("--out", default="gpu_decode.json")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        print(CHILD_MARK + json.dumps(run(closed_loop(json.loads(args.load_child)))), flush=True)
        return
    report = Report(args.out, "bench.gpu_decode")
    gpu = report.data["machine"]["gpu"] is not None
    start = time.perf_counter()
    (spec,) = make_family(f"l{args.size}", args.size, 1, args.models_dir).values()
    report.set(
        "model", {"name": spec.name, "bytes": spec.nbytes, "make_s": time.perf_counter() - start}
    )
    fair, settings = setup(spec, int(args.kv_gib * (1 << 30)), gpu)
    fair.update(concurrency=args.concurrency, max_tokens=args.max_tokens)
    report.set("fairness", fair)
    report.set("settings", settings)
    job = load_job(spec, args.concurrency, args.max_tokens, args.requests or 2 * args.concurrency)
    registry_file = os.path.join(args.models_dir, REGISTRY_FILE)
    log = os.path.splitext(args.out)[0] + ".vllm_server.log"
    ok = step(
        report,
        "warmserve",
        lambda: run(warmserve_load(spec, registry_file, args.devices, settings, [job]))[0],
    )
    ok &= step(report, "vllm_server", lambda: vllm_load(spec, fair, gpu, log, [job])[0])
    figures = {
        key: {
            k: report.data[key].get(k)
            for k in ("output_tok_s", "decode_tok_s_median", "ttft_p50_s")
        }
        for key in ("warmserve", "vllm_server")
    }
    ours, theirs = (figures[k]["output_tok_s"] for k in ("warmserve", "vllm_server"))
    report.set(
        "summary",
        {
            **figures,
            "ratio_warmserve_over_vllm": ours / theirs if ours and theirs else None,
            "target": 0.9,
        },
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
