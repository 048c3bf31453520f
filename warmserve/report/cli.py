"""``warmserve report``: compare result files (simulated or live) in one table and two plots."""

from __future__ import annotations

import json
import math
import os

import click
import pyarrow as pa
import pyarrow.parquet as pq

from warmserve.report.load import model_load
from warmserve.report.metrics import gpu_seconds, request_metrics
from warmserve.report.plots import device_modes, load_forecast, ttft_cdf
from warmserve.report.schema import devices_path

_COLUMNS = (
    ("requests", "requests", "{:d}"),
    ("ok", "ok", "{:d}"),
    ("ttft_p50", "TTFT p50 (s)", "{:.3f}"),
    ("ttft_p95", "TTFT p95 (s)", "{:.3f}"),
    ("ttft_p99", "TTFT p99 (s)", "{:.3f}"),
    ("tpot_p50", "TPOT p50 (s)", "{:.4f}"),
    ("under_100ms", "TTFT < 100 ms", "{:.1%}"),
    ("slo_attainment", "within SLO", "{:.1%}"),
    ("gpu_seconds_held", "GPU-s held", "{:.0f}"),
    ("gpu_seconds_serving", "GPU-s serving", "{:.0f}"),
)


def label_of(table: pa.Table, path: str) -> str:
    """The policy named in the file's metadata, else the file name."""
    meta = table.schema.metadata or {}
    policy = meta.get(b"policy", b"").decode()
    return policy or os.path.splitext(os.path.basename(path))[0]


def markdown(rows: dict[str, dict]) -> str:
    """A markdown table, one row per labelled result."""
    head = "| file | " + " | ".join(h for _, h, _ in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(_COLUMNS) + 1)]
    for label, m in rows.items():
        cells = []
        for key, _, fmt in _COLUMNS:
            v = m.get(key)
            bad = v is None or (isinstance(v, float) and math.isnan(v))
            cells.append("-" if bad else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build(paths: list[str], slo_ttft: float) -> tuple[dict[str, dict], dict, dict]:
    """Metrics per file, plus the tables and device timelines keyed by unique label."""
    rows: dict[str, dict] = {}
    tables: dict[str, pa.Table] = {}
    timelines: dict[str, pa.Table] = {}
    for path in paths:
        table = pq.read_table(path)
        label = label_of(table, path)
        if label in rows:
            label = f"{label} ({os.path.basename(path)})"
        m = request_metrics(table, slo_ttft)
        dpath = devices_path(path)
        if os.path.exists(dpath):
            timeline = pq.read_table(dpath)
            timelines[label] = timeline
            m.update(gpu_seconds(timeline))
        rows[label] = m
        tables[label] = table
    return rows, tables, timelines


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--slo-ttft", default=0.1, show_default=True, help="TTFT SLO in seconds.")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Write JSON, markdown and PNGs.")
@click.option(
    "--window",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Load window (s) of the per-model load and forecast plots (the planner's).",
)
@click.option(
    "--period",
    default=86_400.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Season (s) of the forecaster; a compressed replay passes its compressed day.",
)
def command(
    results: tuple[str, ...], slo_ttft: float, out_dir: str | None, window: float, period: float
) -> None:
    """TTFT/TPOT percentiles, SLO attainment and GPU-seconds of RESULTS (Parquet) side by side.

    With --out-dir also a TTFT CDF, device modes over time (simulated results), and per result
    file the load of every model over time with the planner's forecast beside it (the
    forecaster run one window ahead on the measured load; its WAPE goes in report.json)."""
    if period < window:
        raise click.UsageError(f"--period ({period:g} s) must be at least --window ({window:g} s)")
    try:
        rows, tables, timelines = build(list(results), slo_ttft)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    text = markdown(rows)
    click.echo(text)
    for label, m in rows.items():
        if m["errors"]:
            click.echo(f"{label}: not ok: {m['errors']}")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    for i, (label, table) in enumerate(tables.items()):
        load = model_load(table, window, period)
        rows[label]["forecast_wape"] = load.wape()
        load_forecast(
            load.models,
            window,
            load.avg,
            load.peak,
            load.forecast_peak,
            os.path.join(out_dir, f"load_{i}.png"),
            title=label,
        )
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    ttft_cdf(tables, os.path.join(out_dir, "ttft_cdf.png"), slo_ttft)
    for i, (label, timeline) in enumerate(timelines.items()):
        device_modes(timeline, os.path.join(out_dir, f"devices_{i}.png"), title=label)
    click.echo(f"wrote {out_dir}/report.json, report.md and plots")
