"""A fingerprint of the simulator's outputs, to show a refactoring changes none of them.

Runs the paper table's settings (``bench/paper_table.py``: its workloads, its cluster files, its
policy configuration) at a shorter warm-up and measured span: on ``clusters/paper.yaml`` the main
policies and the ablations at the ablations' alpha and rate, the main policies at alpha 2 too; on
``clusters/paper-scarce.yaml`` the ablations and the main policies at its alpha and rate. For
each run it hashes every column of both result tables (the requests, the device timeline) value
by value, in row order, and the run's counters but the wall time. Writes
``bench/results/sim_fingerprint.json`` with the command and the git head; two runs of one tree
give the same hashes, so comparing the ``runs`` of two files shows whether a change moved any
request.

    python -m bench.sim_fingerprint [--warmup 1800] [--duration 1800] [--jobs 2]
    python -m bench.sim_fingerprint --baseline OLD.json   # the differences go in the output
    python -m bench.sim_fingerprint --compare OLD.json NEW.json
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import click
import pyarrow as pa

from bench.paper_table import ABLATION_AT, ABLATIONS, MAIN, SCARCE
from warmserve.sim.cluster import load_cluster
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import build_policy, live_config, policy_config
from warmserve.traces.synth import synthesize

PAPER = "clusters/paper.yaml"
SEED = 0


def runs() -> list[tuple[str, str, float, float]]:
    """(cluster, policy, alpha, rps) of every run, in a fixed order."""
    out = [(PAPER, p, *ABLATION_AT) for p in (*MAIN, *ABLATIONS[1:])]
    out += [(PAPER, p, 2.0, ABLATION_AT[1]) for p in MAIN]
    out += [(SCARCE[0], p, SCARCE[1], SCARCE[2]) for p in (*ABLATIONS, *MAIN[1:])]
    return out


def _key(cluster: str, policy: str, alpha: float, rps: float) -> str:
    return f"{cluster} {policy} alpha {alpha:g} {rps:g} RPS"


def _value(v):
    """A value as JSON writes it the same way every time (floats by repr, NaN by name)."""
    if isinstance(v, float):
        return repr(v) if not math.isnan(v) else "nan"
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def column_hash(column: pa.ChunkedArray | pa.Array) -> str:
    data = json.dumps([_value(v) for v in column.to_pylist()], separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def table_hashes(table: pa.Table) -> dict:
    return {
        "rows": table.num_rows,
        "columns": {name: column_hash(table.column(name)) for name in table.column_names},
    }


def run_one(args: tuple[str, str, float, float, float, float]) -> dict:
    cluster, policy, alpha, rps, warmup, duration = args
    spec = load_cluster(cluster)
    config = policy_config(spec, live_config())
    workload = synthesize(list(spec.models), alpha, rps, warmup + duration, seed=SEED)
    t0 = time.perf_counter()
    res = Simulator(spec, build_policy(policy, spec, config), workload, config).run()
    stats = {k: v for k, v in res.stats.items() if k != "policy_s"}
    key = _key(cluster, policy, alpha, rps)
    click.echo(f"{key}: {res.requests.num_rows} requests ({time.perf_counter() - t0:.1f} s)",
               err=True)  # fmt: skip
    return {
        "key": key,
        "requests": table_hashes(res.requests),
        "devices": table_hashes(res.devices),
        "stats": stats,
    }


def compare(old: dict, new: dict) -> list[str]:
    """Where two fingerprints differ, one line each (none: identical)."""
    diffs = []
    for key in sorted(set(old["runs"]) | set(new["runs"])):
        a, b = old["runs"].get(key), new["runs"].get(key)
        if a is None or b is None:
            diffs.append(f"{key}: only in {'new' if a is None else 'old'}")
            continue
        for part in ("requests", "devices"):
            if a[part]["rows"] != b[part]["rows"]:
                diffs.append(f"{key} {part}: {a[part]['rows']} rows against {b[part]['rows']}")
            for col, h in a[part]["columns"].items():
                if b[part]["columns"].get(col) != h:
                    diffs.append(f"{key} {part}.{col} differs")
        if a["stats"] != b["stats"]:
            diffs.append(f"{key} stats differ")
    return diffs


@click.command()
@click.option("--warmup", default=1800.0, show_default=True, help="Seconds, not measured.")
@click.option("--duration", default=1800.0, show_default=True, help="Seconds after the warm-up.")
@click.option("--jobs", default=2, show_default=True, help="Worker processes.")
@click.option("--out", default="bench/results/sim_fingerprint.json", show_default=True)
@click.option("--compare", "files", nargs=2, type=click.Path(exists=True, dir_okay=False),
              help="Compare two fingerprint files and exit (status 1 if they differ).")  # fmt: skip
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False),
              help="A fingerprint file to compare this run with, in the output.")  # fmt: skip
def main(
    warmup: float,
    duration: float,
    jobs: int,
    out: str,
    files: tuple[str, str],
    baseline: str | None,
) -> None:
    if files:
        docs = []
        for path in files:
            with open(path) as f:
                docs.append(json.load(f))
        diffs = compare(*docs)
        click.echo("\n".join(diffs) if diffs else f"identical: {len(docs[0]['runs'])} runs")
        sys.exit(1 if diffs else 0)
    t0 = time.perf_counter()
    # The scarce cluster's warmserve runs cost the most: start them first.
    todo = sorted(runs(), key=lambda r: (r[0] == PAPER, not r[1].startswith("warmserve")))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        done = list(pool.map(run_one, [(*r, warmup, duration) for r in todo]))
    by_key = {r["key"]: r for r in done}
    results = [by_key[_key(*r)] for r in runs()]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)  # fmt: skip
    doc = {
        "command": " ".join(["python", "-m", "bench.sim_fingerprint", *sys.argv[1:]]),
        "git_head": head.stdout.strip(),
        "tree_changed": sorted(line[3:] for line in dirty.stdout.splitlines()),
        "seed": SEED,
        "warmup": warmup,
        "duration": duration,
        "runs": {r["key"]: {k: v for k, v in r.items() if k != "key"} for r in results},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if baseline:
        with open(baseline) as f:
            base = json.load(f)
        doc["baseline"] = {
            "git_head": base["git_head"],
            "command": base["command"],
            "differences": compare(base, doc),
        }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    click.echo(f"{len(results)} runs in {doc['wall_s']} s: {out}", err=True)


if __name__ == "__main__":
    main()
