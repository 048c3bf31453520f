"""End to end, live, on one GPU: warmserve against autoscale and share, 8B-shaped virtual models.

One policy per invocation, because the lent GPU runs commands of at most 10 minutes: each run
starts the stack ``warmserve up --devices cuda`` starts (``warmserve.launcher.serving``), replays
a compressed ServeGen workload through ``warmserve replay`` in a child process
(``bench.e2e.replay_sampled``), and writes ``OUT/gpu_e2e_<policy>.json`` step by step (a run cut
short keeps what it did), the replay's ``gpu_e2e_<policy>.parquet`` and log, and the workload
``gpu_e2e_workload.parquet``. ``--summarize DIR`` (on any machine, later) reads the three
policies' files from DIR, simulates the same workload under each policy with a cluster file
fitted to the GPU's measured costs (``clusters/h100-8b.yaml``), and writes
``bench/results/gpu_e2e.json``: P50/P99 TTFT, SLO attainment (TTFT <= 1 s), output tokens/s and
requests not served, live and simulated, their ratios, and the issue's targets.

Models. ``--models`` virtual models ``v0``... of one family share the files of one generated
replica (``make_family(f"l{size}", size, 1, ...)``), as the paper's virtual models do: 6 real
8B copies (96 GB) would not fit the machine's 64 GiB disk. To the system they are distinct
models: the worker keys its host copies (one memfd each), pool regions (``weights:<name>``) and
engines by model name, and reads the shared files only through ``spec.path``. Six 8B models
with their KV caches do not fit one 80 GB GPU at once: an engine holds its own weights (16.06
GB) and its KV cache (``--kv-gib``), the device pool a further 16.06 GB per prewarmed model.

Memory. The worker charges an engine its weights (16.06 GB), its KV cache (``--kv-gib``: 2 GiB,
what ``warmserve.policy.kv-bytes`` has the planner charge an instance too, over its 32 slots) and
``warmserve.planner.engine-bytes`` (``--engine-bytes``: 2 GB, an estimate of vLLM's activation
workspace and CUDA graphs, which the planner charges once per family and device); the device
pool 16.06 GB per prewarmed model. It gets a budget of ``--device-memory`` (82 GB of the H100's
85.5e9 bytes, through ``warmserve.worker.gpu-memory``): the 3.5 GB left out hold the CUDA
contexts and the error of that estimate, so what the worker's ledger accepts fits the card.
In 82 GB: 4 engines (``share`` gets 4 slots, as many as fit: MuxServe colocates by memory), or
2 engines and 2 prewarmed models, or 1 and 3. The host tier is ``--host-memory`` (96 GiB: 6
pinned copies of 16.06 GB on a 128 GiB machine). The cluster file of ``--summarize`` carries the
same numbers, and the summary checks that it does.

Host staging. The virtual models share one file, so after its first read every "disk" load
comes from the page cache (one 16 GB file stays there; six distinct ones would compete). So
before the replay every model is staged into the worker's host tier, one at a time
(``warmserve_prewarm`` to ``host``; ``--no-stage-host`` turns it off), for every policy alike:
the node keeps its checkpoints in host memory, as a ServerlessLLM-style server does. Activations
then start from host memory (0.3 s), the device pool (17 ms) or an idle engine. Staging used to
run beside the replay's first minutes: the first engine start then took 149 s instead of 38 s
(the copies and the engine's load shared the worker's threads and memory bandwidth), past the
warm-up, and the measured part's first 30 s waited for it.

Time. The workload follows ServeGen's daily rate curves (``bench.e2e``'s source, Zipf alpha 0.5,
``--rps`` in all) compressed so that one trace day lasts ``--period`` seconds of replay; the
forecaster's season is that compressed day and its window a fifteenth of it (``bench.e2e``'s
``compressed_config``). The first 2 compressed days are warm-up: the forecaster gets two periods
of history and the first engines start (30 to 49 s each on the H100) before anything counts.
Then ``--minutes`` of replay are measured (``--minutes`` / ``--period`` compressed days more).
bench/e2e.py makes the measured part one day as long as each warm-up day; here the warm-up is
compressed instead (2 days in 2 minutes at the default 60 s period, window 4 s) so that the
measured part can be long. Per policy: about 0.5 min of stack start, 2 min of warm-up,
``--minutes``, at most the front door's request timeout (60 s here) for the last requests, 0.3
min to stop. ``--minutes 10`` (the default, the issue's 10 minutes) takes about 14 minutes, more
than one call of the device tool allows (10), so it runs detached over two calls; one policy
and the machine's start fit one session's 30 minutes of device time. Every policy must replay
the same workload (same ``--minutes --period --rps --seed --models``): the summary checks.

P99 TTFT. ``ttft_p99_s`` (``warmserve.report.metrics``) is over the requests served; a policy
that serves one model and lets the others' requests time out has a small one. The targets use
``ttft_p99_all_s``: over every request due, one not served counting as never.

On the lent GPU (``bench/gpu_run.sh``; staged parts as bench/gpu_live.py's), calls back to back
so the machine stays warm between them (the run makes the model if it is not there)::

    bash bench/gpu_run.sh stage .gpu/site/p1                          # carry .gpu/site/p1
    bash bench/gpu_run.sh stage .gpu/site/p2                          # carry .gpu/site/p2
    bash bench/gpu_run.sh detach e2e python3 -m bench.gpu_e2e --policy warmserve \
        --out-dir /tmp/e2e                                            # carry .gpu/whl
    bash bench/gpu_run.sh wait e2e 580 /tmp/e2e                       # twice, till it exits
    python -m bench.gpu_e2e --summarize DIR   # here, on the policies' files copied into DIR

Dry run on CPU slots: ``--size tiny --devices 1 --kv-gib 0.125 --minutes 1 --out-dir /tmp/ge``
per policy, then ``--summarize /tmp/ge --cluster C --result /tmp/ge/gpu_e2e.json`` with a
cluster file C of one CPU slot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dask.config
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dask.utils import parse_bytes

from bench import e2e
from bench.gpu_live import Live, Report
from warmserve import launcher
from warmserve.launcher import serving
from warmserve.models.make import make_family
from warmserve.policy.config import PolicyConfig
from warmserve.registry import ModelSpec, Registry
from warmserve.report.plots import ttft_cdf
from warmserve.sim.cluster import load_cluster
from warmserve.sim.policies import policy_config
from warmserve.traces.synth import synthesize
from warmserve.worker_plugin.devices import expand_devices

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "clusters" / "h100-8b.yaml"
RESULT = e2e.RESULTS / "gpu_e2e.json"
PREFIX = "gpu_e2e"
MAX_MODEL_LEN = 2048  # as bench/gpu_live.py, whose costs clusters/h100-8b.yaml is fitted to
REQUEST_TIMEOUT = 60.0  # s: 60 SLOs; bounds how long the last requests hold a run
STATUS_EVERY = 10.0  # s between copies of the worker's status
# Per device kind: the worker's device budget (None: its configured one), its host tier, and the
# device memory the planner charges an engine besides the weights and KV of its instance.
GPU_DEFAULTS = {"device_memory": "82GB", "host_memory": "96GiB", "engine_bytes": 2e9}
CPU_DEFAULTS = {"device_memory": None, "host_memory": None, "engine_bytes": 16 * 2**20}
# What the summary puts simulated over live.
COMPARED = ("ttft_p50_s", "ttft_p99_s", "ttft_p99_all_s", "within_slo", "output_tokens_per_s")
# Targets of issue 21, Show item 3.
TARGET_P99_S = 0.5
TARGET_P99_RATIO = 10.0


def timing(period_s: float, minutes: float) -> dict[str, float]:
    """Compressed day, forecast window, warm-up (two days), measured and total replay seconds."""
    warmup = e2e.WARMUP_PERIODS * period_s
    return {
        "period_s": period_s,
        "compress": e2e.DAY / period_s,
        "window_s": period_s / e2e.WINDOWS_PER_PERIOD,
        "warmup_s": warmup,
        "measured_s": 60.0 * minutes,
        "duration_s": warmup + 60.0 * minutes,
    }


def virtual_models(size: str, count: int, models_dir: str) -> tuple[Registry, str]:
    """``count`` models ``v0``... of one family, all on the files of one generated replica;
    their registry is written beside the replica (the family's own registry is left as is)."""
    (replica,) = make_family(f"l{size}", size, 1, models_dir).values()
    registry = Registry(dataclasses.replace(replica, name=f"v{i}") for i in range(count))
    path = os.path.join(os.path.abspath(models_dir), f"virtual-{size}-{count}.yaml")
    registry.to_yaml(path)
    return registry, path


def share_slots(budget: int, spec: ModelSpec, kv: int, engine: int, count: int) -> int:
    """Engines of ``spec``'s size one device holds side by side (weights, KV and ``engine``
    bytes each, as the worker charges them), at most ``count``: MuxServe-style colocation by
    memory."""
    return int(max(1, min(count, budget // (spec.nbytes + kv + engine))))


def digest(workload: pa.Table) -> str:
    """Names the workload's arrivals and models: the policies' runs must have replayed one."""
    h = hashlib.sha256(workload.column("arrival").to_numpy().tobytes())
    h.update("\n".join(workload.column("model").to_pylist()).encode())
    return h.hexdigest()[:16]


def compact_status(status: dict, t0: float) -> dict:
    """What the worker holds, in a line: per device free bytes, pool residents and engines
    (model, serving or not); host copies and prewarm jobs running."""
    return {
        "t": round(time.time() - t0, 1),
        "devices": [
            {
                "free": d["free"],
                "resident": d["resident"],
                "engines": [[s["model"], s["instance"] is not None] for s in d["engine_slots"]],
            }
            for d in status["devices"]
        ],
        "host_cache": status["host_cache"],
        "host_used": status["host"]["used"],
        "jobs_running": sum(j["state"] == "running" for j in status["jobs"]),
    }


def activity(
    events: list[tuple[float, dict]], t0: float, since: float, until: float = float("inf")
) -> dict:
    """The worker's events (activations by tier, prewarm outcomes, engine deaths) between replay
    times ``since`` and ``until``; ``t0`` is when the replay started."""
    picked = [(t - t0, m) for t, m in events if since <= t - t0 < until and isinstance(m, dict)]
    acts = [m for _, m in picked if m.get("event") == "activated"]
    by_tier: dict[str, list[float]] = {}
    for m in acts:
        by_tier.setdefault(m["from_tier"], []).append(m["seconds"])
    prewarms = Counter(
        f"{m['tier']}:{m['state']}" for _, m in picked if m.get("event") == "prewarm"
    )
    first = min((t for t, m in picked if m.get("event") == "activated"), default=None)
    return {
        "activations": {k: len(v) for k, v in sorted(by_tier.items())},
        "activation_median_s": {k: statistics.median(v) for k, v in sorted(by_tier.items())},
        "activation_max_s": {k: max(v) for k, v in sorted(by_tier.items())},
        "deactivations": sum(m.get("event") == "deactivated" for _, m in picked),
        "prewarms": dict(sorted(prewarms.items())),
        "engine_deaths": [m for _, m in picked if m.get("event") == "engine-died"],
        "first_activation_s": first,
    }


def throughput(table: pa.Table, seconds: float) -> float:
    """Output tokens per second of the requests served in full."""
    ok = pc.equal(table["status"], "ok")
    return float(pc.sum(table.filter(ok)["output_tokens"]).as_py() or 0) / seconds


def p99_all(table: pa.Table, expected: int) -> float:
    """P99 TTFT over every request due, one not served (or never recorded) counting as never
    (inf), nearest rank. ``ttft_p99_s`` counts only the served: a policy that serves one model
    and lets the others' requests time out has a small one."""
    ok = pc.equal(table["status"], "ok")
    ttft = np.sort(table.filter(ok)["ttft"].to_numpy(zero_copy_only=False))
    rank = math.ceil(0.99 * expected)
    return float(ttft[rank - 1]) if 0 < rank <= len(ttft) else float("inf")


def numbers(table: pa.Table, expected: int, seconds: float) -> dict:
    """``bench.e2e.summary``, P99 TTFT over all requests, output tokens/s, requests not served."""
    out = e2e.summary(table, expected)
    out["ttft_p99_all_s"] = p99_all(table, expected)
    out["output_tokens_per_s"] = throughput(table, seconds)
    out["not_served"] = expected - out["served"]
    return out


class Tally(logging.Handler):
    """Counts the WarmServe warnings of this process (the scheduler's: failed activations...)
    by their format string, keeping the first few in full with their replay time."""

    def __init__(self, t0: float, keep: int = 20) -> None:
        super().__init__(logging.WARNING)
        self.t0, self.keep = t0, keep
        self.counts: Counter[str] = Counter()
        self.first: list[list] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[str(record.msg)] += 1
        if len(self.first) < self.keep:
            self.first.append([round(record.created - self.t0, 2), record.getMessage()[:300]])

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts.most_common()), "first": self.first}


async def stage_host(live: Live, registry: Registry, log: list) -> None:
    """Every model into the worker's host tier, one at a time (the copies share the worker's
    threads with engine starts and switches)."""
    for name in registry:
        start = time.perf_counter()
        try:
            job = await live.worker("warmserve_prewarm", model=name, tier="host", wait=True)
            state = job["state"] if job.get("error") is None else f"{job['state']}: {job['error']}"
        except Exception as e:  # DoesNotFit when the host tier is full: the others may fit
            state = f"{type(e).__name__}: {e}"
        log.append({"model": name, "state": state, "s": time.perf_counter() - start})


async def sample_status(live: Live, t0: float, out: list) -> None:
    while True:
        out.append(compact_status(await live.worker("warmserve_status"), t0))
        await asyncio.sleep(STATUS_EVERY)


async def live_run(
    args: argparse.Namespace, registry: Registry, registry_file: str, t: dict
) -> dict:
    """One policy, live: start the stack, stage host copies, replay, keep history and the
    worker's events and status, stop."""
    out_dir = Path(args.out_dir)
    t0 = time.perf_counter()
    staged: list[dict] = []
    statuses: list[dict] = []
    stop_error = None
    # A stack that fails to stop (on the H100 a worker's kill timed out) must not lose the run.
    stopped = contextlib.AsyncExitStack()
    stack = await stopped.enter_async_context(
        serving(registry, registry_file, args.policy, args.devices, 0)
    )
    try:
        live = Live(stack, "", {})
        try:
            await live.device()  # the worker has reported its device
            started = time.perf_counter() - t0
            if args.stage_host:
                await stage_host(live, registry, staged)
            t_replay = time.time()
            tally = Tally(t_replay)
            logging.getLogger("warmserve").addHandler(tally)
            tasks = [asyncio.ensure_future(sample_status(live, t_replay, statuses))]
            try:
                history = await e2e.replay_sampled(
                    stack,
                    args.policy,
                    out_dir / "gpu_e2e_workload.parquet",
                    out_dir / f"{PREFIX}_{args.policy}.parquet",
                    out_dir / f"{PREFIX}_{args.policy}.log",
                )
            finally:
                logging.getLogger("warmserve").removeHandler(tally)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            replayed = time.time() - t_replay
            events = list(stack.cluster.scheduler.get_events("warmserve"))
            final = await live.worker("warmserve_status")
        finally:
            await live.client.aclose()
    except BaseException:
        await stopped.aclose()
        raise
    stopping = time.perf_counter()
    try:
        await stopped.aclose()
    except Exception as e:  # the run is in hand; say why the stack did not stop
        stop_error = f"{type(e).__name__}: {e}"
    jobs = Counter(f"{j['tier']}:{j['state']}" for j in final.pop("jobs", []))
    return {
        "timings": {
            "start_s": started,
            "replay_s": replayed,
            "stop_s": time.perf_counter() - stopping,
            "total_s": time.perf_counter() - t0,
        },
        "stop_error": stop_error,
        "replay_started_at": t_replay,
        "staged": staged,  # before replay_started_at
        "activity_warmup": activity(events, t_replay, 0.0, t["warmup_s"]),
        "activity": activity(events, t_replay, t["warmup_s"]),
        "warnings": tally.to_dict(),
        "worker_final": {**final, "jobs": dict(jobs)},
        "worker_timeline": statuses,
        "history": {m: sorted((x, *v) for x, v in s.items()) for m, s in history.items()},
    }


def settings_for(args: argparse.Namespace, registry: Registry, kind: str) -> tuple[dict, dict]:
    """The ``warmserve.*`` keys of the run (beside the compressed timings) and the memory plan."""
    spec = next(iter(registry.values()))
    kv = int(args.kv_gib * 2**30)
    capacity = int(dask.config.get("warmserve.planner.instance-capacity"))
    budget = int(
        parse_bytes(args.device_memory or dask.config.get("warmserve.worker.device-memory"))
    )
    engine = int(args.engine_bytes)
    extra: dict[str, Any] = {
        "warmserve.engine.max-model-len": MAX_MODEL_LEN,
        "warmserve.worker.engine-kv": kv,
        "warmserve.frontdoor.request-timeout": REQUEST_TIMEOUT,
        "warmserve.planner.engine-bytes": engine,
        "warmserve.policy.kv-bytes": {m: kv // capacity for m in registry},
        "warmserve.policy.share-slots": share_slots(budget, spec, kv, engine, len(registry)),
    }
    if args.host_memory:
        extra["warmserve.worker.host-memory"] = args.host_memory
    if args.device_memory:
        extra["warmserve.worker.gpu-memory"] = args.device_memory
    host = int(parse_bytes(args.host_memory or dask.config.get("warmserve.worker.host-memory")))
    plan = {
        "device_kind": kind,
        "devices": args.devices,
        "device_budget_bytes": budget,
        "host_budget_bytes": host,
        "model_bytes": spec.nbytes,
        "engine_kv_bytes": kv,
        "instance_bytes": spec.nbytes + kv,
        "engine_bytes": engine,
        "worker_engine_bytes": spec.nbytes + kv + engine,
        "share_slots": extra["warmserve.policy.share-slots"],
        "models_in_host": min(len(registry), host // spec.nbytes),
        "stage_host": args.stage_host,
    }
    return extra, plan


def run_policy(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(str(out_dir / f"{PREFIX}_{args.policy}.json"), "bench.gpu_e2e")
    report.set("policy", args.policy)
    report.set("date", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    start = time.perf_counter()
    registry, registry_file = virtual_models(args.size, args.models, args.models_dir)
    report.set("models_s", time.perf_counter() - start)
    kind = args.devices[0].partition(":")[0]
    t = timing(args.period, args.minutes)
    names = list(registry)
    workload = synthesize(
        names,
        e2e.ALPHA,
        args.rps,
        t["duration_s"],
        seed=args.seed,
        compress=t["compress"],
        sources=[e2e.SOURCE],
    )
    pq.write_table(workload, out_dir / "gpu_e2e_workload.parquet")
    expected = e2e.measured(workload, t["warmup_s"]).num_rows
    spec = registry[names[0]]
    report.set(
        "workload",
        {
            "models": names,
            "family": spec.family,
            "shared_path": spec.path,
            "registry": [
                {"name": s.name, "family": s.family, "bytes": s.nbytes, "tp": s.tp}
                for s in registry.values()
            ],
            "alpha": e2e.ALPHA,
            "rps": args.rps,
            "seed": args.seed,
            "requests": workload.num_rows,
            "measured_requests": expected,
            "digest": digest(workload),
            "source": e2e.SOURCE.name,
            "synth": json.loads(workload.schema.metadata[b"synth"]),
            "max_output_tokens": e2e.MAX_OUTPUT,
            "max_input_tokens": e2e.MAX_INPUT,
            "slo_ttft_s": e2e.SLO_TTFT,
            **t,
        },
    )
    extra, plan = settings_for(args, registry, kind)
    estimate = 30 + t["duration_s"] + REQUEST_TIMEOUT + 20
    plan["estimated_live_s"] = estimate
    report.set("plan", plan)
    print(
        f"[gpu_e2e] {args.policy}: {len(names)} models, warm-up {t['warmup_s']:.0f} s + measured "
        f"{t['measured_s']:.0f} s; about {estimate / 60:.1f} min live at most",
        flush=True,
    )
    with e2e.compressed_config(t, extra) as cfg:
        report.set("config", {k: v for k, v in cfg.items() if k != "env"})
        report.set("extra", extra)
        r = launcher.run(live_run(args, registry, registry_file, t))
        for key in ("timings", "stop_error", "staged", "activity_warmup", "activity", "warnings"):
            report.set(key, r[key])
        table = e2e.measured(
            pq.read_table(out_dir / f"{PREFIX}_{args.policy}.parquet"), t["warmup_s"]
        )
        report.set("live", numbers(table, expected, t["measured_s"]))
        for key in ("worker_final", "worker_timeline", "replay_started_at", "history"):
            report.set(key, r[key])


def prepare(args: argparse.Namespace) -> None:
    """Make the replica and the virtual registry; with ``--warm-engine`` also start and stop one
    engine, so vLLM's compiled graphs are on the machine before the first policy's run."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(str(out_dir / f"{PREFIX}_prepare.json"), "bench.gpu_e2e")
    start = time.perf_counter()
    registry, registry_file = virtual_models(args.size, args.models, args.models_dir)
    report.set("models", {"registry": registry_file, "make_s": time.perf_counter() - start})
    if not args.warm_engine:
        return
    from warmserve.engine.engine import Engine, EngineConfig
    from warmserve.engine.engine import preload as preload_engine

    start = time.perf_counter()
    preload_engine()
    report.set("preload_s", time.perf_counter() - start)
    config = EngineConfig(kv_cache_bytes=int(args.kv_gib * 2**30), max_model_len=MAX_MODEL_LEN)
    start = time.perf_counter()
    engine = Engine(next(iter(registry.values())), config)
    report.set("engine_start_s", time.perf_counter() - start)
    engine.shutdown()


def summarize(run_dir: Path, cluster: Path, result: Path) -> dict:
    """Merge the policies' runs, simulate the same workload with ``cluster``, write ``result``."""
    runs = {
        p: json.loads((run_dir / f"{PREFIX}_{p}.json").read_text())
        for p in e2e.POLICIES
        if (run_dir / f"{PREFIX}_{p}.json").exists()
    }
    if not runs:
        raise SystemExit(f"no {PREFIX}_<policy>.json in {run_dir}")
    workload = pq.read_table(run_dir / "gpu_e2e_workload.parquet")
    first = next(iter(runs.values()))
    w = first["workload"]
    t = {k: w[k] for k in ("period_s", "compress", "window_s", "warmup_s", "measured_s")}
    checks: dict[str, Any] = {"workload_digest": digest(workload)}
    for p, r in runs.items():
        if r["workload"]["digest"] != checks["workload_digest"]:
            raise SystemExit(f"{p} replayed another workload than {run_dir}/gpu_e2e_workload")
        if "live" not in r:
            raise SystemExit(f"{p}'s run did not finish; run it again")
    expected = w["measured_requests"]
    doc: dict[str, Any] = {
        "name": result.stem,
        "command": shlex.join(["python", "-m", "bench.gpu_e2e", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cluster": str(cluster),
        "runs": {p: {k: r[k] for k in ("command", "date", "machine")} for p, r in runs.items()},
        "slo_ttft_s": w["slo_ttft_s"],
        "workload": {k: v for k, v in w.items() if k not in ("registry", "synth")},
        "plan": first["plan"],
        "extra": first["extra"],
    }
    live_tables = {
        p: e2e.measured(pq.read_table(run_dir / f"{PREFIX}_{p}.parquet"), t["warmup_s"])
        for p in runs
    }
    doc["live"] = {p: numbers(tab, expected, t["measured_s"]) for p, tab in live_tables.items()}
    doc["live_timings"] = {p: r["timings"] for p, r in runs.items()}
    doc["live_activity"] = {p: r["activity"] for p, r in runs.items()}
    sim_tables: dict[str, pa.Table] = {}
    with tempfile.TemporaryDirectory() as tmp:
        registry_file = os.path.join(tmp, "registry.yaml")
        Registry(
            ModelSpec(m["name"], m["family"], m["bytes"], m["tp"]) for m in w["registry"]
        ).to_yaml(registry_file)
        spec = load_cluster(cluster, registry_file)
        with e2e.compressed_config(t, first["extra"]):
            base = PolicyConfig.from_mapping(dask.config.get("warmserve"))
            planned = policy_config(spec, base)
            for p in runs:
                sim = e2e.simulate(workload, registry_file, p, base, cluster)
                sim_tables[p] = e2e.measured(sim, t["warmup_s"])
    doc["sim"] = {p: numbers(tab, expected, t["measured_s"]) for p, tab in sim_tables.items()}
    plan = first["plan"]
    kv_live = first["extra"]["warmserve.policy.kv-bytes"].values()
    # [cluster file, live run]: the simulator must plan with what the live planner planned with.
    same = {
        "devices": [spec.device_count, len(plan["devices"])],
        "device_memory": [spec.device_memory, plan["device_budget_bytes"]],
        "engine_bytes": [planned.engine_bytes, plan["engine_bytes"]],
        "kv_bytes_per_request": [sorted(set(planned.kv_bytes.values())), sorted(set(kv_live))],
        "request_timeout_s": [
            spec.costs.request_timeout_s,
            first["extra"]["warmserve.frontdoor.request-timeout"],
        ],
    }
    checks.update(same)
    checks["cluster_matches_live"] = all(a == b for a, b in same.values())
    checks["sim_decode_s_vs_live_tpot_p50_s"] = [
        spec.costs.profile(next(iter(spec.models.values()))).decode_s,
        {p: doc["live"][p]["tpot_p50_s"] for p in runs},
    ]
    doc["checks"] = checks
    doc["sim_over_live"] = {
        p: {k: _ratio(doc["sim"][p][k], doc["live"][p][k]) for k in COMPARED} for p in runs
    }
    doc["targets"] = targets(doc["live"])
    result.parent.mkdir(parents=True, exist_ok=True)
    labelled = {f"live {p}": x for p, x in live_tables.items()}
    labelled.update({f"sim {p}": x for p, x in sim_tables.items()})
    ttft_cdf(
        labelled,
        str(result.with_name(f"{result.stem}_ttft_cdf.png")),
        w["slo_ttft_s"],
    )
    e2e.plot_load(
        {p: {k: r[k] for k in ("history", "replay_started_at")} for p, r in runs.items()},
        t,
        result.with_name(f"{result.stem}_load.png"),
    )
    for p, tab in live_tables.items():
        pq.write_table(tab, result.with_name(f"{result.stem}_{p}.parquet"))
    with open(f"{result}.tmp", "w") as f:
        json.dump(doc, f, indent=1, default=float)
    os.replace(f"{result}.tmp", result)
    return doc


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and math.isfinite(b) else None


def targets(live: dict) -> dict:
    """The issue's targets, where the runs they compare are there."""
    out: dict[str, Any] = {}
    w = live.get("warmserve")
    if w is None:
        return out
    out["warmserve_p99_all_s"] = w["ttft_p99_all_s"]
    out["warmserve_p99_within_0.5s"] = w["ttft_p99_all_s"] <= TARGET_P99_S
    out["warmserve_not_served"] = w["not_served"]
    out["warmserve_all_served"] = w["not_served"] == 0
    if "autoscale" in live:
        ratio = live["autoscale"]["ttft_p99_all_s"] / w["ttft_p99_all_s"]
        out["p99_autoscale_over_warmserve"] = ratio
        out["p99_10x_better_than_autoscale"] = ratio >= TARGET_P99_RATIO
    if "share" in live:
        out["slo_warmserve_minus_share"] = w["within_slo"] - live["share"]["within_slo"]
        out["slo_at_least_share"] = w["within_slo"] >= live["share"]["within_slo"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--policy", choices=e2e.POLICIES, help="Run this policy live.")
    what.add_argument("--prepare", action="store_true", help="Only make the models.")
    what.add_argument("--summarize", type=Path, metavar="DIR", help="Merge the runs in DIR.")
    ap.add_argument("--cluster", type=Path, default=CLUSTER, help="For --summarize.")
    ap.add_argument("--result", type=Path, default=RESULT, help="What --summarize writes.")
    ap.add_argument("--size", default="8b", help="Shape of the generated replica.")
    ap.add_argument("--models", type=int, default=6, help="Virtual models on its files.")
    ap.add_argument("--models-dir", default="/tmp/models")
    ap.add_argument("--devices", default="cuda", help="As warmserve up takes them.")
    ap.add_argument("--kv-gib", type=float, default=2.0, help="KV cache of one engine.")
    ap.add_argument("--device-memory", help="Worker's device budget [GPU: 82GB].")
    ap.add_argument("--host-memory", help="Worker's host tier [GPU: 96GiB].")
    ap.add_argument("--engine-bytes", type=float, help="Planner's charge per engine [GPU: 2e9].")
    ap.add_argument("--minutes", type=float, default=10.0, help="Measured replay minutes.")
    ap.add_argument("--period", type=float, default=60.0, help="Replay seconds per trace day.")
    ap.add_argument("--rps", type=float, default=0.5, help="Mean requests/s over all models.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp/gpu_e2e"))
    ap.add_argument("--warm-engine", action="store_true", help="--prepare starts an engine too.")
    ap.add_argument(
        "--no-stage-host",
        dest="stage_host",
        action="store_false",
        help="Do not stage every model in host memory at the start.",
    )
    args = ap.parse_args()
    if args.summarize:
        doc = summarize(args.summarize, args.cluster, args.result)
        keys = ("live", "sim", "sim_over_live", "targets", "checks")
        print(json.dumps({k: doc[k] for k in keys}, indent=1, default=float))
        return
    args.devices = expand_devices(args.devices)
    defaults = GPU_DEFAULTS if args.devices[0].startswith("cuda") else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.prepare:
        prepare(args)
    else:
        run_policy(args)


if __name__ == "__main__":
    main()
