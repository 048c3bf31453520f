"""``warmserve forecast eval``: score load forecasters on real multi-day traces.

Series (one per model, plus ServeGen's largest clients), as average and peak concurrency per
window, each request in flight for an assumed time:

- ServeGen (14 days, 600 s windows): per client and window, a request rate and the fitted
  inter-arrival distribution (Gamma or Weibull: shape, scale, and the empirical CV). The average
  is Little's law, ``rate * LATENCY``. The **peak** is the largest number of requests in flight
  in the window (sampled every ``SAMPLE_DT`` s, each request in flight ``LATENCY`` s) in one
  realisation (seed ``SEED``) of ServeGen's own arrival model: each client-window's
  ``rate * 600`` requests (stochastically rounded) get gaps drawn from the fitted family and
  shape, rescaled so they span the window (the scale only sets the rate, as in ServeGen's
  generator, which rescales to the window's rate); the clients of a series are superposed.
  The earlier definition (``--servegen-peak gaussian``: mean plus ``PEAK_Z`` standard deviations,
  each client's count variance ``rate * LATENCY * cv**2`` from its *empirical* CV) was
  dominated by noise: 95 to 99% of its variance came from Weibull-fitted windows, whose empirical
  CV is a median 1.3 (90th percentile 2.8) times the CV of their own fit: one long pause in a window
  inflates the CV of its gaps without making arrivals any burstier; the asymptotic dispersion
  ``cv**2`` then turned that pause into a burst of hundreds of requests, in whichever window the
  pause fell (lag-1 autocorrelation of the peak's excess over the mean 0.01 to 0.4, and the peak
  a mean 2.0 to 4.6 times the average). The sampled peak keeps the burstiness the fits describe
  (a mean 1.8 times the average for m-large) and is a quantity a replay of the trace would show.
- BurstGPT (7 days, 300 s windows, per-request arrivals of two models): each request is in
  flight for ``TTFT + response tokens * TPOT``; average and peak concurrency per window come from
  a sweep over arrivals and departures.

Each series is scaled so its mean average concurrency is ``SCALE_INSTANCES`` instances' worth
(ServeGen: its rates are scaled before sampling, so burstiness scales as it would); that makes
"one instance's capacity" (the missed-burst threshold) the same share of every series. WAPE does
not depend on the scale.

ServeGen gaps: windows in which a whole model has no request at all (every one of its 43 to 162
clients at zero at once, between windows of hundreds of requests per second) are collection
gaps, not load; they, and the same windows of that model's clients, are missing (NaN): the
forecasters treat them as unobserved and they are not scored (``gap_windows`` in the JSON).

Evaluation is rolling-origin one step ahead: each window is predicted from the windows before it.
The first ``warmup`` days are not scored (seasonal methods need history). The rest is split in
time: the *tune* part (``TUNE_DAYS`` days after the warmup) is where the mixture's settings
were chosen (``tuning`` in the JSON, see :func:`tune`: which experts take part, and per plane
the weighting's sharpness and memory, by the ratios to last-value and AutoETS on every tune
window of both traces, ServeGen's scored over all its series and over its models alone); the
*held-out* part after it is scored with those settings fixed, and is the result.
statsforecast's AutoETS refits at every window after the warmup, on the
``STATS_DAYS`` days before it (gaps carried forward), so it is scored like every other method
on every window (some 25,000 fits, in parallel, cached by a hash of their inputs in
``STATS_CACHE``; about 10 minutes on two cores the first time). MSTL is slower still, so it
and AutoETS are also scored on ``STATS_ORIGINS`` evenly spaced held-out origins per series,
with every method scored on exactly those origins too, for a like-for-like table.

Methods: ``csp`` (the paper's plain CSP), ``last-value``, ``seasonal-naive``, ``blend`` (a CSP
with corrections across period boundaries, decay 0.8 over 10 windows, 70% last value),
``mixture`` (what the planner runs, :func:`warmserve.policy.planner.csp_params`: an online,
per-series, exponentially weighted mixture of a CSP, last-value, seasonal-naive, the seasonal
delta, recent medians and quantiles, simple exponential smoothing and the same moved by the
seasonal slope, see :class:`warmserve.policy.forecast.MixParams`; for the peak, per series,
the better so far of that mixture at a quantile above the median and the median mixture moved
by a burst shift fitted on its last week of residuals, see
:func:`warmserve.evaluation.batch.mixture_pair`; it learns only from windows before each
prediction), ``auto-ses`` (simple exponential smoothing whose weight each series
picks online, :func:`warmserve.evaluation.batch.auto_ses`: a one-pass stand-in for what
AutoETS fits per window), ``autoets`` and, at the origins, ``mstl``.
``peak_tradeoff`` scores the mixture with other pinball quantiles for its peak plane's quantile
mixture: a higher one predicts higher peaks there, so fewer missed bursts for a larger WAPE.

``bar`` is the mixture's margin over each baseline on the held-out part, with a 95% interval
from a paired block bootstrap (quarter days of a series resampled for both methods at once):
a margin of a few percent over a few days can be noise, and the interval says which.
"""

from __future__ import annotations

import json
import os

import click
import numpy as np

