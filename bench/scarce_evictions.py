"""Why full warmserve trails no-proactive on the memory-scarce cluster: whose evictions come
before the starts that had to load weights from host memory.

Runs warmserve and warmserve-noproactive at ``paper_table.SCARCE`` (seed 0 by default) and
records every Evict action with its source (``plan``, the tick: proactive prewarming and the
autoscaler; ``on_demand``, a request that found no room) and every instance start with its tier.
For each start from host memory in the measured hour (an engine start of tens of seconds) it
asks whether the model's weights had been evicted from a device in the ``--lookback`` seconds
before, and by which source. Writes ``bench/results/scarce_evictions.json``.

    python bench/scarce_evictions.py [--seed 0] [--lookback 600]
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import click
from paper_table import SCARCE

from warmserve.policy.state import Evict, Tier
from warmserve.sim.cluster import load_cluster
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import build_policy, live_config, policy_config
from warmserve.sim.state import SimCluster
from warmserve.traces.synth import synthesize

POLICIES = ("warmserve", "warmserve-noproactive")


def trace(policy_name: str, seed: int, warmup: float, duration: float, lookback: float) -> dict:
    """Run one policy with its Evict actions and the cluster's starts recorded."""
    cluster, alpha, rps = SCARCE
    spec = load_cluster(cluster)
    config = policy_config(spec, live_config())
    table = synthesize(list(spec.models), alpha, rps, warmup + duration, seed=seed)
    policy = build_policy(policy_name, spec, config)
    evicted: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    starts: list[tuple[float, str, Tier]] = []

    def recording(name: str):
        call = getattr(policy, name)

        def wrapped(snapshot, *args):
            actions = call(snapshot, *args)
            for a in actions:
                if isinstance(a, Evict):
                    evicted[a.model].append((snapshot.time, name))
            return actions

        return wrapped

    policy.plan = recording("plan")
    policy.on_demand = recording("on_demand")
    start = SimCluster._start

    def recording_start(self, model, devices, t):
        starts.append((t, model, self.tier(model, devices)))
        return start(self, model, devices, t)

    SimCluster._start = recording_start
    try:
        Simulator(spec, policy, table, config).run()
    finally:
        SimCluster._start = start
    measured = [(t, m, tier) for t, m, tier in starts if t >= warmup]
    by_tier = collections.Counter(tier.name.lower() for _, _, tier in measured)
    cause = collections.Counter()
    for t, m, tier in measured:
        if tier != Tier.HOST:
            continue
        recent = {src for te, src in evicted[m] if t - lookback <= te <= t}
        cause["plan" if "plan" in recent else "on_demand" if recent else "not evicted"] += 1
    sources = collections.Counter(
        src for events in evicted.values() for te, src in events if te >= warmup
    )
    return {
        "starts_by_tier": dict(by_tier),
        "host_starts_by_earlier_eviction": dict(cause),
        "evictions_by_source": dict(sources),
    }


@click.command()
@click.option("--seed", default=0, show_default=True)
@click.option("--warmup", default=3600.0, show_default=True)
@click.option("--duration", default=3600.0, show_default=True)
@click.option("--lookback", default=600.0, show_default=True, help="Seconds before a start.")
@click.option("--out", default="bench/results/scarce_evictions.json", show_default=True)
def main(seed: int, warmup: float, duration: float, lookback: float, out: str) -> None:
    results = {p: trace(p, seed, warmup, duration, lookback) for p in POLICIES}
    doc = {
        "command": "python " + " ".join(sys.argv),
        "git_head": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "setting": {"cluster": SCARCE[0], "alpha": SCARCE[1], "rps": SCARCE[2], "seed": seed},
        "measured": [warmup, warmup + duration],
        "lookback_s": lookback,
        "results": results,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    click.echo(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
