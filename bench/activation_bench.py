"""Activation cost by warmth tier: time from "activate model M" to M's first token.

Tiers, coldest first (DESIGN.md "Warmth tiers"):

- ``cold``: no engine; start one on M (weights read from disk) and generate. Measured in a fresh
  process per sample, after :func:`warmserve.engine.engine.preload` (what a worker runs once at
  setup; reported apart as ``import_s``). ``import vllm`` alone is lazy, so before that preload
  the sample also counted most of vLLM's imports as engine start (10 to 40 s on 2 shared cores).
- ``cold_next_engine``: the same in a process where an engine is up (a worker after its first
  engine): vLLM's per-process setup is not paid again.
- ``engine_up_disk``: an engine of M's family serves another model; switch to M from its
  safetensors file (page cache dropped first, so the file is read from disk).
- ``engine_up_host``: as above, with M's tensors already in host memory (the weight store's host
  tier): the switch reads no file.
- ``resident``: the engine already serves M: first token only.

Run ``python bench/activation_bench.py``; it writes ``bench/results/activation.json`` with the
command, the machine, every sample and the ratios. The ``measure_*`` functions take an engine and
return seconds, so other benches (e.g. through a Dask worker) can reuse them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping

import torch

from warmserve import config
from warmserve.engine.engine import (
    Engine,
    EngineConfig,
    checkpoint_dtype,
    compute_dtype,
    preload,
)
from warmserve.models.make import REGISTRY_FILE, make_family
from warmserve.models.weights import load_weights, weights_files
from warmserve.protocol import GenerateRequest
from warmserve.registry import ModelSpec, Registry

TIERS = ("cold", "cold_next_engine", "engine_up_disk", "engine_up_host", "resident")
TIER_TEXT = {
    "cold": "fresh process, vLLM imported (preload); engine start + disk + first token",
    "cold_next_engine": "as cold, in a process where another engine is up (a running worker)",
    "engine_up_disk": "switch in place from the safetensors file (page cache dropped)",
    "engine_up_host": "switch in place from tensors in host memory",
    "resident": "engine already serves the model: first token only",
}
PROMPT = "Return a new list containing all items from the iterable in ascending order."
_COLD_MARK = "WARMSERVE_COLD "  # vLLM logs to stdout too: this marks the child's result
_ids = itertools.count()


def drop_page_cache(spec: ModelSpec) -> None:
    """Ask the kernel to drop the weights files' cached pages, so the next read hits the disk."""
    for path in weights_files(spec.path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def first_token(engine: Engine) -> float:
    """Seconds until the first streamed chunk of a one-token greedy request."""
    req = GenerateRequest(
        f"bench-{next(_ids)}", engine.model.name, prompt=PROMPT, max_tokens=1, temperature=0.0
    )

    async def run() -> float:
        start = time.perf_counter()
        async for _ in engine.generate(req):
            return time.perf_counter() - start
        raise RuntimeError("no output")

    return asyncio.run(run())


def measure_resident(engine: Engine) -> float:
    """Activation of the model the engine already serves."""
    return first_token(engine)


def measure_switch(
    engine: Engine, spec: ModelSpec, weights: Mapping[str, torch.Tensor] | None
) -> float:
    """Activation by an in-place switch: from host tensors, or from disk if ``weights`` is None."""
    if weights is None:
        drop_page_cache(spec)
    start = time.perf_counter()
    engine.switch(spec, weights)
    switched = time.perf_counter() - start
    return switched + first_token(engine)


def measure_engine_start(spec: ModelSpec) -> dict[str, float]:
    """A cold activation in this process: engine start from disk, first token, shutdown."""
    drop_page_cache(spec)
    start = time.perf_counter()
    engine = Engine(spec)
    start_s = time.perf_counter() - start
    token_s = first_token(engine)
    engine.shutdown()
    return {"start_s": start_s, "seconds": start_s + token_s}


def measure_cold(registry_path: str, name: str) -> dict[str, float]:
    """A cold activation in a fresh Python process; returns its import, start and total times."""
    out = subprocess.run(
        [sys.executable, __file__, "--cold-child", registry_path, name],
        check=True,
        capture_output=True,
        text=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith(_COLD_MARK))
    return json.loads(line.removeprefix(_COLD_MARK))


def _cold_child(registry_path: str, name: str) -> None:
    start = time.perf_counter()
    preload()  # what a worker does at setup, not on activation
    import_s = time.perf_counter() - start
    result = {"import_s": import_s, **measure_engine_start(Registry.from_yaml(registry_path)[name])}
    print(_COLD_MARK + json.dumps(result), flush=True)


def bench_family(models_dir: str, size: str, repeats: int, cold_repeats: int) -> dict:
    """All tiers for one size; samples alternate between two models of the family."""
    family = make_family(size, size, replicas=2, out=models_dir)
    a, b = family.values()
    registry_path = os.path.join(models_dir, REGISTRY_FILE)
    cold = [measure_cold(registry_path, b.name) for _ in range(cold_repeats)]
    host = {spec.name: load_weights(spec.path) for spec in (a, b)}
    samples: dict[str, list[float]] = {tier: [] for tier in TIERS}
    samples["cold"] = [c["seconds"] for c in cold]
    engine = Engine(a)  # it runs a warm-up request before it returns
    try:
        targets = [b, a] * repeats
        for spec in targets[:repeats]:
            samples["engine_up_disk"].append(measure_switch(engine, spec, None))
        for spec in targets[repeats : 2 * repeats]:
            samples["engine_up_host"].append(measure_switch(engine, spec, host[spec.name]))
        for _ in range(repeats):
            samples["resident"].append(measure_resident(engine))
        # With this engine still up, as in a worker, whose engines stay up.
        next_engine = [measure_engine_start(b) for _ in range(cold_repeats)]
    finally:
        engine.shutdown()
    samples["cold_next_engine"] = [c["seconds"] for c in next_engine]
    medians = {tier: statistics.median(s) for tier, s in samples.items()}
    # Every tier ends with the same first forward pass; what activation adds is the rest.
    overhead = {tier: medians[tier] - medians["resident"] for tier in TIERS[:-1]}
    return {
        "model_bytes": b.nbytes,
        "engine_dtype": compute_dtype(EngineConfig().dtype, checkpoint_dtype(b.path)),
        "median_s": medians,
        "overhead_s": overhead,
        "samples_s": samples,
        "cold_parts": cold,
        "cold_next_engine_parts": next_engine,
        "ratios": {
            "cold/engine_up_host": medians["cold"] / medians["engine_up_host"],
            "cold_next_engine/engine_up_host": medians["cold_next_engine"]
            / medians["engine_up_host"],
            "cold/engine_up_disk": medians["cold"] / medians["engine_up_disk"],
            "engine_up_disk/engine_up_host": medians["engine_up_disk"] / medians["engine_up_host"],
            "engine_up_host/resident": medians["engine_up_host"] / medians["resident"],
            "overhead cold/engine_up_host": overhead["cold"] / overhead["engine_up_host"],
        },
    }


def machine() -> dict:
    """What the numbers were measured on (the load matters: the cores are shared)."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "vllm": __import__("vllm").__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold-repeats", type=int, default=2)
    parser.add_argument("--models-dir", default=config.get("models-dir"))
    parser.add_argument("--out", default="bench/results/activation.json")
    parser.add_argument(
        "--cold-child", nargs=2, metavar=("REGISTRY", "MODEL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.cold_child:
        _cold_child(*args.cold_child)
        return
    preload()  # as a worker does at setup
    before = machine()
    results = {
        size: bench_family(args.models_dir, size, args.repeats, args.cold_repeats)
        for size in args.sizes
    }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": before,
        "loadavg_1m_after": os.getloadavg()[0],
        "prompt": PROMPT,
        "tiers": TIER_TEXT,
        "overhead": "a tier's median minus resident's: what activation adds to the first"
        " forward pass that every tier ends with",
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for size, r in results.items():
        medians = ", ".join(f"{t} {s * 1000:.1f} ms" for t, s in r["median_s"].items())
        ratio = r["ratios"]["cold/engine_up_host"]
        ratio_next = r["ratios"]["cold_next_engine/engine_up_host"]
        print(f"{size}: {medians}; cold/host {ratio:.0f}x, cold_next_engine/host {ratio_next:.0f}x")


if __name__ == "__main__":
    main()
