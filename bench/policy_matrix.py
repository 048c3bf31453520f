"""The policy matrix: every policy on every named setting of ``clusters/matrix/`` (issue 22).

A setting is a cluster file with a workload recipe (``warmserve.sim.recipe``): hardware, models,
trace, popularity, a low and a high rate, seeds. Each run is one (setting, rate, policy, seed);
it simulates the recipe's warm-up and measured span and reports, over the measured requests,
SLO attainment (TTFT <= ``--slo-ttft``), the share of TTFT <= 100 ms, P50/P99 TTFT, dropped
requests, GPU-seconds held (devices universal or dedicated), instance starts per hour and how
many started from host memory (an engine start plus a copy: the cold path prewarming is meant
to avoid). A cell (setting, rate, policy) reports the medians over its seeds.

``share`` has no single layout that suits every cluster: it runs at every ``--share-slots``
count and the cell keeps the layout with the best median attainment, naming it. A layout that
places nothing, or a setting with a model that can never serve, is a load-time error
(``warmserve simulate`` exits 2 on it): the run records the message and the matrix goes on.

Writes ``OUT.json`` (every run and the cells), ``OUT.md`` and ``OUT_slo.png``. ``--merge``
keeps the runs of an earlier ``OUT.json`` that this invocation does not repeat, so the matrix
can be filled in over several invocations; ``--budget`` stops starting runs after that many
seconds and lists what was not run.

    python bench/policy_matrix.py [--settings paper-a05,mixed24-8x48] [--rates low]
        [--policies warmserve,autoscale,share] [--seeds 0,1,2] [--jobs 2] [--scale 0.1]
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "clusters" / "matrix"
POLICIES = (
    "warmserve",
    "autoscale",
    "share",
    "warmserve-noprewarm",
    "warmserve-noplacement",
    "warmserve-noproactive",
    "warmserve-nolend",
)
BASELINES = ("autoscale", "share")
SHARE_SLOTS = (1, 2, 3, 4)
# The numbers of a run that a cell reports as medians over its seeds.
METRICS = (
    "slo_attainment",
    "under_100ms",
    "ttft_p50",
    "ttft_p99",
    "dropped",
    "gpu_seconds_held",
    "starts_per_hour",
    "host_starts",
    "host_starts_per_hour",
    "disk_starts",
    "requests",
)
SHARE_NOTE = (
    "share runs at every share_slots count searched (warmserve.policy.share-slots: the equal "
    "parts each device is cut into); each cell keeps the count with the best median SLO "
    "attainment (then TTFT < 100 ms, then fewer slots) and names it as share_slots"
)


@dataclass(frozen=True, slots=True)
class Task:
    """One run: a setting's rate under one policy and workload seed."""

    path: str  # the setting's cluster file
    rate: str  # a rate the recipe names
    policy: str
    seed: int
    slots: int | None  # share_slots for share, else None
    scale: float  # warm-up and measured span times this
    slo_ttft: float

    @property
    def key(self) -> str:
        slots = f"/slots{self.slots}" if self.slots else ""
        return f"{Path(self.path).stem}/{self.rate}/{self.policy}{slots}/seed{self.seed}"


def record_starts(sim) -> list[tuple[float, str, str]]:
    """Every instance start of ``sim``'s cluster as (time, model, tier it started from).

    Wraps the cluster's ``_start`` on this one object (the simulator keeps no record of starts
    by tier; requests carry their instance's tier, but not every start serves a request)."""
    cluster = sim.cluster
    start = cluster._start
    starts: list[tuple[float, str, str]] = []

    def recording(model, devices, t):
        starts.append((t, model, cluster.tier(model, devices).name.lower()))
        return start(model, devices, t)

    cluster._start = recording
    return starts