from warmserve.evaluation.scoring import autoets_all, bar, evaluate
from warmserve.evaluation.traces import (
    CAPACITY,
    LATENCY,
    PEAK_Z,
    SAMPLE_DT,
    SCALE_INSTANCES,
    SEED,
    TPOT,
    TTFT,
    load_burstgpt,
    load_servegen,
)
from warmserve.evaluation.tuning import tune
from warmserve.policy.forecast import MixParams


def _plot(results: dict, loaded: dict, path: str) -> None:
    """Per trace: the last two held-out days of its first series, and the peak trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(loaded), 2, figsize=(15, 3.8 * len(loaded)), squeeze=False, width_ratios=(3, 1)
    )
    for row, (source, series) in zip(axes, loaded.items(), strict=True):
        ax = row[0]
        r = results[source]
        preds = r["_preds"]
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
        ax.set_title(f"{source}: {series.names[0]}, last two (held-out) days")
        ax.set_xlabel("hour")
        ax.set_ylabel("concurrent requests")
        ax.legend(fontsize=7, ncol=3)
        ax = row[1]
        curve = [r["peak_tradeoff"][k]["held_out"] for k in r["peak_tradeoff"]]
        ax.plot(
            [c["wape_peak"] for c in curve],
            [c["missed_burst"] for c in curve],
            "o-",
            color="tab:red",
        )
        for k, c in zip(r["peak_tradeoff"], curve, strict=True):
            ax.annotate(f"q{k}", (c["wape_peak"], c["missed_burst"]), fontsize=7)
        base = r.get("held_out_stats_origins", {}).get("scores", {})
        for name, sc in r["held_out"].items():
            if name != "mixture":
                ax.plot(sc["wape_peak"], sc["missed_burst"], "s", color="tab:gray")
                ax.annotate(name, (sc["wape_peak"], sc["missed_burst"]), fontsize=7)
        for name in ("mixture", "autoets", "mstl"):
            if name in base:  # at the statsforecast origins only: a rougher point
                sc = base[name]
                color = "tab:red" if name == "mixture" else "tab:blue"
                ax.plot(sc["wape_peak"], sc["missed_burst"], "^", color=color)
                ax.annotate(f"{name}@origins", (sc["wape_peak"], sc["missed_burst"]), fontsize=7)
        ax.set_title("held out: mixture peak quantile q")
        ax.set_xlabel("WAPE of peak")
        ax.set_ylabel("missed-burst fraction")
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
@click.option("--no-tune", is_flag=True, help="Skip the hyper-parameter search on the tune part.")
@click.option(
    "--servegen-peak",
    type=click.Choice(["sampled", "gaussian"]),
    default="sampled",
    show_default=True,
    help="ServeGen peak definition (see the module docstring).",
)
def eval_(source: str, out: str, png: str, no_stats: bool, no_tune: bool, servegen_peak: str):
    """Rolling-origin one-step evaluation: tune part, held-out part, statsforecast origins."""
    loaders = {
        "servegen": lambda: load_servegen(peak=servegen_peak),
        "burstgpt": load_burstgpt,
    }
    chosen = list(loaders) if source == "all" else [source]
    loaded = {name: loaders[name]() for name in chosen}
    autoets = None if no_stats else {name: autoets_all(s) for name, s in loaded.items()}
    tuning = None if no_tune else tune(loaded, autoets)
    if tuning is not None:
        chosen = tuning["by_expert_set"][tuning["chosen"]]
        click.echo(f"tuning: best {tuning['chosen']} {chosen}")
        click.echo(f"  planner defaults {tuning['planner_defaults']}")
    results = {
        name: evaluate(s, not no_stats, autoets[name] if autoets else None)
        for name, s in loaded.items()
    }
    for name, r in results.items():
        click.echo(f"{name}: {len(r['series'])} series, split {r['split']}")
        for part in ("tune", "held_out"):
            for method, sc in r[part].items():
                click.echo(f"  {part:8s} {method:15s} {sc}")
        for method, sc in r.get("held_out_stats_origins", {}).get("scores", {}).items():
            click.echo(f"  @origins {method:15s} {sc}")
        r["bar"] = bar(r, loaded[name])
    if png:
        _plot(results, loaded, png)
    options = [f"--source {source}", f"--out {out}", f"--png {png}"]
    options += ["--no-stats"] * no_stats + ["--no-tune"] * no_tune
    options += [f"--servegen-peak {servegen_peak}"] * (servegen_peak != "sampled")
    doc = {
        "command": "warmserve forecast eval " + " ".join(options),
        "assumptions": {
            "servegen_latency_s": LATENCY,
            "servegen_peak": servegen_peak,
            "servegen_sample_dt_s": SAMPLE_DT,
            "servegen_seed": SEED,
            "peak_z": PEAK_Z if servegen_peak == "gaussian" else None,
            "burstgpt_ttft_s": TTFT,
            "burstgpt_tpot_s": TPOT,
            "instance_capacity": CAPACITY,
            "mean_avg_concurrency_instances": SCALE_INSTANCES,
            "missed_burst": "actual peak - predicted peak > instance_capacity",
        },
        "planner_mix_params": {
            k: getattr(MixParams(), k) for k in ("eta", "discount", "tau", "recent", "ewma")
        },
        "tuning": tuning,
        "results": {
            n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results.items()
        },
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
