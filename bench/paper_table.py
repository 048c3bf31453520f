"""The paper's table on the simulator: 2 nodes x 8 GPUs of 80 GB (clusters/paper.yaml).

Workloads are synthesized (warmserve.traces.synth: BurstGPT-shaped per-model rate curves,
Azure LLM conversation 2023 token counts) at Zipf popularity alpha 0.5 and 2 and 5 to 25 RPS.
Each run simulates a warm-up hour (the forecaster's first history; not measured) and a measured
hour. Writes bench/results/paper_table.json and .md and a TTFT CDF PNG:

- P95/P99 TTFT, fraction of requests with TTFT under 100 ms, per policy, alpha and rate;
- the ablations at 15 RPS, alpha 0.5;
- the largest RPS each policy serves with ``--target`` of requests within ``--slo-ttft``.

    python bench/paper_table.py [--rates 5,10,15,20,25] [--alphas 0.5,2]
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time

import click
import pyarrow as pa

from warmserve.report.metrics import request_metrics
from warmserve.report.plots import device_modes, ttft_cdf
from warmserve.sim.cluster import load_cluster
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import build_policy, live_config, policy_config
from warmserve.sim.sweep import max_rps, measured
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


class Runner:
    """Runs (policy, alpha, rps) once and remembers the measured requests."""

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
                f"{policy:22s} alpha {alpha:g} {rps:5.1f} RPS: p99 {m['ttft_p99']:8.3f} s, "
                f"<100ms {m['under_100ms']:6.1%} ({time.perf_counter() - t0:.1f} s)",
                err=True,
            )
            self.cache[key] = measured(res.requests, self.warmup)
            self.devices[key] = res.devices
        return self.cache[key]


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
    lines += ["", "## Largest RPS within the SLO", ""]
    lines += ["| alpha | policy | max RPS |", "|---|---|---|"]
    for alpha, by in doc["max_rps"].items():
        for policy, v in by.items():
            lines.append(f"| {alpha} | {policy} | {v:g} |")
    lines += [
        "",
        "## Ablations (15 RPS, alpha 0.5)",
        "",
        "| policy | TTFT < 100 ms | paper | P99 TTFT (s) |",
        "|---|---|---|---|",
    ]
    for policy, r in doc["ablations"].items():
        paper = PAPER_UNDER_100MS.get(policy)
        lines.append(
            f"| {policy} | {fmt(r['under_100ms'], True)} | "
            f"{fmt(paper, True) if paper is not None else '-'} | {fmt(r['ttft_p99'])} |"
        )
    lines += ["", "## Targets", ""]
    for k, v in doc["targets"].items():
        lines.append(f"- {k}: {v}")
    if doc.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


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
@click.option("--sweep-tol", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
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
    sweep_tol: float,
    seed: int,
    out: str,
    markdown_only: bool,
    notes: str | None,
) -> None:
    if markdown_only:
        rewrite_markdown(out, notes)
        return
    t0 = time.perf_counter()
    runner = Runner(cluster, warmup, duration, seed)
    rate_list = [float(x) for x in rates.split(",")]
    alpha_list = [float(x) for x in alphas.split(",")]
    grid = []
    for alpha in alpha_list:
        for rps in rate_list:
            for policy in MAIN:
                grid.append(
                    {"alpha": alpha, "rps": rps, "policy": policy}
                    | row(runner.run(policy, alpha, rps), slo_ttft)
                )
    ablations = {p: row(runner.run(p, 0.5, 15.0), slo_ttft) for p in ABLATIONS}
    best: dict[str, dict[str, float]] = {}
    for alpha in alpha_list:
        best[f"{alpha:g}"] = {}
        for policy in MAIN:

            def serves(rps: float, policy: str = policy, alpha: float = alpha) -> bool:
                m = request_metrics(runner.run(policy, alpha, rps), slo_ttft)
                return m["slo_attainment"] >= target

            best[f"{alpha:g}"][policy] = max_rps(serves, sweep_lo, sweep_hi, sweep_tol)
    by = {(r["alpha"], r["rps"], r["policy"]): r for r in grid}
    targets = {}
    if (0.5, 15.0, "warmserve") in by:
        ws, auto = by[(0.5, 15.0, "warmserve")], by[(0.5, 15.0, "autoscale")]
        ratio = auto["ttft_p99"] / ws["ttft_p99"]
        targets["P99 TTFT autoscale / warmserve at 15 RPS, alpha 0.5 (target >= 50)"] = (
            f"{ratio:.2f}x"
        )
    for alpha, b in best.items():
        share = b["share"]
        ratio = b["warmserve"] / share if share else float("inf")
        targets[f"max RPS warmserve / share, alpha {alpha} (target >= 2.5)"] = f"{ratio:.2f}x"
    order = [ablations[p]["under_100ms"] for p in PAPER_UNDER_100MS]
    targets["ablations ordered full > noproactive > noplacement > noprewarm"] = str(
        all(a > b for a, b in itertools.pairwise(order))
    )
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
        "seed": seed,
        "grid": grid,
        "ablations": ablations,
        "max_rps": best,
        "targets": targets,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(f"{out}.json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(f"{out}.md", "w") as f:
        f.write(markdown(doc))
    cdf = {p: runner.run(p, 0.5, 15.0) for p in (*MAIN, *ABLATIONS[1:])}
    ttft_cdf(cdf, f"{out}_ttft_cdf.png", slo_ttft=0.1)
    for policy in MAIN:
        title = f"{policy}, 15 RPS, alpha 0.5"
        device_modes(runner.devices[(policy, 0.5, 15.0)], f"{out}_devices_{policy}.png", title)
    click.echo(markdown(doc))


if __name__ == "__main__":
    main()
