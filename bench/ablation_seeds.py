"""The paper table's ablations on every workload seed, not only the first one.

``bench/paper_table.py`` runs the ablations on seed 0's workloads; where two switches differ by a
few requests in thousands, one seed cannot say which is better. This runs each ablation of
``paper_table.ABLATIONS`` at the same settings (paper.yaml at ``ABLATION_AT``, and the
memory-scarce cluster at ``SCARCE``) for every seed, and reports per seed and the median: TTFT
under 100 ms (the paper's measure) and SLO attainment, and whether the paper's order holds on the
medians and on every seed; and per run, the requests (and those that missed the SLO) by the
tier their instance started from (``none``: dropped before any instance took them), which shows
what each switch changes. Writes ``bench/results/ablation_seeds.json``.

    python bench/ablation_seeds.py [--seeds 0,1,2] [--jobs 2]
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import click
import numpy as np
from paper_table import ABLATION_AT, ABLATIONS, PAPER_UNDER_100MS, SCARCE, Runner, missed, row

SETTINGS = {
    "paper": ("clusters/paper.yaml", *ABLATION_AT),
    "scarce": SCARCE,
}


def run(task: tuple[str, str, int, float, float, float]) -> tuple[str, str, int, dict]:
    """One (setting, policy, seed): the measured hour's row of the paper table."""
    setting, policy, seed, warmup, duration, slo = task
    cluster, alpha, rps = SETTINGS[setting]
    table = Runner(cluster, warmup, duration, seed).run(policy, alpha, rps)
    tier = np.asarray(table.column("tier").to_pylist(), dtype=object)
    bad = missed(table, slo)
    by_tier = {}
    for t in sorted(set(tier.tolist())):
        mine = tier == t
        by_tier[str(t) or "none"] = {"requests": int(mine.sum()), "missed": int((bad & mine).sum())}
    return setting, policy, seed, row(table, slo) | {"by_start_tier": by_tier}


def ordered(values: list[float]) -> bool:
    """Strictly falling, as the paper's full > noproactive > noplacement > noprewarm."""
    return all(a > b for a, b in itertools.pairwise(values))


@click.command()
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--warmup", default=3600.0, show_default=True)
@click.option("--duration", default=3600.0, show_default=True)
@click.option("--slo-ttft", default=1.0, show_default=True)
@click.option("--jobs", default=2, show_default=True, help="Worker processes.")
@click.option("--out", default="bench/results/ablation_seeds.json", show_default=True)
def main(seeds: str, warmup: float, duration: float, slo_ttft: float, jobs: int, out: str) -> None:
    t0 = time.perf_counter()
    seed_list = [int(s) for s in seeds.split(",")]
    tasks = [
        (setting, policy, seed, warmup, duration, slo_ttft)
        for setting in SETTINGS
        for policy in ABLATIONS
        for seed in seed_list
    ]
    tasks.sort(key=lambda t: t[0] != "scarce")  # the scarce cluster's runs are the long ones
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        done = list(pool.map(run, tasks))
    results: dict[str, dict] = {}
    for setting, policy, seed, r in done:
        by = results.setdefault(setting, {}).setdefault(policy, {"by_seed": {}})
        by["by_seed"][str(seed)] = r
    summary: dict[str, dict] = {}
    paper = list(PAPER_UNDER_100MS)  # the policies in the paper's order
    for setting in list(results):
        by_policy = results[setting] = {p: results[setting][p] for p in ABLATIONS}
        for b in by_policy.values():
            for key in ("under_100ms", "slo_attainment"):
                values = [b["by_seed"][str(s)][key] for s in seed_list]
                b[f"median_{key}"] = statistics.median(values)
        summary[setting] = {
            "ordered_on_medians": ordered([by_policy[p]["median_under_100ms"] for p in paper]),
            "ordered_on_seeds": {
                str(s): ordered([by_policy[p]["by_seed"][str(s)]["under_100ms"] for p in paper])
                for s in seed_list
            },
        }
    doc = {
        "command": "python " + " ".join(sys.argv),
        "git_head": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "settings": {k: {"cluster": c, "alpha": a, "rps": r} for k, (c, a, r) in SETTINGS.items()},
        "seeds": seed_list,
        "warmup": warmup,
        "duration": duration,
        "slo_ttft": slo_ttft,
        "paper_under_100ms": PAPER_UNDER_100MS,
        "order": "under 100 ms: " + " > ".join(PAPER_UNDER_100MS),
        "summary": summary,
        "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    for setting, s in summary.items():
        meds = {p: f"{results[setting][p]['median_under_100ms']:.2%}" for p in ABLATIONS}
        click.echo(f"{setting}: {meds} ordered on medians {s['ordered_on_medians']}")


if __name__ == "__main__":
    main()
