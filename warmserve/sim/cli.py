"""``warmserve simulate``: replay a workload against a simulated cluster under a named policy.

Input problems (a model too big for the devices, a workload naming unknown models, negative or
unsorted times, an unknown policy) are usage errors: exit status 2, before any event runs.
"""

from __future__ import annotations

import json
import os

import click
import pyarrow as pa
import pyarrow.parquet as pq

from warmserve.report.schema import devices_path
from warmserve.sim.cluster import SimInputError, check_workload, load_cluster
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import build_policy, live_config, policy_config
from warmserve.sim.recipe import load_recipe
from warmserve.traces.schema import TraceError, read_workload


def read_table(path: str) -> pa.Table:
    """A workload in the traces schema, validated by the traces package's reader."""
    try:
        return read_workload(path)
    except TraceError as e:
        raise SimInputError(str(e)) from None


def write_atomic(table: pa.Table, path: str) -> None:
    """Write through a temporary file, so a crash never leaves half a result file."""
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def with_metadata(table: pa.Table, meta: dict[str, str]) -> pa.Table:
    return table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})


@click.group("simulate", invoke_without_command=True)
@click.option(
    "--workload",
    type=click.Path(dir_okay=False),
    help="Workload Parquet file [default: made by the cluster file's workload recipe].",
)
@click.option("--cluster", type=click.Path(dir_okay=False), help="Cluster YAML file.")
@click.option("--policy", help="Policy name (warmserve, autoscale, share, ablations).")
@click.option("--registry", type=click.Path(dir_okay=False), help="Models, if not in the cluster.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Result Parquet file.")
@click.option(
    "--rate",
    default=None,
    help="Without --workload: a rate the recipe names (low, high) or requests/s.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="The recipe's workload seed (without --workload); recorded in the result metadata.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def command(
    ctx: click.Context,
    workload: str | None,
    cluster: str | None,
    policy: str | None,
    registry: str | None,
    out_path: str | None,
    rate: str | None,
    seed: int,
    progress: bool,
) -> None:
    """Replay WORKLOAD on CLUSTER under POLICY; write one row per request to OUT and the device
    timeline beside it (OUT with .devices before the extension). Without WORKLOAD, the cluster
    file's workload recipe (``warmserve.sim.recipe``) makes one at RATE with SEED."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [
        f"--{n}" for n, v in (("cluster", cluster), ("policy", policy), ("out", out_path)) if not v
    ]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)}")
    if workload and rate is not None:
        raise click.UsageError("--rate makes a workload from the recipe: give it or --workload")
    assert cluster and policy and out_path
    try:
        spec = load_cluster(cluster, registry)
        spec.check()
        if workload:
            table = read_table(workload)
        else:
            recipe = load_recipe(cluster)
            if recipe is None:
                raise SimInputError(f"{cluster}: no workload recipe; give --workload")
            if rate is None:
                raise SimInputError(f"give --rate: one of {', '.join(recipe.rates)} or requests/s")
            table = recipe.workload(list(spec.models), rate, seed)
        check_workload(table, spec.models)
        config = policy_config(spec, live_config())
        pol = build_policy(policy, spec, config)
    except (SimInputError, KeyError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    result = Simulator(spec, pol, table, config, progress=progress).run()
    meta = {
        "policy": policy,
        "cluster": os.path.abspath(cluster),
        "workload": os.path.abspath(workload) if workload else f"recipe, rate {rate}",
        "seed": str(seed),
        "stats": json.dumps(result.stats),
    }
    write_atomic(with_metadata(result.requests, meta), out_path)
    write_atomic(with_metadata(result.devices, meta), devices_path(out_path))
    s = result.stats
    click.echo(
        f"{s['requests']} requests: {s['ok']} ok, {s['dropped']} dropped; {s['events']} events, "
        f"{s['policy_calls']} policy calls; results in {out_path}"
    )


@command.command("sweep")
@click.option("--cluster", required=True, type=click.Path(dir_okay=False))
@click.option("--policy", "policies", required=True, multiple=True, help="Repeat for several.")
@click.option("--registry", type=click.Path(dir_okay=False))
@click.option("--alpha", default=0.5, show_default=True, help="Zipf popularity exponent.")
@click.option("--duration", default=3600.0, show_default=True, help="Measured seconds.")
@click.option("--warmup", default=3600.0, show_default=True, help="Unmeasured seconds first.")
@click.option("--slo-ttft", default=1.0, show_default=True, help="TTFT SLO in seconds.")
@click.option("--target", default=0.95, show_default=True, help="Fraction within the SLO.")
@click.option("--lo", default=1.0, show_default=True, help="Lowest rate of the grid.")
@click.option("--hi", default=64.0, show_default=True, help="Highest rate of the grid.")
@click.option("--step", default=1.0, show_default=True, help="RPS between grid rates.")
@click.option("--stride", default=1, show_default=True, help="Walk every N-th rate first.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Workload seeds, one walk each.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON of the results.")
def sweep(
    cluster: str,
    policies: tuple[str, ...],
    registry: str | None,
    alpha: float,
    duration: float,
    warmup: float,
    slo_ttft: float,
    target: float,
    lo: float,
    hi: float,
    step: float,
    stride: int,
    seeds: str,
    out_path: str | None,
) -> None:
    """The largest RPS each policy serves with TARGET of requests within the TTFT SLO, on
    workloads synthesized from real traces (``warmserve.traces.synth``): per seed, the last
    rate of the grid passed on a walk upward that stops at the first failure
    (``warmserve.sim.sweep.max_rps``), and the median over the seeds."""
    from warmserve.sim.sweep import attainment, max_rps, median_rps, rate_grid
    from warmserve.traces.synth import synthesize

    try:
        spec = load_cluster(cluster, registry)
        spec.check()
        config = policy_config(spec, live_config())
        for name in policies:
            build_policy(name, spec, config)
        rates = rate_grid(lo, hi, step)
        seed_list = [int(s) for s in seeds.split(",")]
    except (SimInputError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    names = list(spec.models)
    found: dict[str, dict] = {}
    for name in policies:
        by_seed: dict[str, float] = {}
        tried: dict[str, dict[str, float]] = {}
        for seed in seed_list:
            got = tried[str(seed)] = {}

            def serves(rps: float, name: str = name, seed: int = seed, got=got) -> bool:
                table = synthesize(names, alpha, rps, warmup + duration, seed=seed)
                run = Simulator(spec, build_policy(name, spec, config), table, config).run()
                got[f"{rps:g}"] = attainment(run.requests, slo_ttft, warmup)
                click.echo(
                    f"{name} seed {seed} at {rps:g} RPS: {got[f'{rps:g}']:.1%} within "
                    f"{slo_ttft:g} s"
                )
                return got[f"{rps:g}"] >= target

            by_seed[str(seed)] = max_rps(serves, rates, stride)
        found[name] = {
            "max_rps": median_rps(list(by_seed.values())),
            "max_rps_by_seed": by_seed,
            "attainment_by_rps": tried,
        }
        click.echo(f"{name}: max {found[name]['max_rps']:g} RPS (median; by seed {by_seed})")
    if out_path:
        doc = {
            "command": " ".join(
                ["warmserve simulate sweep", f"--cluster {cluster}"]
                + [f"--policy {p}" for p in policies]
                + [f"--registry {registry}"] * bool(registry)
                + [f"--alpha {alpha:g} --duration {duration:g} --warmup {warmup:g}"]
                + [f"--slo-ttft {slo_ttft:g} --target {target:g} --lo {lo:g} --hi {hi:g}"]
                + [f"--step {step:g} --stride {stride} --seeds {seeds} --out {out_path}"]
            ),
            "cluster": cluster,
            "alpha": alpha,
            "slo_ttft": slo_ttft,
            "target": target,
            "duration": duration,
            "warmup": warmup,
            "grid": {"lo": lo, "hi": hi, "step": step, "stride": stride},
            "seeds": seed_list,
            "policies": found,
        }
        with open(out_path, "w") as f:
            json.dump(doc, f, indent=1)
