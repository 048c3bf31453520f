"""Soak: the embedded cluster at the largest load it holds, then at twice that, nothing lost.

One command starts ``warmserve up`` (2 devices, the default families) as its own process, so
the load client here shares no event loop with the scheduler and front door, and then:

1. warms up: one request per model, one at a time (engine starts are not load);
2. ramps: open-loop replays of ``--step`` seconds at 1, 2, 4, ... requests/s until a step is not
   *held* after one that was; the largest held rate is the soak's base load. A step is held
   when at least 99.5% of its requests are served, none is rejected, the last of them is done
   within ``--drain`` seconds of the step's end (no backlog builds), and the median TTFT is at
   most ``--ttft-slo``. The median, not the p99: with 7 models on 2 exclusive devices, a request
   that needs an engine of another family waits for one to start (20 to 70 s here) at any load,
   and at the lowest rates most requests do, as idle instances are stopped between them;
3. soaks: ``--minutes`` at the base load, then ``--minutes`` at twice it.

Every phase replays a workload synthesized for it (``warmserve.traces.synth``: the default
models with Zipf popularity, BurstGPT rate shape, Azure conversation token counts, output capped
at ``--max-output`` tokens) through ``warmserve.replay`` (open loop: each request is sent when due,
whatever earlier ones are doing). Each request's outcome is one of: served (HTTP 200 and a stream
that ended normally), rejected (429 or 503 before the answer began), errored (any other status, or
an error event in the stream), lost (no HTTP answer at all within ``--timeout``: what must not
happen). Memory: RSS of the ``warmserve up`` process (scheduler and front door) and of each worker
process with its children, and /dev/shm usage, at the start and end of each soak phase.

Run: ``python -m bench.soak [--minutes 10]``; writes ``bench/results/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil

from warmserve.models.make import ensure_default_models
from warmserve.registry import Registry
from warmserve.replay import Outcome, replay
from warmserve.traces.synth import synthesize

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
HELD_SERVED = 0.995


@contextlib.contextmanager
def warmserve_up(models_dir: str, log_path: str) -> Iterator[tuple[str, psutil.Process]]:
    """``warmserve up`` on a free port; yields its URL and process, stops it with SIGTERM."""
    log = open(log_path, "w")  # noqa: SIM115 (closed below, after the process)
    cmd = [sys.executable, "-m", "warmserve", "up", "--port", "0", "--models-dir", models_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                url = found.group(1)
                break
        if url is None:
            raise RuntimeError(f"warmserve up exited ({proc.wait()}); see {log_path}")
        # Keep reading what it prints, so a full pipe never blocks it.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield url, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def memory(up: psutil.Process) -> dict:
    """RSS (MiB) of the scheduler/front door process and of each worker process tree, and
    /dev/shm usage: what a leak would grow."""

    def rss(p: psutil.Process) -> int:
        with contextlib.suppress(psutil.Error):
            return p.memory_info().rss
        return 0

    workers = {}
    for child in up.children():
        with contextlib.suppress(psutil.Error):
            tree = [child, *child.children(recursive=True)]
            workers[str(child.pid)] = round(sum(rss(p) for p in tree) / 2**20, 1)
    shm = shutil.disk_usage("/dev/shm")
    return {
        "scheduler_frontdoor_rss_mib": round(rss(up) / 2**20, 1),
        "worker_rss_mib": workers,
        "dev_shm_used_mib": round(shm.used / 2**20, 1),
        "dev_shm_files": len(os.listdir("/dev/shm")),
    }


def tally(outcomes: list[Outcome], seconds: float, rps: float) -> dict:
    """Counts per outcome and TTFT of the served, for one phase."""
    served = [o for o in outcomes if o.status == "ok"]
    rejected = [o for o in outcomes if o.status == "rejected"]
    lost = [o for o in outcomes if o.status == "error" and o.http_status == 0]
    errored = [o for o in outcomes if o.status == "error" and o.http_status != 0]
    ttft = np.array([o.ttft for o in served])
    errors: dict[str, int] = {}
    for o in errored + lost:
        key = f"{o.http_status} {o.error[:80]}"
        errors[key] = errors.get(key, 0) + 1
    return {
        "rps": rps,
        "seconds": seconds,
        "sent": len(outcomes),
        "served": len(served),
        "rejected": len(rejected),
        "errored": len(errored),
        "lost": len(lost),
        "ttft_p50_s": float(np.percentile(ttft, 50)) if len(ttft) else None,
        "ttft_p99_s": float(np.percentile(ttft, 99)) if len(ttft) else None,
        "tokens_out": int(sum(o.output_tokens for o in served)),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


async def phase(url: str, names: list[str], rps: float, seconds: float, args, seed: int) -> dict:
    """One open-loop replay of a workload synthesized at ``rps`` for ``seconds``."""
    workload = synthesize(names, args.alpha, rps, seconds, seed=seed)
    t0 = time.perf_counter()
    outcomes = await replay(
        workload,
        url,
        max_concurrency=args.max_concurrency,
        max_output_tokens=args.max_output,
        max_input_tokens=args.max_input,
        timeout=args.timeout,
        progress=False,
    )
    result = tally(outcomes, seconds, rps)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def held(result: dict, drain: float, slo: float) -> bool:
    p50 = result["ttft_p50_s"]
    return (
        result["sent"] > 0
        and result["served"] >= HELD_SERVED * result["sent"]
        and result["rejected"] == 0
        and result["wall_s"] <= result["seconds"] + drain
        and p50 is not None
        and p50 <= slo
    )


async def warm_up(url: str, registry: Registry) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for name in registry:
            body = {"model": name, "prompt": "warm up", "max_tokens": 2}
            r = await http.post("/v1/completions", json=body)
            print(f"warm-up {name}: {r.status_code}", flush=True)


async def soak(args, url: str, up: psutil.Process, registry: Registry) -> dict:
    names = list(registry)
    await warm_up(url, registry)
    ramp = []
    base = None
    rps = args.start_rps
    while rps <= args.max_rps:
        step = await phase(url, names, rps, args.step, args, seed=len(ramp))
        step["held"] = held(step, args.drain, args.ttft_slo)
        ramp.append(step)
        print(f"ramp {rps} rps: {json.dumps(step)}", flush=True)
        if step["held"]:
            base = rps
        elif base is not None:
            break
        rps *= 2
    if base is None:
        base = args.start_rps / 2
    phases = []
    for k, rate in enumerate((base, 2 * base)):
        before = memory(up)
        result = await phase(url, names, rate, args.minutes * 60, args, seed=100 + k)
        result["memory_start"], result["memory_end"] = before, memory(up)
        phases.append(result)
        print(f"soak {rate} rps: {json.dumps(result)}", flush=True)
    return {"base_rps": base, "ramp": ramp, "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="per soak phase")
    parser.add_argument("--step", type=float, default=60.0, help="seconds per ramp step")
    parser.add_argument("--start-rps", type=float, default=0.5)
    parser.add_argument("--max-rps", type=float, default=64.0)
    parser.add_argument("--drain", type=float, default=90.0, help="backlog a held step clears (s)")
    parser.add_argument("--ttft-slo", type=float, default=5.0, help="median TTFT of a held step")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--max-output", type=int, default=32)
    parser.add_argument("--max-input", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=1024)
    parser.add_argument(
        "--timeout",
        type=float,
        default=360.0,
        help="per request (s); above the front door's request-timeout (300 s), so a request the "
        "server gives up on gets its 504 rather than counting as lost",
    )
    parser.add_argument("--models-dir", default="/tmp/warmserve-soak/models")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    os.makedirs(args.models_dir, exist_ok=True)
    registry = ensure_default_models(args.models_dir)
    log_path = os.path.join(os.path.dirname(args.models_dir), "warmserve-up.log")
    t0 = time.perf_counter()
    with warmserve_up(args.models_dir, log_path) as (url, up):
        start_memory = memory(up)
        result = asyncio.run(soak(args, url, up, registry))
        end_memory = memory(up)
    phases = result["phases"]
    doc = {
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "stack": "warmserve up --devices 2 (default families: tiny x4, mini x3)",
        "models": list(registry),
        "largest_load_held": {
            "rps": result["base_rps"],
            "rule": f">= {HELD_SERVED:.1%} served, none rejected, all done within {args.drain:.0f} "
            f"s of the end of a {args.step:.0f} s open-loop step, median TTFT <= {args.ttft_slo} "
            f"s; rates doubling from {args.start_rps}, to the first failing one after a held one",
        },
        "outcomes": "served: 200 and a complete stream; rejected: 429/503; errored: other "
        "status or an error event; lost: no HTTP answer within the per-request timeout",
        "sent": sum(p["sent"] for p in phases),
        "served": sum(p["served"] for p in phases),
        "rejected": sum(p["rejected"] for p in phases),
        "errored": sum(p["errored"] for p in phases),
        "lost": sum(p["lost"] for p in phases),
        "memory_start": start_memory,
        "memory_end": end_memory,
        "wall_s": round(time.perf_counter() - t0, 1),
        **result,
    }
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, args.out)
    print(json.dumps({k: doc[k] for k in ("sent", "served", "rejected", "errored", "lost")}))


if __name__ == "__main__":
    main()
