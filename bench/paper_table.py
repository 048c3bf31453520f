"""The paper's table on the simulator: 2 nodes x 8 GPUs of 80 GB (clusters/paper.yaml).

Workloads are synthesized (warmserve.traces.synth: BurstGPT-shaped per-model rate curves,
Azure LLM conversation 2023 token counts) at Zipf popularity alpha 0.5 and 2 and 5 to 25 RPS.
Each run simulates a warm-up hour (the forecaster's first history; not measured) and a measured
hour. Writes bench/results/paper_table.json and .md and a TTFT CDF PNG:

- P95/P99 TTFT, fraction of requests with TTFT under 100 ms, per policy, alpha and rate (the
  first seed's workloads);
- the ablations at 15 RPS, alpha 0.5, and on a memory-scarce cluster (``SCARCE``);
- the largest RPS each policy serves with ``--target`` of requests within ``--slo-ttft``: per
  workload seed, the last rate passed on a walk up the grid ``--sweep-lo``, ``--sweep-lo +
  --sweep-step``, ... (every ``--sweep-stride``-th first, then the rates below the first that
  failed; ``warmserve.sim.sweep.max_rps``), and the median over the seeds. Attainment is not
  monotone in the rate near the limit, hence no bisection.

Each (policy, alpha, seed) is one task in a pool of ``--jobs`` processes; the simulator's
numbers do not depend on how the tasks are spread or on wall time.

    python bench/paper_table.py [--rates 5,10,15,20,25] [--alphas 0.5,2] [--seeds 0,1,2]
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import click
import numpy as np
import pyarrow as pa

from warmserve.report.metrics import request_metrics
from warmserve.report.plots import device_modes, ttft_cdf
from warmserve.sim.cluster import load_cluster
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import build_policy, live_config, policy_config
from warmserve.sim.sweep import gpus_needed, max_rps, measured, median_rps, rate_grid
from warmserve.traces.synth import synthesize

MAIN = ("warmserve", "autoscale", "share")
ABLATIONS = (
    "warmserve",
    "warmserve-noproactive",
    "warmserve-noplacement",
    "warmserve-noprewarm",
    "warmserve-nolend",
)
PAPER_UNDER_100MS = {  # the paper's ablation figures (DESIGN.md)
    "warmserve": 1.00,
    "warmserve-noproactive": 0.88,
    "warmserve-noplacement": 0.29,
    "warmserve-noprewarm": 0.15,
}
ABLATION_AT = (0.5, 15.0)  # alpha, RPS
# The ablations again where device memory is scarce: 52 virtual models (1,424 GB of weights on
# 1,280 GB of GPUs). At alpha 2 and 5 RPS the instances the load needs fit on the GPUs, so what
# the switches change is which weights stay warm (at alpha 0.5, or at 15 RPS, most requests
# wait for GPUs whatever the policy).
SCARCE = ("clusters/paper-scarce.yaml", 2.0, 5.0)  # cluster, alpha, RPS


@dataclass(frozen=True)
class Task:
    """What one worker process runs: fixed rates of one (policy, alpha, seed), then
    optionally the max-RPS walk (whose runs at those rates are not repeated)."""

    cluster: str
    policy: str
    alpha: float
    seed: int
    rates: tuple[float, ...]
    keep: tuple[float, ...]  # rates whose measured requests and device timeline come back
    sweep: tuple[float, ...]  # the walk's grid (empty: no walk)
    stride: int
    warmup: float
    duration: float
    slo_ttft: float
    target: float


class Runner:
    """Runs (policy, alpha, rps) of one seed once and remembers the measured requests."""

    def __init__(self, cluster: str, warmup: float, duration: float, seed: int) -> None:
        self.spec = load_cluster(cluster)
        self.config = policy_config(self.spec, live_config())
        self.warmup, self.duration, self.seed = warmup, duration, seed
        self.cache: dict[tuple[str, float, float], pa.Table] = {}
        self.devices: dict[tuple[str, float, float], pa.Table] = {}

    def run(self, policy: str, alpha: float, rps: float) -> pa.Table:
        key = (policy, alpha, round(rps, 6))
        if key not in self.cache:
            names = list(self.spec.models)
            table = synthesize(names, alpha, rps, self.warmup + self.duration, seed=self.seed)
            pol = build_policy(policy, self.spec, self.config)
            t0 = time.perf_counter()
            res = Simulator(self.spec, pol, table, self.config).run()
            m = request_metrics(measured(res.requests, self.warmup))
            click.echo(
                f"{policy:22s} alpha {alpha:g} seed {self.seed} {rps:5.1f} RPS: p99 "
                f"{m['ttft_p99']:8.3f} s, <100ms {m['under_100ms']:6.1%} "
                f"({time.perf_counter() - t0:.1f} s)",
                err=True,
            )
            self.cache[key] = measured(res.requests, self.warmup)
            self.devices[key] = res.devices
        return self.cache[key]


def work(task: Task) -> dict:
    """Run ``task`` (in a worker process): rows of its fixed rates, its walk's answer and the
    attainment of every rate the walk tried, and the tables of the ``keep`` rates."""
    runner = Runner(task.cluster, task.warmup, task.duration, task.seed)
    rows = {rps: row(runner.run(task.policy, task.alpha, rps), task.slo_ttft) for rps in task.rates}
    tried: dict[str, float] = {}

    def serves(rps: float) -> bool:
        m = request_metrics(runner.run(task.policy, task.alpha, rps), task.slo_ttft)
        tried[f"{rps:g}"] = m["slo_attainment"]
        return m["slo_attainment"] >= task.target

    best = max_rps(serves, task.sweep, task.stride) if task.sweep else None
    key = (task.policy, task.alpha)
    tables = {rps: (runner.run(*key, rps), runner.devices[(*key, rps)]) for rps in task.keep}
    failed = sorted(float(r) for r, a in tried.items() if a < task.target and best is not None)
    first = failed[0] if failed and task.policy == "warmserve" else None
    missed = missed_by_model(runner.run(*key, first), task.slo_ttft) if first else None
    return {
        "task": task,
        "rows": rows,
        "max_rps": best,
        "tried": tried,
        "tables": tables,
        "first_failure": {"rps": first, "missed_by_model": missed} if first else None,
    }


def missed(table: pa.Table, slo_ttft: float) -> np.ndarray:
    """Per request: no first token within ``slo_ttft`` (dropped ones included)."""
    ttft = table.column("ttft").to_numpy(zero_copy_only=False).astype(float)
    ok = np.asarray(table.column("status").to_pylist(), dtype=object) == "ok"
    return ~(ok & (np.nan_to_num(ttft, nan=np.inf) <= slo_ttft + 1e-9))


def missed_by_model(table: pa.Table, slo_ttft: float) -> dict[str, int]:
    """Requests per model without a first token within ``slo_ttft`` (dropped ones included)."""
    bad = missed(table, slo_ttft)
    models = np.asarray(table.column("model").to_pylist(), dtype=object)
    names, counts = np.unique(models[bad], return_counts=True)
    return {str(n): int(c) for n, c in sorted(zip(names, counts, strict=True), key=lambda x: -x[1])}


def over_capacity(cluster: str, alpha: float, rps: float, seed: int, warmup: float,
                  duration: float) -> float:  # fmt: skip
    """Fraction of the measured arrivals at which serving every request in flight at once
    needs more devices than the cluster has (``warmserve.sim.sweep.gpus_needed``)."""
    spec = load_cluster(cluster)
    cap = policy_config(spec, live_config()).instance_capacity
    table = synthesize(list(spec.models), alpha, rps, warmup + duration, seed=seed)
    return float((gpus_needed(table, spec, cap, warmup) > spec.device_count).mean())


def row(table: pa.Table, slo_ttft: float) -> dict:
    m = request_metrics(table, slo_ttft)
    keys = ("requests", "ok", "ttft_p50", "ttft_p95", "ttft_p99", "under_100ms", "slo_attainment")
    return {k: m[k] for k in keys}


def fmt(v: float, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def markdown(doc: dict) -> str:
    lines = [
        "# Paper table on the simulator",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Cluster `{doc['cluster']}`; each run: {doc['warmup']:g} s warm-up (not measured) + "
        f"{doc['duration']:g} s measured; SLO: TTFT <= {doc['slo_ttft']:g} s for "
        f"{doc['target']:.0%} of requests.",
        "",
        "## TTFT by policy, popularity and rate",
        "",
        "| alpha | RPS | policy | P95 TTFT (s) | P99 TTFT (s) | TTFT < 100 ms | within SLO |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["grid"]:
        lines.append(
            f"| {r['alpha']:g} | {r['rps']:g} | {r['policy']} | {fmt(r['ttft_p95'])} | "
            f"{fmt(r['ttft_p99'])} | {fmt(r['under_100ms'], True)} | "
            f"{fmt(r['slo_attainment'], True)} |"
        )
    seeds = doc["seeds"]
    lines += ["", "## Largest RPS within the SLO", ""]
    lines += [
        f"Per workload seed: the last rate passed on a walk up the grid {doc['sweep']['grid']} "
        "(every rate tried up to the answer passed: the grid's every stride-th rate, then every "
        "rate between the last of those that passed and the first that failed); the median "
        "over the seeds.",
        "",
        "| alpha | policy | " + " | ".join(f"seed {k}" for k in seeds) + " | median |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    for alpha, by in doc["max_rps"].items():
        for policy, v in by.items():
            per = " | ".join(f"{v['by_seed'][str(k)]:g}" for k in seeds)
            lines.append(f"| {alpha} | {policy} | {per} | {v['median']:g} |")
    lines += [
        "",
        "Where warmserve fails first (per seed: the lowest failing rate above its max), requests "
        "without a first token within the SLO, by model; and the share of measured arrivals at "
        "which serving every request in flight at once (one instance of the engine's capacity "
        "per TP group) needs more GPUs than the cluster has:",
        "",
    ]
    for alpha, by_seed in doc["limits"].items():
        ws = doc["max_rps"][alpha]["warmserve"]
        for seed, lim in by_seed.items():
            ff = ws.get("first_failure", {}).get(seed)
            miss = ", ".join(f"{m} {n}" for m, n in ff["missed_by_model"].items()) if ff else "-"
            over = "; ".join(
                f"{label} ({v['rps']:g} RPS): {v['arrivals_over_capacity']:.2%}"
                for label, v in lim.items()
            )
            at = f" at {ff['rps']:g} RPS" if ff else ""
            lines.append(f"- alpha {alpha}, seed {seed}: missed{at}: {miss}. Over capacity: {over}")
    lines += _ablation_table("## Ablations (15 RPS, alpha 0.5)", doc["ablations"], slo=False)
    sc = doc["ablations_scarce"]
    title = (
        f"## Ablations, memory-scarce (`{sc['cluster']}`, {sc['rps']:g} RPS, alpha {sc['alpha']:g})"
    )
    lines += _ablation_table(title, sc["rows"], slo=True)
    lines += ["", "## Targets", ""]
    for k, v in doc["targets"].items():
        lines.append(f"- {k}: {v}")
    if doc.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def _ablation_table(title: str, rows: dict, *, slo: bool) -> list[str]:
    """Markdown lines of one ablation table beside the paper's figures."""
    head = "| policy | TTFT < 100 ms | paper | P99 TTFT (s) |" + (" within SLO |" if slo else "")
    lines = ["", title, "", head, "|---" * (5 if slo else 4) + "|"]
    for policy, r in rows.items():
        paper = PAPER_UNDER_100MS.get(policy)
        cells = [
            policy,
            fmt(r["under_100ms"], True),
            fmt(paper, True) if paper is not None else "-",
            fmt(r["ttft_p99"]),
        ]
        if slo:
            cells.append(fmt(r["slo_attainment"], True))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def rewrite_markdown(out: str, notes: str | None) -> None:
    """Rewrite ``out``.md from ``out``.json, with the notes of the file ``notes`` (one per
    paragraph) stored in the JSON: notes on a run are written once its numbers are known."""
    with open(f"{out}.json") as f:
        doc = json.load(f)
    if notes:
        with open(notes) as f:
            doc["notes"] = [" ".join(p.split()) for p in f.read().split("\n\n") if p.strip()]
        with open(f"{out}.json", "w") as f:
            json.dump(doc, f, indent=1)
    with open(f"{out}.md", "w") as f:
        f.write(markdown(doc))


