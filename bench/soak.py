"""Soak: the embedded cluster ramped to the largest load it holds, then half of that for 30 min.

The setup is what a user runs: ``warmserve up`` as its own process (2 CPU slots, the default
families: tiny x4 and mini x3), so the load client here shares no event loop with the scheduler
and front door. Then:

1. warms up: one request per model, one at a time (the first engine start of each worker, 20 s
   with vLLM's import here, is not load);
2. ramps: open-loop replays of ``--step`` seconds at 0.5, 1, 2, 4, ... requests/s until a step
   is not *held* after one that was. A step is held when at least 99.5% of its requests are
   served, none is lost or rejected, the last of them is done within ``--drain`` seconds of the
   step's end (no backlog builds), the median TTFT is at most ``--ttft-slo`` and the P99 at most
   ``--ttft-p99-slo`` (10 s: a rate whose tail is a minute is not one a user would call held;
   the run of b0957bc, with the median alone, held 32 requests/s with a P99 of 60 s and soaked
   at 16 with a P99 of 148 s);
3. soaks: ``--minutes`` (30) at ``--fraction`` (half) of the largest held rate, with the RSS of
   every process of ``warmserve up`` (scheduler and front door, each worker and its children),
   /dev/shm and the machine's load average sampled every ``--sample`` seconds (30). Memory is
   *flat* when the end-of-run RSS, in total and per process, is within 10% of its value after
   warm-up: the first sample of the soak, once the warm-up requests and the ramp have started
   every engine the load needs. The figure against the RSS right after the warm-up requests
   (before the ramp) is written beside it.

Every phase replays a workload synthesized for it (``warmserve.traces.synth``: the default
models with Zipf popularity, BurstGPT rate shape, Azure conversation token counts, output capped
at ``--max-output`` tokens) through ``warmserve.replay`` (open loop: each request is sent when due,
whatever earlier ones are doing). Each request's outcome is one of: served (HTTP 200 and a stream
that ended normally), rejected (429 or 503 before the answer began), errored (any other status, or
an error event in the stream), lost (no HTTP answer at all within ``--timeout``: what must not
happen).

Why the first soak (fd5a454, 2026-11-23 13:56: median TTFT 5.1 s, P99 164 s at 0.5 requests/s)
was slow: it ran on code that changed within the next two hours. The 7 models share 2 devices,
one instance each. A request for a model without an instance, with both devices holding an
instance, waited until the autoscaler stopped one: ``on_demand`` then only placed on free
devices, so an idle instance kept its device until its 5 s load average had been zero for the 5 s
grace, seen at the 5 s planner tick (5 to 15 s; the median was 5.1 s). Idle instances are
preempted for a waiting request since 313020a. Its tail waited for engine starts of 20 to 70 s
(its docstring), one at a time per worker: vLLM's import counted in a worker's first and bf16
weights ran 3x slower on this CPU until 500ca7f. Today the same 0.5 requests/s step (the same 27
requests: seed 0) has a median TTFT of 26 ms and a P99 of 181 ms: the request preempts an idle
instance and an idle engine of its family switches to it in place (30 to 100 ms). In the run of
``bench/results/soak.json`` (36,722 requests) 4 engines started, all in the warm-up (0.4 to
0.8 s; a worker's first up to 20 s, with vLLM's import), and 3,983 of 3,992 activations found
an engine of the family up.

What remains is load: only 2 of the 7 models are served at a time, and a model's request waits
until an instance of another goes idle; at 16 requests/s the P99 is about 11 s.

The held rate was once 1 request/s by the P99 rule: the scheduler and front door process stopped
for 15 to 17 s right after the first 300 s load window closed, while numba compiled the
forecaster's kernels on the event loop (the first request's on-demand call paid another 12 s).
Since 5da390d the scheduler compiles them in a thread at start (``Policy.prepare``); 2 requests/s
then has a P99 of 95 ms and 8 requests/s 0.68 s (``bench/results/soak.json``, its notes).

Run: ``python -m bench.soak [--minutes 30]``; writes ``bench/results/soak.json``.
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
FLAT = 0.10  # end-of-run RSS within this fraction of the value after warm-up
SLICE_S = 300.0  # TTFT percentiles of the soak per slice of this many seconds


@contextlib.contextmanager
def warmserve_up(models_dir: str, log_path: str) -> Iterator[tuple[str, psutil.Process]]:
    """``warmserve up`` on a free port; yields its URL and process, stops it with SIGTERM.

    Its console (engine starts, activations, evictions, warnings) goes to ``log_path``."""
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


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def memory(up: psutil.Process) -> dict:
    """RSS (MiB) of every process of ``warmserve up`` by pid (``up``: the scheduler and front
    door; the others are its workers and their children, named by their command line), their
    total, /dev/shm usage, and the machine's 1-minute load average."""
    procs = {}
    for p in [up, *up.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            name = "up" if p.pid == up.pid else " ".join(p.cmdline())[:60].strip()
            procs[str(p.pid)] = {"name": name, "rss_mib": _mib(p.memory_info().rss)}
    shm = shutil.disk_usage("/dev/shm")
    return {
        "t": round(time.time(), 1),
        "rss_mib": procs,
        "total_rss_mib": round(sum(p["rss_mib"] for p in procs.values()), 1),
        "dev_shm_used_mib": _mib(shm.used),
        "dev_shm_files": len(os.listdir("/dev/shm")),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def others(up: psutil.Process) -> list[dict]:
    """Processes outside this soak using CPU now (the machine is shared), busiest first."""
    mine = {os.getpid(), up.pid, *(p.pid for p in up.children(recursive=True))}
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid not in mine]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(2.0)
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cpu = p.cpu_percent(None)
            if cpu >= 10.0:
                cmd = " ".join(p.info["cmdline"] or [])[:100].strip()
                out.append({"pid": p.pid, "cpu_percent": cpu, "cmd": cmd})
    return sorted(out, key=lambda x: -x["cpu_percent"])


class Sampler:
    """``memory(up)`` every ``every`` seconds on a thread, until stopped."""

    def __init__(self, up: psutil.Process, every: float) -> None:
        self.up, self.every = up, every
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(memory(self.up))
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(memory(self.up))


def flat(reference: dict, end: dict) -> dict:
    """End-of-run RSS against ``reference``, in total and per process present in both."""
    ratio = end["total_rss_mib"] / reference["total_rss_mib"]
    per = {}
    for pid, p in reference["rss_mib"].items():
        e = end["rss_mib"].get(pid)
        per[pid] = {
            "name": p["name"],
            "reference_mib": p["rss_mib"],
            "end_mib": e["rss_mib"] if e else None,
            "ratio": round(e["rss_mib"] / p["rss_mib"], 3) if e and p["rss_mib"] else None,
        }
    ok = abs(ratio - 1) <= FLAT and all(
        x["ratio"] is not None and abs(x["ratio"] - 1) <= FLAT for x in per.values()
    )
    return {
        "reference_total_mib": reference["total_rss_mib"],
        "end_total_mib": end["total_rss_mib"],
        "ratio": round(ratio, 3),
        "per_process": per,
        "holds": ok,
    }


def percentiles(ttft: np.ndarray) -> dict:
    if not len(ttft):
        return {"ttft_p50_s": None, "ttft_p99_s": None}
    return {
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4),
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
        **percentiles(ttft),
        "ttft_max_s": round(float(ttft.max()), 4) if len(ttft) else None,
        "tokens_out": int(sum(o.output_tokens for o in served)),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


def slices(outcomes: list[Outcome], seconds: float) -> list[dict]:
    """TTFT percentiles of the served requests by arrival, per ``SLICE_S`` seconds."""
    out = []
    for start in np.arange(0.0, seconds, SLICE_S):
        part = [o for o in outcomes if start <= o.arrival < start + SLICE_S]
        ttft = np.array([o.ttft for o in part if o.status == "ok"])
        out.append({"from_s": float(start), "sent": len(part), **percentiles(ttft)})
    return out


async def phase(
    url: str, names: list[str], rps: float, seconds: float, args, seed: int
) -> tuple[dict, list[Outcome]]:
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
    return result, outcomes


def held(result: dict, drain: float, slo: float, p99_slo: float) -> bool:
    p50, p99 = result["ttft_p50_s"], result["ttft_p99_s"]
    return (
        result["sent"] > 0
        and result["served"] >= HELD_SERVED * result["sent"]
        and result["lost"] == 0
        and result["rejected"] == 0
        and result["wall_s"] <= result["seconds"] + drain
        and p50 is not None
        and p50 <= slo
        and p99 <= p99_slo
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
    after_warm_up = memory(up)
    ramp = []
    largest = None
    rps = args.start_rps
    while rps <= args.max_rps:
        step, _ = await phase(url, names, rps, args.step, args, seed=len(ramp))
        step["held"] = held(step, args.drain, args.ttft_slo, args.ttft_p99_slo)
        step["load_1m_end"] = round(os.getloadavg()[0], 2)
        ramp.append(step)
        print(f"ramp {rps} rps: {json.dumps(step)}", flush=True)
        if step["held"]:
            largest = rps
        elif largest is not None:
            break
        rps *= 2
    if largest is None:
        raise SystemExit("no ramp step was held")
    rate = args.fraction * largest
    seconds = args.minutes * 60
    print(f"soak at {rate} rps for {seconds:.0f} s", flush=True)
    with Sampler(up, args.sample) as sampler:
        result, outcomes = await phase(url, names, rate, seconds, args, seed=100)
    result["slices"] = slices(outcomes, seconds)
    samples = sampler.samples
    result["memory"] = {
        "sample_every_s": args.sample,
        "samples": samples,
        "flat": {
            "rule": f"end-of-run RSS within {FLAT:.0%} of the first sample of the soak (after "
            "the warm-up requests and the ramp), in total and for each process",
            **flat(samples[0], samples[-1]),
        },
        "against_after_warm_up_requests": flat(after_warm_up, samples[-1]),
        "after_warm_up_requests": after_warm_up,
        "dev_shm_used_mib": [samples[0]["dev_shm_used_mib"], samples[-1]["dev_shm_used_mib"]],
    }
    loads = [s["load_1m"] for s in samples]
    result["load_1m"] = {
        "min": min(loads),
        "median": float(np.median(loads)),
        "max": max(loads),
    }
    print(f"soak {rate} rps: {json.dumps({k: result[k] for k in list(result)[:13]})}", flush=True)
    return {"largest_held_rps": largest, "soak_rps": rate, "ramp": ramp, "soak": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="of the soak")
    parser.add_argument("--fraction", type=float, default=0.5, help="of the largest held rate")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--step", type=float, default=60.0, help="seconds per ramp step")
    parser.add_argument("--start-rps", type=float, default=0.5)
    parser.add_argument("--max-rps", type=float, default=64.0)
    parser.add_argument("--drain", type=float, default=90.0, help="backlog a held step clears (s)")
    parser.add_argument("--ttft-slo", type=float, default=5.0, help="median TTFT of a held step")
    parser.add_argument("--ttft-p99-slo", type=float, default=10.0, help="P99 TTFT of a held step")
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
    commit = subprocess.run(  # the code that runs: other commits may land meanwhile
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with warmserve_up(args.models_dir, log_path) as (url, up):
        busy_at_start = others(up)
        start_memory = memory(up)
        result = asyncio.run(soak(args, url, up, registry))
        busy_at_end = others(up)
    s = result["soak"]
    doc = {
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_1m_during_soak": s["load_1m"],
            "other_processes_busy_at_start": busy_at_start,
            "other_processes_busy_at_end": busy_at_end,
        },
        "stack": "warmserve up --devices 2 (default: 2 CPU slots; default families: tiny x4, "
        "mini x3)",
        "models": list(registry),
        "largest_load_held": {
            "rps": result["largest_held_rps"],
            "rule": f">= {HELD_SERVED:.1%} served, none lost or rejected, all done within "
            f"{args.drain:.0f} s of the end of a {args.step:.0f} s open-loop step, median TTFT "
            f"<= {args.ttft_slo} s, P99 TTFT <= {args.ttft_p99_slo} s; rates doubling from "
            f"{args.start_rps}, to the first failing one after a held one",
        },
        "outcomes": "served: 200 and a complete stream; rejected: 429/503; errored: other "
        "status or an error event; lost: no HTTP answer within the per-request timeout",
        "ramp_ttft": [
            {k: step[k] for k in ("rps", "held", "ttft_p50_s", "ttft_p99_s")}
            for step in result["ramp"]
        ],
        "soak_rps": result["soak_rps"],
        "soak_minutes": args.minutes,
        "soak_ttft": {"ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"]},
        "holds": {
            "none_lost": sum(p["lost"] for p in [*result["ramp"], s]) == 0,
            "soak_served_at_least_99.5%": s["served"] >= HELD_SERVED * s["sent"],
            "memory_flat": s["memory"]["flat"]["holds"],
        },
        "sent": s["sent"],
        "served": s["served"],
        "rejected": s["rejected"],
        "errored": s["errored"],
        "lost": s["lost"],
        "memory_start": start_memory,
        "wall_s": round(time.perf_counter() - t0, 1),
        **result,
    }
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, args.out)
    print(json.dumps({k: doc[k] for k in ("holds", "sent", "served", "rejected", "lost")}))


if __name__ == "__main__":
    main()
