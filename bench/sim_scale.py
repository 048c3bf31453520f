"""The simulator at scale: 1,024 GPUs, 256 models, 24 h at 100 RPS (about 8.6 M requests).

Synthesizes the workload (warmserve.traces.synth, BurstGPT-shaped rates, Azure conv tokens),
runs one policy through the simulator, and records wall time, events per second and peak memory
(ru_maxrss of this process, which includes the workload and the result tables).

    python bench/sim_scale.py [--policy warmserve] [--hours 24] [--rps 100]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import click

from warmserve.sim.cluster import load_cluster
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import build_policy, live_config, policy_config
from warmserve.traces.synth import synthesize


@click.command()
@click.option("--cluster", default="clusters/scale.yaml", show_default=True)
@click.option("--policy", default="warmserve", show_default=True)
@click.option("--hours", default=24.0, show_default=True)
@click.option("--rps", default=100.0, show_default=True)
@click.option("--alpha", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--check/--no-check", default=False, show_default=True, help="Ledger-check actions.")
@click.option("--out", default="bench/results/sim_scale.json", show_default=True)
def main(
    cluster: str,
    policy: str,
    hours: float,
    rps: float,
    alpha: float,
    seed: int,
    check: bool,
    out: str,
) -> None:
    spec = load_cluster(cluster)
    t0 = time.perf_counter()
    workload = synthesize(list(spec.models), alpha, rps, hours * 3600.0, seed=seed)
    synth_s = time.perf_counter() - t0
    config = policy_config(spec, live_config())
    pol = build_policy(policy, spec, config)
    sim = Simulator(spec, pol, workload, config, progress=True, check_actions=check)
    t1 = time.perf_counter()
    result = sim.run()
    run_s = time.perf_counter() - t1
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = result.stats
    doc = {
        "command": "python " + " ".join(sys.argv),
        "git_head": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "cluster": cluster,
        "devices": spec.device_count,
        "models": len(spec.models),
        "policy": policy,
        "hours": hours,
        "rps": rps,
        "alpha": alpha,
        "requests": s["requests"],
        "ok": s["ok"],
        "dropped": s["dropped"],
        "events": s["events"],
        "policy_calls": s["policy_calls"],
        "check_actions": check,
        "policy_s": s["policy_s"],
        "simulator_s": round(run_s - s["policy_s"], 1),
        "simulator_events_per_s": round(s["events"] / max(run_s - s["policy_s"], 1e-9)),
        "device_timeline_rows": result.devices.num_rows,
        "synthesize_s": round(synth_s, 1),
        "simulate_s": round(run_s, 1),
        "events_per_s": round(s["events"] / run_s),
        "requests_per_s": round(s["requests"] / run_s),
        "peak_rss_mib": round(peak_mib),
        "target_s": 600,
        "met": run_s + synth_s < 600,
    }
    click.echo(json.dumps(doc, indent=1))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