@click.command()
@click.option("--cluster", default="clusters/paper.yaml", show_default=True)
@click.option("--rates", default="5,10,15,20,25", show_default=True)
@click.option("--alphas", default="0.5,2", show_default=True)
@click.option("--warmup", default=3600.0, show_default=True)
@click.option("--duration", default=3600.0, show_default=True)
@click.option("--slo-ttft", default=1.0, show_default=True)
@click.option("--target", default=0.95, show_default=True)
@click.option("--sweep-lo", default=5.0, show_default=True, help="The paper's lowest rate.")
@click.option("--sweep-hi", default=96.0, show_default=True)
@click.option("--sweep-step", default=1.0, show_default=True, help="RPS between grid rates.")
@click.option("--sweep-stride", default=5, show_default=True, help="Walk every N-th rate first.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Workload seeds; see below.")
@click.option("--jobs", default=2, show_default=True, help="Worker processes.")
@click.option("--out", default="bench/results/paper_table", show_default=True)
@click.option("--markdown-only", is_flag=True, help="Only rewrite OUT.md from OUT.json.")
@click.option("--notes", type=click.Path(exists=True, dir_okay=False), help="With --markdown-only.")
def main(
    cluster: str,
    rates: str,
    alphas: str,
    warmup: float,
    duration: float,
    slo_ttft: float,
    target: float,
    sweep_lo: float,
    sweep_hi: float,
    sweep_step: float,
    sweep_stride: int,
    seeds: str,
    jobs: int,
    out: str,
    markdown_only: bool,
    notes: str | None,
) -> None:
    """Seeds: the first one's workloads make the TTFT grid and the ablations; every seed gets
    its own max-RPS walk."""
    if markdown_only:
        rewrite_markdown(out, notes)
        return
    t0 = time.perf_counter()
    rate_list = [float(x) for x in rates.split(",")]
    alpha_list = [float(x) for x in alphas.split(",")]
    seed_list = [int(x) for x in seeds.split(",")]
    if ABLATION_AT[0] not in alpha_list:
        raise click.UsageError(f"--alphas must include {ABLATION_AT[0]:g} (the ablations')")
    grid_rates = rate_grid(sweep_lo, sweep_hi, sweep_step)
    first = seed_list[0]
    common = dict(
        cluster=cluster,
        stride=sweep_stride,
        warmup=warmup,
        duration=duration,
        slo_ttft=slo_ttft,
        target=target,
    )
    tasks = []
    for policy, alpha, seed in itertools.product(MAIN, alpha_list, seed_list):
        fixed = tuple(rate_list) if seed == first else ()
        at = alpha == ABLATION_AT[0] and seed == first
        if at and ABLATION_AT[1] not in fixed:
            fixed += (ABLATION_AT[1],)
        keep = (ABLATION_AT[1],) if at else ()
        tasks.append(Task(policy=policy, alpha=alpha, seed=seed, rates=fixed, keep=keep,
                          sweep=tuple(grid_rates), **common))  # fmt: skip
    for policy in ABLATIONS[1:]:
        tasks.append(Task(policy=policy, alpha=ABLATION_AT[0], seed=first, rates=(ABLATION_AT[1],),
                          keep=(ABLATION_AT[1],), sweep=(), **common))  # fmt: skip
    scarce = {**common, "cluster": SCARCE[0]}
    for policy in ABLATIONS:
        tasks.append(Task(policy=policy, alpha=SCARCE[1], seed=first, rates=(SCARCE[2],), keep=(),
                          sweep=(), **scarce))  # fmt: skip
    # warmserve's runs cost ten times share's: start the dearest first.
    tasks.sort(key=lambda t: (not t.sweep, t.policy != "warmserve", -t.alpha))
    results = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for fut in as_completed([pool.submit(work, t) for t in tasks]):
            res = fut.result()
            t = res["task"]
            results.append(res)
            click.echo(
                f"done: {t.policy} alpha {t.alpha:g} seed {t.seed}: max {res['max_rps']} RPS "
                f"({time.perf_counter() - t0:.0f} s)",
                err=True,
            )
    rows: dict[tuple[str, float, float], dict] = {}
    scarce_rows: dict[str, dict] = {}
    tables: dict[str, tuple[pa.Table, pa.Table]] = {}
    best: dict[str, dict[str, dict]] = {f"{a:g}": {} for a in alpha_list}
    for res in results:
        t = res["task"]
        if t.cluster == SCARCE[0]:
            scarce_rows[t.policy] = res["rows"][SCARCE[2]]
            continue
        for rps, r in res["rows"].items():
            rows[(t.policy, t.alpha, rps)] = r
        for pair in res["tables"].values():  # only ABLATION_AT's
            tables[t.policy] = pair
        if res["max_rps"] is not None:
            b = best[f"{t.alpha:g}"].setdefault(t.policy, {"by_seed": {}, "attainment": {}})
            b["by_seed"][str(t.seed)] = res["max_rps"]
            b["attainment"][str(t.seed)] = res["tried"]
            if res["first_failure"]:
                b.setdefault("first_failure", {})[str(t.seed)] = res["first_failure"]
    for by in best.values():
        for policy in list(by):
            b = by.pop(policy)
            b["by_seed"] = {str(k): b["by_seed"][str(k)] for k in seed_list}
            b["median"] = median_rps(list(b["by_seed"].values()))
            by[policy] = b
        by.update({p: by.pop(p) for p in MAIN})  # the order of MAIN
    grid = [
        {"alpha": alpha, "rps": rps, "policy": policy} | rows[(policy, alpha, rps)]
        for alpha in alpha_list
        for rps in rate_list
        for policy in MAIN
    ]
    # How far any one-instance-per-device policy could go: at 2.5x share's rate, and at
    # warmserve's own limit and first failure, per seed.
    limits: dict[str, dict] = {}
    for alpha, b in best.items():
        at = {"2.5x share": 2.5 * b["share"]["median"]}
        lim = limits[alpha] = {}
        for seed in seed_list:
            k = str(seed)
            rates = {**at, "warmserve max": b["warmserve"]["by_seed"][k]}
            ff = b["warmserve"].get("first_failure", {}).get(k)
            if ff:
                rates["warmserve first failure"] = ff["rps"]
            lim[k] = {
                label: {
                    "rps": r,
                    "arrivals_over_capacity": over_capacity(
                        cluster, float(alpha), r, seed, warmup, duration
                    ),
                }
                for label, r in rates.items()
                if r > 0
            }
    ablations = {p: rows[(p, *ABLATION_AT)] for p in ABLATIONS}
    ablations_scarce = {p: scarce_rows[p] for p in ABLATIONS}
    ws, auto = rows[("warmserve", *ABLATION_AT)], rows[("autoscale", *ABLATION_AT)]
    targets = {
        "P99 TTFT autoscale / warmserve at 15 RPS, alpha 0.5 (target >= 50)": (
            f"{auto['ttft_p99'] / ws['ttft_p99']:.2f}x"
        )
    }
    for alpha, b in best.items():
        share = b["share"]["median"]
        ratio = b["warmserve"]["median"] / share if share else float("inf")
        per = [
            f"{b['warmserve']['by_seed'][k] / b['share']['by_seed'][k]:.2f}x"
            if b["share"]["by_seed"][k]
            else "inf"
            for k in b["share"]["by_seed"]
        ]
        targets[f"max RPS warmserve / share, alpha {alpha} (target >= 2.5)"] = (
            f"{ratio:.2f}x (medians; per seed {', '.join(per)})"
        )
    for label, by in (("", ablations), (" (memory-scarce)", ablations_scarce)):
        order = [by[p]["under_100ms"] for p in PAPER_UNDER_100MS]
        targets[
            f"ablations ordered full > noproactive > noplacement > noprewarm{label}, seed "
            f"{first} (every seed: bench/ablation_seeds.py)"
        ] = str(all(a > b for a, b in itertools.pairwise(order)))
    doc = {
        "command": "python " + " ".join(sys.argv),
        "git_head": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "cluster": cluster,
        "warmup": warmup,
        "duration": duration,
        "slo_ttft": slo_ttft,
        "target": target,
        "seeds": seed_list,
        "sweep": {
            "grid": f"{sweep_lo:g}, {grid_rates[1]:g}, ... {grid_rates[-1]:g} RPS, "
            f"stride {sweep_stride}",
            "lo": sweep_lo,
            "hi": sweep_hi,
            "step": sweep_step,
            "stride": sweep_stride,
        },
        "grid": grid,
        "ablations": ablations,
        "ablations_scarce": {
            "cluster": SCARCE[0],
            "alpha": SCARCE[1],
            "rps": SCARCE[2],
            "rows": ablations_scarce,
        },
        "max_rps": best,
        "limits": limits,
        "targets": targets,
        "jobs": jobs,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(f"{out}.json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(f"{out}.md", "w") as f:
        f.write(markdown(doc))
    cdf = {p: tables[p][0] for p in (*MAIN, *ABLATIONS[1:])}
    ttft_cdf(cdf, f"{out}_ttft_cdf.png", slo_ttft=0.1)
    alpha, rps = ABLATION_AT
    for policy in MAIN:
        title = f"{policy}, {rps:g} RPS, alpha {alpha:g}"
        device_modes(tables[policy][1], f"{out}_devices_{policy}.png", title)
    click.echo(markdown(doc))


if __name__ == "__main__":
    main()
