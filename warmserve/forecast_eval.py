"""``warmserve forecast eval``: score load forecasters on real multi-day traces.

Series (one per model, plus ServeGen's largest clients), as average and peak concurrency per
window:

- ServeGen (14 days, 600 s windows, per-client request rates and inter-arrival CVs): concurrency
  follows Little's law, ``avg = rate * LATENCY`` with an assumed mean request latency. For the
  peak, the count of requests in flight over a latency-long interval has variance
  ``rate * LATENCY * cv**2`` for a renewal process with inter-arrival CV ``cv`` (``cv**2`` capped
  at the window's request count, the dispersion of all requests arriving at once); clients are
  independent, so variances add, and the window's peak is taken ``PEAK_Z`` standard deviations
  above the mean (about the maximum of the ~300 intervals of a 600 s window).
- BurstGPT (7 days, 300 s windows, per-request arrivals of two models): each request is in
  flight for an assumed service time (``TTFT + response tokens * TPOT``); average and peak
  concurrency per window come from a sweep over arrivals and departures.

Each series is scaled so its mean average concurrency is ``SCALE_INSTANCES`` instances' worth;
that makes "one instance's capacity" (the missed-burst threshold) the same share of every series.
WAPE does not depend on the scale.

Evaluation is rolling-origin one step ahead: each window is predicted from the windows before it,
and windows of the first ``warmup`` days are not scored (seasonal methods need a day of history).
statsforecast's AutoETS and MSTL refit at every origin (a third of a second per fit), so they are
scored on ``STATS_ORIGINS`` evenly spaced origins per series, fitted on the ``STATS_DAYS`` days
before each; every method is also scored on exactly those origins for a like-for-like row.

Methods: ``csp`` (the paper's plain CSP), ``last-value``, ``seasonal-naive``, ``blend`` (a
tuned CSP: corrections across period boundaries, decay 0.8 over 10 windows, 70% last value),
``mixture`` (what the planner runs: an online, per-series, exponentially weighted mixture of a
CSP, last-value, seasonal-naive and recent medians/quantiles, see
:func:`warmserve.policy.forecast.mixture`; it learns only from windows before each prediction)
and the two statsforecast models.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import click
import numpy as np

from warmserve.policy import forecast as fc

SERVEGEN = "/work/shared/traces/raw/servegen/servegen_client_windows_long.csv.gz"
BURSTGPT = "/work/shared/traces/raw/burstgpt/BurstGPT_1_first7days.csv"
LATENCY = 2.0  # s, assumed mean latency of a ServeGen request
PEAK_Z = 3.0  # standard deviations from a window's mean concurrency to its peak
TTFT = 0.5  # s, assumed time to first token of a BurstGPT request
TPOT = 0.02  # s, assumed time per output token
CAPACITY = 32  # concurrent requests per instance
STATS_ORIGINS = 36  # statsforecast origins per series (fewer make the like-for-like rows noisy)
STATS_DAYS = 4  # days of history each statsforecast fit sees
SCALE_INSTANCES = 4.0  # mean average concurrency of every series, in instances
TOP_CLIENTS = 4  # ServeGen clients with the highest total rate, evaluated on their own


@dataclass
class Series:
    """Average and peak concurrency (names x windows) of one trace."""

    source: str
    names: list[str]
    avg: np.ndarray
    peak: np.ndarray
    window: float
    period: int  # windows per day
    warmup: int  # windows not scored


def _scaled(avg: np.ndarray, peak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = SCALE_INSTANCES * CAPACITY / np.maximum(avg.mean(axis=1, keepdims=True), 1e-12)
    return avg * scale, peak * scale


def load_servegen(path: str = SERVEGEN) -> Series:
    """Language models of ServeGen, per model and for the largest clients."""
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path)
    table = table.filter(pc.equal(table["category"], "language"))
    model = table["model"].to_numpy(zero_copy_only=False)
    client = table["client_id"].to_numpy()
    start = table["window_start_s"].to_numpy()
    rate = table["rate_rps"].to_numpy()
    cv = table["cv"].to_numpy()
    win = (start // 600).astype(np.int64)
    t = int(win.max()) + 1
    mean = rate * LATENCY
    # The index of dispersion of counts cannot exceed the window's whole count (all requests at
    # once): a cap that matters in burst windows, where ServeGen's CV reaches the hundreds.
    var = rate * LATENCY * np.minimum(cv**2, rate * 600.0)
    names: list[str] = []
    avgs, variances = [], []
    for m in sorted(set(model)):
        sel = model == m
        avgs.append(np.bincount(win[sel], mean[sel], t))
        variances.append(np.bincount(win[sel], var[sel], t))
        names.append(m)
    keys = np.char.add(np.char.add(model.astype(str), "/c"), client.astype(str))
    totals: dict[str, float] = {}
    for k, r in zip(keys, rate, strict=True):
        totals[k] = totals.get(k, 0.0) + r
    for k in sorted(totals, key=lambda k: (-totals[k], k))[:TOP_CLIENTS]:
        sel = keys == k
        avgs.append(np.bincount(win[sel], mean[sel], t))
        variances.append(np.bincount(win[sel], var[sel], t))
        names.append(k)
    avg = np.array(avgs)
    var_ = np.array(variances)
    # Scale the rates (not the concurrency) so the peak's sqrt term scales as it would.
    factor = SCALE_INSTANCES * CAPACITY / avg.mean(axis=1, keepdims=True)
    avg = avg * factor
    peak = avg + PEAK_Z * np.sqrt(var_ * factor)
    return Series("servegen", names, avg, peak, 600.0, 144, 3 * 144)


def load_burstgpt(path: str = BURSTGPT, window: float = 300.0) -> Series:
    """Both BurstGPT models: concurrency from arrivals and an assumed service time."""
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path)
    ts = table["Timestamp"].to_numpy().astype(float)
    model = table["Model"].to_numpy(zero_copy_only=False)
    service = TTFT + TPOT * table["Response tokens"].to_numpy().astype(float)
    t = math.ceil(7 * 86_400 / window)
    names = sorted(set(model))
    avgs, peaks = [], []
    for m in names:
        sel = model == m
        a, p = _concurrency(ts[sel], ts[sel] + service[sel], window, t)
        avgs.append(a)
        peaks.append(p)
    avg, peak = _scaled(np.array(avgs), np.array(peaks))
    per_day = round(86_400 / window)
    return Series("burstgpt", names, avg, peak, window, per_day, 2 * per_day)


def _concurrency(
    arrive: np.ndarray, depart: np.ndarray, window: float, t: int
) -> tuple[np.ndarray, np.ndarray]:
    """Time-weighted average and peak of requests in flight per window."""
    times = np.concatenate([arrive, depart])
    steps = np.concatenate([np.ones_like(arrive), -np.ones_like(depart)])
    order = np.lexsort((steps, times))  # departures first at equal times
    times, steps = times[order], steps[order]
    level = np.cumsum(steps)
    avg = np.zeros(t)
    peak = np.zeros(t)
    bounds = np.arange(1, t + 1) * window
    # The level holds from times[i] to times[i+1]: split those spans at window bounds.
    cuts = np.union1d(times, bounds[bounds < times[-1]])
    held = np.concatenate([[0.0], level])[np.searchsorted(times, cuts, side="right")]
    spans = np.diff(np.concatenate([cuts, [cuts[-1]]]))
    idx = np.minimum((cuts // window).astype(np.int64), t - 1)
    avg += np.bincount(idx, held * spans, t) / window
    np.maximum.at(peak, idx, held)
    return avg, peak


def methods(period: int) -> dict:
    """The cheap forecasters, as functions of a models x windows history."""
    return {
        "csp": lambda h: fc.csp(h, fc.CSPParams(period)),
        "last-value": fc.last_value,
        "seasonal-naive": lambda h: fc.seasonal_naive(h, period),
        "blend": lambda h: fc.csp(h, blend_params(period)),
    }


def mixture_predictions(period: int, avg: np.ndarray, peak: np.ndarray):
    """The planner's forecaster (:func:`warmserve.policy.planner.csp_params`), average and peak
    (its peak experts are scored with a higher pinball quantile)."""
    params = fc.CSPParams(period, 3, 10, decay=0.8, reset=False, mix=fc.MixParams())
    return fc.mixture(avg, params, 0), fc.mixture(peak, params, 1)


def blend_params(period: int) -> fc.CSPParams:
    """The tuned CSP: see the module docstring and :func:`warmserve.policy.planner.csp_params`."""
    return fc.CSPParams(period, periods=3, correction_windows=10, decay=0.8, reset=False, blend=0.7)


def _stats(series: Series, values: np.ndarray, origins: np.ndarray) -> dict[str, np.ndarray]:
    """AutoETS and MSTL one-step forecasts at ``origins`` (series x origins)."""
    from statsforecast.models import MSTL, AutoETS

    models = {
        "autoets": lambda: AutoETS(season_length=1),
        "mstl": lambda: MSTL(season_length=series.period, trend_forecaster=AutoETS(model="ZZN")),
    }
    span = STATS_DAYS * series.period
    out = {name: np.zeros((values.shape[0], len(origins))) for name in models}
    for name, make in models.items():
        for i in range(values.shape[0]):
            for k, t in enumerate(origins):
                y = values[i, max(0, t - span) : t]
                try:
                    out[name][i, k] = max(0.0, float(make().forecast(y=y, h=1)["mean"][0]))
                except Exception:  # a fit that fails to converge counts as a last-value forecast
                    out[name][i, k] = y[-1]
    return out


def _scores(pred: np.ndarray, actual: np.ndarray, pred_peak, actual_peak) -> dict[str, float]:
    wape_avg = float(np.abs(pred - actual).sum() / actual.sum())
    wape_peak = float(np.abs(pred_peak - actual_peak).sum() / actual_peak.sum())
    return {
        "wape_avg": round(wape_avg, 4),
        "wape_peak": round(wape_peak, 4),
        "accuracy_avg": round(1 - wape_avg, 4),
        "accuracy_peak": round(1 - wape_peak, 4),
        "missed_burst": round(float((actual_peak - pred_peak > CAPACITY).mean()), 4),
    }


def evaluate(series: Series, stats: bool = True) -> dict:
    """Scores of every method on ``series``: all windows, and the statsforecast origins."""
    w0 = series.warmup
    t = series.avg.shape[1]
    preds = {name: (f(series.avg), f(series.peak)) for name, f in methods(series.period).items()}
    preds["mixture"] = mixture_predictions(series.period, series.avg, series.peak)
    result: dict = {
        "series": series.names,
        "window_s": series.window,
        "windows": t,
        "scored_windows": t - w0,
        "all_windows": {
            name: _scores(a[:, w0:], series.avg[:, w0:], p[:, w0:], series.peak[:, w0:])
            for name, (a, p) in preds.items()
        },
    }
    if stats:
        origins = np.linspace(w0, t - 1, STATS_ORIGINS).round().astype(np.int64)
        started = time.perf_counter()
        fa = _stats(series, series.avg, origins)
        fp = _stats(series, series.peak, origins)
        sub = {name: (a[:, origins], p[:, origins]) for name, (a, p) in preds.items()}
        sub |= {name: (fa[name], fp[name]) for name in fa}
        actual_a, actual_p = series.avg[:, origins], series.peak[:, origins]
        result["stats_origins"] = {
            "origins_per_series": STATS_ORIGINS,
            "fit_days": STATS_DAYS,
            "seconds": round(time.perf_counter() - started, 1),
            "scores": {n: _scores(a, actual_a, p, actual_p) for n, (a, p) in sub.items()},
        }
    result["_preds"] = preds
    return result


def _plot(results: dict, loaded: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(loaded), 1, figsize=(12, 3.5 * len(loaded)), squeeze=False)
    for ax, (source, series) in zip(axes[:, 0], loaded.items(), strict=True):
        preds = results[source]["_preds"]
        days = 2 * series.period
        x = np.arange(series.avg.shape[1] - days, series.avg.shape[1]) * series.window / 3600
        ax.plot(x, series.peak[0, -days:], color="black", lw=1, label="actual peak")
        ax.plot(x, series.avg[0, -days:], color="gray", lw=1, label="actual avg")
        for name, color in (
            ("mixture", "tab:red"),
            ("csp", "tab:blue"),
            ("last-value", "tab:green"),
        ):
            ax.plot(x, preds[name][1][0, -days:], color=color, lw=0.8, label=f"{name} peak")
        ax.set_title(f"{source}: {series.names[0]}, last two days")
        ax.set_xlabel("hour")
        ax.set_ylabel("concurrent requests")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.group()
def command() -> None:
    """Evaluate load forecasters on real traces."""


@command.command("eval")
@click.option("--source", type=click.Choice(["servegen", "burstgpt", "all"]), default="all")
@click.option("--out", default="bench/results/forecast.json", show_default=True)
@click.option("--png", default="bench/results/forecast.png", show_default=True)
@click.option("--no-stats", is_flag=True, help="Skip statsforecast (minutes on two cores).")
def eval_(source: str, out: str, png: str, no_stats: bool) -> None:
    """Rolling-origin one-step evaluation of CSP, baselines, the blend and statsforecast."""
    loaders = {"servegen": load_servegen, "burstgpt": load_burstgpt}
    chosen = list(loaders) if source == "all" else [source]
    loaded = {name: loaders[name]() for name in chosen}
    results = {name: evaluate(s, stats=not no_stats) for name, s in loaded.items()}
    for name, r in results.items():
        click.echo(f"{name}: {r['scored_windows']} windows x {len(r['series'])} series")
        for method, sc in r["all_windows"].items():
            click.echo(f"  {method:15s} {sc}")
        for method, sc in r.get("stats_origins", {}).get("scores", {}).items():
            click.echo(f"  @origins {method:15s} {sc}")
    if png:
        _plot(results, loaded, png)
    doc = {
        "command": "warmserve forecast eval "
        + " ".join(
            [f"--source {source}", f"--out {out}", f"--png {png}"] + ["--no-stats"] * no_stats
        ),
        "assumptions": {
            "servegen_latency_s": LATENCY,
            "peak_z": PEAK_Z,
            "burstgpt_ttft_s": TTFT,
            "burstgpt_tpot_s": TPOT,
            "instance_capacity": CAPACITY,
            "mean_avg_concurrency_instances": SCALE_INSTANCES,
        },
        "results": {n: {k: v for k, v in r.items() if k != "_preds"} for n, r in results.items()},
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
