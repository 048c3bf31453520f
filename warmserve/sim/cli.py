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
from warmserve.sim.policies import build_policy, policy_config
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
@click.option("--workload", type=click.Path(dir_okay=False), help="Workload Parquet file.")
@click.option("--cluster", type=click.Path(dir_okay=False), help="Cluster YAML file.")
@click.option("--policy", help="Policy name (warmserve, autoscale, share, ablations).")
@click.option("--registry", type=click.Path(dir_okay=False), help="Models, if not in the cluster.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Result Parquet file.")
@click.option("--seed", default=0, show_default=True, help="Recorded in the result metadata.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def command(
    ctx: click.Context,
    workload: str | None,
    cluster: str | None,
    policy: str | None,
    registry: str | None,
    out_path: str | None,
    seed: int,
    progress: bool,
) -> None:
    """Replay WORKLOAD on CLUSTER under POLICY; write one row per request to OUT and the device
    timeline beside it (OUT with .devices before the extension)."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [
        f"--{n}"
        for n, v in (("workload", workload), ("cluster", cluster), ("policy", policy))
        if not v
    ] + (["--out"] if not out_path else [])
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)}")
    assert workload and cluster and policy and out_path
    try:
        spec = load_cluster(cluster, registry)
        spec.check()
        table = read_table(workload)
        check_workload(table, spec.models)
        config = policy_config(spec)
        pol = build_policy(policy, spec, config)
    except (SimInputError, KeyError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    result = Simulator(spec, pol, table, config, progress=progress).run()
    meta = {
        "policy": policy,
        "cluster": os.path.abspath(cluster),
        "workload": os.path.abspath(workload),
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