def over_capacity(table: pa.Table, spec, config, warmup: float) -> float:
    """Fraction of the measured arrivals at which serving every request in flight at once needs
    more devices than the cluster has: per model, ``ceil(in flight / capacity)`` instances of
    ``tp`` devices, with the capacity its instance has on this cluster's devices
    (``PolicyConfig.capacity``) and each request in flight for its prefill and decode time."""
    arrival = table.column("arrival").to_numpy(zero_copy_only=False).astype(np.float64)
    out = table.column("output_tokens").to_numpy(zero_copy_only=False).astype(np.float64)
    model = np.asarray(table.column("model").to_pylist(), dtype=object)
    at = arrival[arrival >= warmup]
    if not len(at):
        return float("nan")
    need = np.zeros(len(at), np.int64)
    for name, m in spec.models.items():
        sel = model == name
        if not sel.any():
            continue
        prof = spec.costs.profile(m)
        cap = max(1, config.capacity(m, spec.device_memory))
        begin = np.sort(arrival[sel])
        end = np.sort(arrival[sel] + prof.prefill_s + np.maximum(out[sel] - 1, 0) * prof.decode_s)
        level = np.searchsorted(begin, at, side="right") - np.searchsorted(end, at, side="right")
        need += m.tp * -(-level // cap)
    return float((need > spec.device_count).mean())


def run(task: Task) -> dict:
    """Run ``task`` (in a worker process); never raises: an error is part of the record."""
    from warmserve.policy.state import Tier
    from warmserve.report.metrics import gpu_seconds, request_metrics
    from warmserve.sim.cluster import SimInputError
    from warmserve.sim.engine import Simulator
    from warmserve.sim.policies import build_policy, live_config, policy_config
    from warmserve.sim.recipe import load_setting
    from warmserve.sim.sweep import measured

    t0 = time.perf_counter()
    rec: dict = {"task": asdict(task), "key": task.key}
    try:
        setting = load_setting(task.path)
        recipe = setting.recipe.scaled(task.scale)
        spec = setting.cluster
        config = policy_config(spec, live_config())
        if task.slots is not None:
            config = replace(config, share_slots=task.slots)
        policy = build_policy(task.policy, spec, config)
        table = recipe.workload(list(spec.models), task.rate, task.seed)
    except (SimInputError, ValueError) as e:
        rec.update(error=str(e), error_kind="load", wall_s=round(time.perf_counter() - t0, 2))
        return rec
    try:
        sim = Simulator(spec, policy, table, config)
        starts = record_starts(sim)
        res = sim.run()
        warmup, end = recipe.warmup, recipe.warmup + recipe.duration
        m = request_metrics(measured(res.requests, warmup), task.slo_ttft)
        held = gpu_seconds(res.devices, end=end, start=warmup)["gpu_seconds_held"]
        tiers: dict[str, int] = {}
        for t, _, tier in starts:
            if warmup <= t < end:
                tiers[tier] = tiers.get(tier, 0) + 1
        hours = recipe.duration / 3600.0
        n = sum(tiers.values())
        host = tiers.get(Tier.HOST.name.lower(), 0)
        rec.update(
            {
                "rps": recipe.rate(task.rate),
                "requests": m["requests"],
                "slo_attainment": m["slo_attainment"],
                "under_100ms": m["under_100ms"],
                "ttft_p50": m["ttft_p50"],
                "ttft_p99": m["ttft_p99"],
                "dropped": m["not_ok"],
                "gpu_seconds_held": round(held, 1),
                "starts": n,
                "starts_per_hour": n / hours,
                "starts_by_tier": tiers,
                "host_starts": host,
                "host_starts_per_hour": host / hours,
                "disk_starts": tiers.get(Tier.DISK.name.lower(), 0),
                "arrivals_over_capacity": over_capacity(table, spec, config, warmup),
                "policy_s": res.stats["policy_s"],
                "rejected_actions": res.stats["rejected_actions"],
            }
        )
    except Exception as e:  # a crash of one run is reported, the matrix goes on
        rec.update(
            error=f"{type(e).__name__}: {e}",
            error_kind="crash",
            traceback=traceback.format_exc(limit=-3),
        )
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    return {k: _round(v) for k, v in rec.items()}


def _round(v):
    """Floats to 6 significant digits (TTFTs of 0.034999999 read as 0.035)."""
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


# -- the cells -----------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(statistics.median(vals)) if vals else float("nan")


def cell(records: list[dict]) -> dict:
    """The medians over the seeds of one (setting, rate, policy[, slots]); an error if any
    seed's run failed."""
    records = sorted(records, key=lambda r: r["task"]["seed"])
    errors = {str(r["task"]["seed"]): r["error"] for r in records if "error" in r}
    out: dict = {"seeds": [r["task"]["seed"] for r in records]}
    if errors:
        kinds = {r.get("error_kind") for r in records if "error" in r}
        out.update(error=next(iter(errors.values())), error_kind=sorted(kinds)[0])
        out["errors_by_seed"] = errors
        return out
    for k in METRICS:
        out[k] = _round(_median([r[k] for r in records]))
    out["rps"] = records[0]["rps"]
    out["arrivals_over_capacity"] = _median([r["arrivals_over_capacity"] for r in records])
    out["by_seed"] = {
        str(r["task"]["seed"]): {k: r[k] for k in (*METRICS, "starts_by_tier", "wall_s")}
        for r in records
    }
    return out


def best_share(layouts: dict[int, dict]) -> dict:
    """The share layout a cell keeps: best median attainment, then under 100 ms, then fewer
    slots; an error naming every layout's if none ran."""
    ok = {k: v for k, v in layouts.items() if "error" not in v}
    every = {str(k): v for k, v in sorted(layouts.items())}
    if not ok:
        msgs = "; ".join(f"{k} slots: {v['error']}" for k, v in sorted(layouts.items()))
        return {"error": f"no share layout ran ({msgs})", "error_kind": "load", "layouts": every}
    k = max(ok, key=lambda s: (ok[s]["slo_attainment"], ok[s]["under_100ms"], -s))
    summary = {
        str(s): (
            {"error": v["error"]}
            if "error" in v
            else {m: v[m] for m in ("slo_attainment", "under_100ms", "ttft_p99")}
        )
        for s, v in sorted(layouts.items())
    }
    return {**ok[k], "share_slots": k, "layouts": summary}


def cells(runs: list[dict]) -> dict:
    """settings -> rates -> policies -> cell, from the run records."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        t = r["task"]
        groups.setdefault((Path(t["path"]).stem, t["rate"], t["policy"], t["slots"]), []).append(r)
    out: dict[str, dict[str, dict[str, dict]]] = {}
    shares: dict[tuple[str, str], dict[int, dict]] = {}
    for (setting, rate, policy, slots), recs in groups.items():
        if policy == "share" and slots is not None:
            shares.setdefault((setting, rate), {})[slots] = cell(recs)
        else:
            out.setdefault(setting, {}).setdefault(rate, {})[policy] = cell(recs)
    for (setting, rate), layouts in shares.items():
        out.setdefault(setting, {}).setdefault(rate, {})["share"] = best_share(layouts)
    return out


def compare(by_policy: dict[str, dict]) -> dict | None:
    """warmserve against the best baseline and autoscale's starts, for one (setting, rate)."""
    ws = by_policy.get("warmserve")
    base = {p: by_policy[p] for p in BASELINES if p in by_policy and "error" not in by_policy[p]}
    if not ws or "error" in ws or not base:
        return None
    best = max(base, key=lambda p: base[p]["slo_attainment"])
    out = {
        "best_baseline": best,
        "best_baseline_slo": base[best]["slo_attainment"],
        "warmserve_slo": ws["slo_attainment"],
        "points_ahead": round(100 * (ws["slo_attainment"] - base[best]["slo_attainment"]), 2),
    }
    seeds = {p: c["seeds"] for p, c in (("warmserve", ws), *base.items()) if "seeds" in c}
    if len({tuple(v) for v in seeds.values()}) > 1:  # a matrix cut short by its budget
        out["seeds_differ"] = seeds
    auto = base.get("autoscale")
    if auto:
        out["starts_per_hour"] = {
            "warmserve": ws["starts_per_hour"],
            "autoscale": auto["starts_per_hour"],
        }
        a, w = auto["starts_per_hour"], ws["starts_per_hour"]
        out["starts_vs_autoscale"] = w / a if a else None  # None: autoscale started nothing
        out["starts_over_3x_autoscale"] = w > 3 * a
    return out


def targets(comparisons: dict[str, dict]) -> dict[str, str]:
    """Issue 22's Show 1 and 2 over the (setting, rate) cells that ran."""
    got = [c for c in comparisons.values() if c]
    if not got:
        return {}
    held = [k for k, c in comparisons.items() if c and c["points_ahead"] >= -0.5]
    ahead = [k for k, c in comparisons.items() if c and c["points_ahead"] >= 2]
    over = [k for k, c in comparisons.items() if c and c.get("starts_over_3x_autoscale")]
    behind = sorted(set(k for k, c in comparisons.items() if c) - set(held))
    return {
        "warmserve >= best baseline - 0.5 point, every cell": (
            f"{len(held)} of {len(got)}" + (f"; behind on {', '.join(behind)}" if behind else "")
        ),
        "warmserve ahead by >= 2 points on at least half": f"{len(ahead)} of {len(got)}",
        "warmserve starts/h <= 3x autoscale's, every cell": (
            f"{len(got) - len(over)} of {len(got)}"
            + (f"; over on {', '.join(over)}" if over else "")
        ),
    }


# -- output --------------------------------------------------------------------------------


def _f(v, kind: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "pct":
        return f"{v:.1%}"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "s":
        return f"{v:.3f}"
    return f"{v:.1f}"


def markdown(doc: dict) -> str:
    lines = [
        "# Policy matrix on the simulator",
        "",
        f"Command: `{doc['command']}` (git {doc['git_head']})",
        "",
    ]
    for c in doc.get("combined_from", []):
        lines += [f"Joined with the {c['runs']} runs of `{c['command']}`", ""]
    lines += [
        f"{doc['runs_done']} runs in {doc['wall_s']:.0f} s on {doc['jobs']} processes "
        f"(median run {doc['run_wall_s_median']:.1f} s); SLO: TTFT <= {doc['slo_ttft']:g} s. "
        f"Measured span: each recipe's warm-up and hour times {doc['scale']:g}. Medians over "
        f"seeds {', '.join(map(str, doc['seeds']))}. {doc['share_note']}.",
        "",
    ]
    if doc["targets"]:
        lines += ["## Issue 22's targets on the cells that ran", ""]
        lines += [f"- {k}: {v}" for k, v in doc["targets"].items()]
        lines += [
            "",
            "| setting | rate | RPS | warmserve | best baseline | points ahead | "
            "starts/h warmserve | starts/h autoscale | ratio |",
            "|---" * 9 + "|",
        ]
        for key, c in doc["comparisons"].items():
            if not c:
                continue
            setting, rate = key.split("/")
            sp = c.get("starts_per_hour", {})
            rps = doc["settings"][setting]["rates"][rate]["rps"]
            mark = " (seeds differ)" if c.get("seeds_differ") else ""
            lines.append(
                f"| {setting} | {rate}{mark} | {rps:g} | {_f(c['warmserve_slo'], 'pct')} | "
                f"{c['best_baseline']} {_f(c['best_baseline_slo'], 'pct')} | "
                f"{c['points_ahead']:+.1f} | {_f(sp.get('warmserve'))} | "
                f"{_f(sp.get('autoscale'))} | {_f(c.get('starts_vs_autoscale'))} |"
            )
        lines.append("")
    for name, s in doc["settings"].items():
        r = s["recipe"]
        lines += [
            f"## {name}",
            "",
            f"`{s['file']}`: {s['devices']} GPUs of {s['device_memory_gb']:g} GB, "
            f"{s['models']} models; trace {', '.join(r['trace'])}, tokens {r['tokens']}, "
            f"alpha {r['alpha']:g}.",
            "",
        ]
        if s.get("error"):
            lines += [f"**Not run: {s['error']}**", ""]
            continue
        for rate, rr in s["rates"].items():
            over = rr.get("arrivals_over_capacity")
            lines += [
                f"### {rate}: {rr['rps']:g} RPS (arrivals over capacity: {_f(over, 'pct')})",
                "",
                "| policy | SLO | TTFT < 100 ms | P50 TTFT (s) | P99 TTFT (s) | GPU-s held | "
                "starts/h | host starts/h | dropped | seeds |",
                "|---" * 10 + "|",
            ]
            for policy, c in rr["policies"].items():
                k = c.get("share_slots")
                label = policy + (f" ({k} slot{'s' * (k > 1)})" if k else "")
                if "error" in c:
                    lines.append(f"| {label} | {c['error_kind']} error: {c['error']} |" + " |" * 8)
                    continue
                lines.append(
                    f"| {label} | {_f(c['slo_attainment'], 'pct')} | "
                    f"{_f(c['under_100ms'], 'pct')} | {_f(c['ttft_p50'], 's')} | "
                    f"{_f(c['ttft_p99'], 's')} | {_f(c['gpu_seconds_held'], 'int')} | "
                    f"{_f(c['starts_per_hour'])} | {_f(c['host_starts_per_hour'])} | "
                    f"{_f(c['dropped'], 'int')} | {','.join(map(str, c['seeds']))} |"
                )
            lines.append("")
    if doc["not_run"]:
        lines += ["## Not run", ""] + [f"- {k}" for k in doc["not_run"]] + [""]
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def chart(doc: dict, path: str) -> bool:
    """SLO attainment per policy across the (setting, rate) cells, as grouped bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [(s, r) for s, v in doc["settings"].items() for r in v.get("rates", {})]
    if not keys:
        return False
    policies = [
        p
        for p in doc["policies"]
        if any(p in doc["settings"][s]["rates"][r]["policies"] for s, r in keys)
    ]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(keys) * max(1, len(policies)) / 3), 4.5))
    width = 0.8 / max(1, len(policies))
    for i, p in enumerate(policies):
        ys = []
        for s, r in keys:
            c = doc["settings"][s]["rates"][r]["policies"].get(p, {})
            ys.append(100 * c["slo_attainment"] if "slo_attainment" in c else 0.0)
        xs = [k + (i - (len(policies) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{s}\n{r}" for s, r in keys], fontsize=7)
    ax.set_ylabel(f"requests with TTFT <= {doc['slo_ttft']:g} s (%)")
    ax.set_ylim(0, 100)
    ax.set_title("SLO attainment by setting (median over seeds; share at its best layout)")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def document(runs: list[dict], meta: dict) -> dict:
    """The JSON document of ``runs`` (records of :func:`run`) and the invocation's ``meta``."""
    from warmserve.sim.cluster import SimInputError
    from warmserve.sim.recipe import load_setting

    by_cell = cells(runs)
    settings: dict[str, dict] = {}
    comparisons: dict[str, dict | None] = {}
    paths = {Path(r["task"]["path"]).stem: r["task"]["path"] for r in runs}
    for path in meta["setting_files"]:
        paths.setdefault(Path(path).stem, path)
    for name in sorted(
        paths,
        key=lambda n: (
            meta["setting_files"].index(paths[n])
            if paths[n] in meta["setting_files"]
            else len(paths)
        ),
    ):
        path = paths[name]
        info: dict = {"file": path}
        try:
            s = load_setting(located(path))
            info.update(
                devices=s.cluster.device_count,
                device_memory_gb=s.cluster.device_memory / 1e9,
                models=len(s.cluster.models),
                recipe=s.recipe.describe(),
            )
        except SimInputError as e:
            info.update(
                error=str(e),
                devices=0,
                device_memory_gb=0,
                models=0,
                recipe={"trace": [], "tokens": "-", "alpha": float("nan")},
            )
        rates = by_cell.get(name, {})
        info["rates"] = {}
        for rate in sorted(rates, key=lambda r: (r != "low", r)):
            ordered = {p: rates[rate][p] for p in meta["policies"] if p in rates[rate]}
            some = next((c for c in ordered.values() if "rps" in c), {})
            info["rates"][rate] = {
                "rps": some.get("rps", info.get("recipe", {}).get("rates", {}).get(rate)),
                "arrivals_over_capacity": some.get("arrivals_over_capacity"),
                "policies": ordered,
            }
            comparisons[f"{name}/{rate}"] = compare(ordered)
        if not info.get("error"):
            errs = [c for rr in info["rates"].values() for c in rr["policies"].values()]
            load = [c["error"] for c in errs if c.get("error_kind") == "load"]
            if errs and len(load) == len(errs):
                info["error"] = load[0]
        settings[name] = info
    walls = [r["wall_s"] for r in runs if "wall_s" in r]
    return {
        **{k: v for k, v in meta.items() if k != "setting_files"},
        "runs_done": len(runs),
        "run_wall_s_median": _median(walls) if walls else float("nan"),
        "share_note": SHARE_NOTE,
        "targets": targets(comparisons),
        "comparisons": comparisons,
        "settings": settings,
        "runs": runs,
    }


def shown(path: str) -> str:
    """``path`` (absolute, or already relative to the repository) relative to the repository
    when it is inside it, as result files name it."""
    if not os.path.isabs(path):
        return path
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def located(path: str) -> str:
    """A path as :func:`shown` writes it, for opening from any working directory."""
    return str(ROOT / path) if not os.path.isabs(path) else path


def write(doc: dict, out: str, plot: bool = True) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(f"{out}.json.tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(f"{out}.json.tmp", f"{out}.json")
    with open(f"{out}.md", "w") as f:
        f.write(markdown(doc))
    if plot:
        chart(doc, f"{out}_slo.png")


def combine(doc: dict, adds: tuple[str, ...]) -> dict:
    """``doc`` with the runs of the result files ``adds`` joined (``doc``'s own run of a key
    wins), its cells, comparisons and targets made again: one matrix from invocations that ran
    side by side or on different machines (at one --scale)."""
    runs: dict[str, dict] = {}
    not_run: set[str] = set(doc.get("not_run", []))
    files = list(doc.get("setting_files") or [])
    walls, jobs = [doc.get("wall_s", 0.0)], [doc.get("jobs") or 0]
    sources = []
    for path in adds:
        with open(path) as f:
            other = json.load(f)
        sources.append({"file": path, "command": other.get("command"), "runs": len(other["runs"])})
        walls.append(other.get("wall_s", 0.0))
        jobs.append(other.get("jobs") or 0)
        if other.get("scale") != doc.get("scale"):
            raise click.UsageError(f"{path} was made at --scale {other.get('scale')}")
        runs.update({r["key"]: r for r in other["runs"]})
        not_run |= set(other.get("not_run", []))
    runs.update({r["key"]: r for r in doc["runs"]})
    files += sorted({r["task"]["path"] for r in runs.values()} - set(files))
    keep = (
        "command",
        "git_head",
        "git_dirty",
        "slo_ttft",
        "scale",
        "share_slots_searched",
        "notes",
    )
    meta = {k: doc[k] for k in keep if k in doc}
    meta.update(
        seeds=sorted({r["task"]["seed"] for r in runs.values()}),
        policies=[p for p in POLICIES if any(r["task"]["policy"] == p for r in runs.values())],
        jobs=sum(jobs),  # the invocations ran side by side: the longest one's wall time
        wall_s=max(walls),
        finished=doc.get("finished"),
        not_run=sorted(not_run - set(runs)),
        combined_from=[*doc.get("combined_from", []), *sources],
        setting_files=files,
    )
    return document(list(runs.values()), meta)


def tasks_for(
    files: list[str],
    rates: list[str] | None,
    policies: list[str],
    seeds: list[int] | None,
    slots: list[int],
    scale: float,
    slo_ttft: float,
) -> list[Task]:
    """Every run of the filters, ordered so that a budget that runs out leaves the least
    missed: warmserve and the baselines of every cell before any ablation, and the first seed
    of every cell before the second."""
    from warmserve.sim.cluster import SimInputError
    from warmserve.sim.recipe import load_recipe

    out = []
    for path in files:
        try:
            recipe = load_recipe(path)
        except SimInputError:
            recipe = None
        if recipe is None:  # the run reports the error
            out += [Task(path, "-", p, 0, None, scale, slo_ttft) for p in policies[:1]]
            continue
        for rate in rates or list(recipe.rates):
            if rate not in recipe.rates:
                raise click.UsageError(f"{path}: no rate {rate!r} (it names {list(recipe.rates)})")
            for policy in policies:
                for seed in seeds if seeds is not None else recipe.seeds:
                    for k in slots if policy == "share" else [None]:
                        out.append(Task(path, rate, policy, seed, k, scale, slo_ttft))
    rank = {p: i for i, p in enumerate(POLICIES)}
    return sorted(
        out,
        key=lambda t: (
            t.policy.startswith("warmserve-"),
            t.seed,
            files.index(t.path),
            t.rate != "low",
            rank.get(t.policy, 99),
        ),
    )


def execute(
    tasks: list[Task], jobs: int, budget: float | None, checkpoint=None
) -> tuple[list[dict], list[Task]]:
    """Run ``tasks`` on ``jobs`` processes (in this one for 1) with a progress bar; after
    ``budget`` seconds no run starts. ``checkpoint(records, pending)`` is called after each
    run. Returns the records and the tasks not run."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    records: list[dict] = []
    todo = list(tasks)
    running: dict[Future, Task] = {}
    bar = tqdm(total=len(tasks), desc="runs", file=sys.stderr, unit="run", dynamic_ncols=True)

    def late() -> bool:
        return budget is not None and time.perf_counter() - t0 > budget

    def done(rec: dict) -> None:
        records.append(rec)
        bar.update(1)
        bar.set_postfix_str(f"{rec['key']} {rec.get('wall_s', 0):.0f}s", refresh=False)
        if "error" in rec:
            tqdm.write(f"{rec['key']}: {rec.get('error_kind')} error: {rec['error']}", sys.stderr)
        if checkpoint is not None:
            checkpoint(records, [*running.values(), *todo])

    if jobs <= 1:
        while todo and not late():
            done(run(todo.pop(0)))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            while todo or running:
                while todo and len(running) < jobs and not late():
                    task = todo.pop(0)
                    running[pool.submit(run, task)] = task
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    task = running.pop(fut)
                    try:
                        rec = fut.result()
                    except Exception as e:  # the worker process died (memory, a signal)
                        rec = {"task": asdict(task), "key": task.key, "error_kind": "crash"}
                        rec["error"] = f"{type(e).__name__}: {e}"
                    done(rec)
    bar.close()
    return records, todo


@click.command()
@click.option("--settings", default="", help="Comma-separated setting names [default: all].")
@click.option("--rates", default="", help="Comma-separated rate names [default: each recipe's].")
@click.option("--policies", default=",".join(POLICIES), show_default=True)
@click.option("--seeds", default="", help="Comma-separated seeds [default: each recipe's].")
@click.option("--share-slots", default="1,2,3,4", show_default=True, help="Layouts share tries.")
@click.option("--scale", default=1.0, show_default=True, help="Warm-up and span times this.")
@click.option("--slo-ttft", default=1.0, show_default=True, help="TTFT SLO in seconds.")
@click.option("--jobs", default=2, show_default=True, help="Worker processes.")
@click.option("--budget", type=float, default=None, help="Seconds after which no run starts.")
@click.option("--merge", is_flag=True, help="Keep OUT.json's runs that this one does not redo.")
@click.option("--matrix", default=str(MATRIX), show_default=True, help="Folder of settings.")
@click.option("--out", default="bench/results/policy_matrix", show_default=True)
@click.option("--markdown-only", is_flag=True, help="Only rewrite OUT.md and the chart.")
@click.option(
    "--add",
    "adds",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="With --markdown-only: join the runs of this result JSON to OUT.json's (repeat).",
)
@click.option(
    "--notes", type=click.Path(exists=True, dir_okay=False), help="Notes, one a paragraph."
)
def main(
    settings: str,
    rates: str,
    policies: str,
    seeds: str,
    share_slots: str,
    scale: float,
    slo_ttft: float,
    jobs: int,
    budget: float | None,
    merge: bool,
    matrix: str,
    out: str,
    markdown_only: bool,
    adds: tuple[str, ...],
    notes: str | None,
) -> None:
    """Run the policy matrix and write OUT.json, OUT.md and OUT_slo.png."""
    if adds and not markdown_only:
        raise click.UsageError("--add joins result files: use it with --markdown-only")
    if markdown_only:
        with open(f"{out}.json") as f:
            doc = json.load(f)
        if adds:
            doc = combine(doc, adds)
        if notes:
            with open(notes) as f:
                doc["notes"] = [" ".join(p.split()) for p in f.read().split("\n\n") if p.strip()]
        write(doc, out)
        return
    files = sorted(str(p.resolve()) for p in Path(matrix).glob("*.yaml"))
    if settings:
        names = [s.strip() for s in settings.split(",") if s.strip()]
        known = {Path(f).stem: f for f in files}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise click.UsageError(f"unknown settings {unknown}; {matrix} has {sorted(known)}")
        files = [known[n] for n in names]
    policy_list = [p.strip() for p in policies.split(",") if p.strip()]
    bad = [p for p in policy_list if p not in POLICIES]
    if bad:
        raise click.UsageError(f"unknown policies {bad}; choose from {', '.join(POLICIES)}")
    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds else None
        slot_list = [int(s) for s in share_slots.split(",")]
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if not scale > 0:
        raise click.UsageError("--scale must be positive")
    rate_list = [r.strip() for r in rates.split(",") if r.strip()] or None
    tasks = tasks_for(files, rate_list, policy_list, seed_list, slot_list, scale, slo_ttft)
    old_runs: list[dict] = []
    if merge and os.path.exists(f"{out}.json"):
        with open(f"{out}.json") as f:
            old = json.load(f)
        if old.get("scale") != scale:
            raise click.UsageError(f"--merge: {out}.json was made at --scale {old.get('scale')}")
        old_runs = old.get("runs", [])
    started = time.perf_counter()
    mine = [shown(f) for f in files]

    def save(records: list[dict], left: list[Task], final: bool) -> dict:
        redone = {r["key"] for r in records}
        previous = [r for r in old_runs if r["key"] not in redone]
        runs = [*previous, *records]
        for r in runs:
            r["task"]["path"] = shown(r["task"]["path"])
        meta = {
            "command": "python " + " ".join(sys.argv),
            "git_head": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip(),
            "git_dirty": bool(
                subprocess.run(
                    ["git", "status", "--porcelain", "--", "warmserve", "clusters", __file__],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                ).stdout.strip()
            ),
            "slo_ttft": slo_ttft,
            "scale": scale,
            "seeds": sorted({r["task"]["seed"] for r in runs}),
            "policies": [p for p in POLICIES if any(r["task"]["policy"] == p for r in runs)],
            "share_slots_searched": slot_list,
            "jobs": jobs,
            "wall_s": round(time.perf_counter() - started, 1),
            "finished": final,
            "not_run": [t.key for t in left],
            "setting_files": [*mine, *sorted({r["task"]["path"] for r in runs} - set(mine))],
        }
        if previous:
            meta["merged_runs"] = len(previous)
        doc = document(runs, meta)
        if notes:
            with open(notes) as f:
                doc["notes"] = [" ".join(p.split()) for p in f.read().split("\n\n") if p.strip()]
        write(doc, out, plot=final)
        return doc

    records, left = execute(
        tasks, jobs, budget, lambda recs, pending: save(recs, pending, final=False)
    )
    doc = save(records, left, final=True)
    click.echo(
        f"wall time {doc['wall_s']:.0f} s: {len(records)} runs on {jobs} processes, median run "
        f"{doc['run_wall_s_median']:.1f} s; {len(left)} not run; {out}.json, {out}.md",
        err=True,
    )


if __name__ == "__main__":
    main()
