"""Activation of an 8B-shaped model in a vLLM engine on a GPU, by warmth tier, against vLLM's own
ways to bring a model up, in one run on one GPU.

The engine is WarmServe's (``warmserve.engine.Engine``: vLLM's ``LLMEngine`` in this process, CUDA
graphs captured at start); the weights come from the worker's real weight store (a memfd in host
memory, pinned for the GPU, and a region of the CUDA memory pool). Each activation is timed to
its first token (a 128-token prompt, one greedy token), then checked: the greedy token ids of a
16-token completion must equal those of a fresh vLLM engine on that model, computed the same way
(after a first-token request, so the prompt is in the prefix cache in both).

- ``anchor_fresh_llm``: ``vllm.LLM(model)`` from disk (page cache dropped), then the first token.
- ``anchor_sleep_wake``: vLLM sleep mode level 1: ``sleep()`` (weights to host, KV dropped),
  later ``wake_up()`` and the first token: what a user of plain vLLM would do to keep a model
  warm without holding its GPU memory.
- ``engine_up_device``: an engine of the family serves another model; the weights are in the
  device pool; the switch is the copy plan (one device-to-device copy per checkpoint tensor).
- ``engine_up_device_reload``: the same through vLLM's ``reload_weights`` (for comparison).
- ``engine_up_host``: as ``engine_up_device`` with the weights in pinned host memory.
- ``engine_up_disk``: as above from the safetensors file (``reload_weights``; page cache dropped).
- ``resident``: the engine already serves the model: the first token only.

    python -m bench.gpu_engine --models-dir /tmp/models --out $OUT/gpu_engine.json

Results are written after every step, so a machine taken back mid-run leaves what was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.activation_bench import drop_page_cache
from bench.gpu_live import MAX_MODEL_LEN, Report, fresh_llm, sleep_wake
from warmserve.engine.engine import Engine, EngineConfig, preload
from warmserve.models.make import make_family
from warmserve.protocol import GenerateRequest
from warmserve.registry import ModelSpec
from warmserve.worker_plugin.devices import discover
from warmserve.worker_plugin.weight_store import WeightStore

PROMPT_IDS = list(range(1000, 1128))  # 128 tokens
GiB = 1 << 30


def request(model: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        f"bench-{time.monotonic_ns()}",
        model,
        prompt_token_ids=PROMPT_IDS,
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
    )


def first_token(engine: Engine) -> float:
    async def run() -> float:
        start = time.perf_counter()
        async for _ in engine.generate(request(engine.model.name, 1)):
            return time.perf_counter() - start
        raise RuntimeError("no output")

    return asyncio.run(run())


def greedy_ids(engine: Engine) -> list[int]:
    async def run() -> list[int]:
        return list((await engine.complete(request(engine.model.name, 16))).token_ids)

    return asyncio.run(run())


def anchors(spec: ModelSpec, config: EngineConfig, report: Report) -> list[int]:
    """vLLM alone: a fresh ``LLM()`` and sleep level 1 then wake; returns the greedy ids."""
    from vllm import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0.0)
    sixteen = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompt = {"prompt_token_ids": PROMPT_IDS}
    llm, started = fresh_llm(spec, config.kv_cache_bytes)

    def ttft() -> float:
        start = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        return time.perf_counter() - start

    def ids() -> list[int]:
        return list(llm.generate([prompt], sixteen, use_tqdm=False)[0].outputs[0].token_ids)

    first = ttft()
    report.set(
        "anchor_fresh_llm", {"start_s": started, "first_token_s": first, "s": started + first}
    )
    fresh = ids()
    resident = statistics.median(ttft() for _ in range(5))
    samples = sleep_wake(llm, ttft)
    report.set(
        "anchor_sleep_wake",
        {
            "samples": samples,
            "median_s": statistics.median(s["s"] for s in samples),
            "resident_first_token_s": resident,
            "same_ids_after_wake": ids() == fresh,
        },
    )
    return fresh


def tier(
    name: str,
    engine: Engine,
    targets: list[ModelSpec],
    activate: Callable[[ModelSpec], Any],
    reference: dict[str, list[int]],
    report: Report,
) -> None:
    """Activate each target in turn, timed to its first token, and check its greedy ids."""
    samples = []
    for spec in targets:
        start = time.perf_counter()
        how = activate(spec)
        switched = time.perf_counter() - start
        token = first_token(engine)
        ids = greedy_ids(engine)
        samples.append(
            {
                "model": spec.name,
                "switch_s": switched,
                "method": getattr(how, "method", None),
                "first_token_s": token,
                "s": switched + token,
                "ids_equal_fresh": ids == reference[spec.name] if spec.name in reference else None,
            }
        )
    report.set(
        name,
        {
            "samples": samples,
            "median_s": statistics.median(s["s"] for s in samples),
            "median_switch_s": statistics.median(s["switch_s"] for s in samples),
            "all_ids_equal": all(s["ids_equal_fresh"] is not False for s in samples),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default="/tmp/models")
    parser.add_argument("--size", default="8b")
    parser.add_argument("--kv-gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--skip-anchors", action="store_true")
    parser.add_argument("--out", default="gpu_engine.json")
    args = parser.parse_args()
    report = Report(args.out, "bench.gpu_engine")
    report.set("prompt_tokens", len(PROMPT_IDS))

    start = time.perf_counter()
    a, b = make_family(f"l{args.size}", args.size, 2, args.models_dir).values()
    report.set("model", {"bytes": a.nbytes, "make_s": time.perf_counter() - start})
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, kv_cache_bytes=int(args.kv_gib * GiB))
    report.set(
        "engine_config", {"max_model_len": MAX_MODEL_LEN, "kv_cache_bytes": config.kv_cache_bytes}
    )

    start = time.perf_counter()
    preload()
    report.set("preload_s", time.perf_counter() - start)
    reference: dict[str, list[int]] = {}
    if not args.skip_anchors:
        reference[a.name] = anchors(a, config, report)
        gc.collect()  # the anchor's LLM went with anchors(): give its memory back
        torch.cuda.empty_cache()

    # The weight store as a worker has it: host memfds, a CUDA pool on the GPU.
    (device,) = discover("cuda:0")
    store = WeightStore([device], host_budget=64 * GiB, run_blocking=asyncio.to_thread)
    cancel = threading.Event()
    for spec in (a, b):
        start = time.perf_counter()
        asyncio.run(store.to_device(spec, device.id, cancel))
        report.set(f"prewarm_{spec.name}_s", time.perf_counter() - start)
    report.set("pool", store.memory[device.id].pool.stats())

    drop_page_cache(b)
    start = time.perf_counter()
    engine = Engine(b, config)
    report.set("engine_start_s", {"seconds": time.perf_counter() - start, "model": b.name})
    # As every sample: the first-token request first, then the greedy ids (with the prompt in the
    # prefix cache). On random weights the logits are nearly tied, so a prefill split another
    # way can flip an argmax; the reference and the samples must be computed alike.
    first_token(engine)
    reference[b.name] = greedy_ids(engine)
    try:
        tier(
            "resident",
            engine,
            [b] * args.repeats,
            lambda spec: None,
            reference,
            report,
        )
        pair = [a, b] * args.repeats

        def from_device(spec: ModelSpec, use_plan: bool = True) -> Any:
            return engine.switch(spec, store.weights(spec.name, device.id), use_plan)

        tier("engine_up_device", engine, pair, from_device, reference, report)
        tier(
            "engine_up_device_reload",
            engine,
            pair[:4],
            lambda spec: from_device(spec, use_plan=False),
            reference,
            report,
        )
        for spec in (a, b):  # host tier: the device copies go; the pinned host copies stay
            store.drop_device(spec.name, device.id)
        tier(
            "engine_up_host",
            engine,
            pair[:4],
            lambda spec: engine.switch(spec, store.weights(spec.name, device.id)),
            reference,
            report,
        )

        def from_disk(spec: ModelSpec) -> Any:
            drop_page_cache(spec)
            return engine.switch(spec, None)

        tier("engine_up_disk", engine, pair[:2], from_disk, reference, report)
    finally:
        engine.shutdown()
        store.close()
    medians = {
        k: v["median_s"] for k, v in report.data.items() if isinstance(v, dict) and "median_s" in v
    }
    sleep = medians.get("anchor_sleep_wake")
    report.set(
        "summary",
        {
            "median_s": medians,
            "sleep_wake_over_device": sleep / medians["engine_up_device"] if sleep else None,
            "device_tier_ms": medians["engine_up_device"] * 1000,
        },
    )


if __name__ == "__main__":
    main()
