"""How much of ServeGen's peak error can any forecaster remove?

``warmserve forecast eval`` takes each ServeGen window's peak from one sampled realisation of the
trace's arrival model (``warmserve.evaluation.traces.SEED``). Part of that peak is sampling noise
that no forecaster can predict, even one that knew the window's rates in advance. This samples
``--draws`` more realisations of the same rates and predicts every window's peak of the eval's
realisation as the median of the other draws' peaks there: the *rate oracle*, which knows the future
rates of every client and is wrong only by the sampling. Its held-out WAPE is about the floor of the
peak's WAPE on these series (the median of the draws is what minimises the expected absolute error,
up to the draws' own spread). The forecasters' WAPE above it is the part a better forecast could
remove; the JSON gives each method's share of that part against AutoETS's.

    python bench/forecast_peak_floor.py [--draws 8] [--jobs 2]

The *average oracle* knows less: each window's actual average (its total rate), not how bursty
its clients are; it predicts the peak as that average plus the median excess of the peak over
the average in the 6 windows before. The gap between the two oracles is what the window's
burstiness (its fitted inter-arrival shapes) adds to the peak.

AutoETS comes from the eval's cache (fitted at every window the first time, about 10 minutes).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import click
import numpy as np

from warmserve.evaluation import batch, scoring, traces

OUT = "bench/results/forecast_peak_floor.json"
DRAW_SEED = 1000  # draw j samples with SEED + DRAW_SEED * (j + 1), far from the eval's seeds


def peaks(seed: int) -> np.ndarray:
    """Peaks (series x windows) of the realisation ``seed`` (gaps NaN, as in the eval)."""
    traces.SEED = seed
    return traces.load_servegen().peak


@click.command()
@click.option("--draws", default=8, show_default=True, help="Extra realisations sampled.")
@click.option("--jobs", default=2, show_default=True, help="Processes sampling them.")
def main(draws: int, jobs: int) -> None:
    if draws < 2:
        raise click.BadParameter("needs at least 2 draws for a median", param_hint="--draws")
    t0 = time.perf_counter()
    s = traces.load_servegen()
    seeds = [traces.SEED + DRAW_SEED * (j + 1) for j in range(draws)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        drawn = np.stack(list(pool.map(peaks, seeds)))
    # A window can be a collection gap in one draw and not in another (stochastic rounding of
    # a tiny rate): the median is over the draws that have it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: gaps in every draw
        oracle = np.nan_to_num(np.nanmedian(drawn, axis=0))
    avg_ets, peak_ets = scoring.autoets_all(s)
    mix_avg, mix_peak = batch.mixture_pair(s.avg, s.peak, scoring.planner_params(s.period))
    preds = {
        "rate-oracle": (s.avg, oracle),  # the average of a window is its rate: known exactly
        "average-oracle": (s.avg, s.avg + batch.recent_quantile(s.peak - s.avg, 6, 0.5)),
        "mixture": (mix_avg, mix_peak),
        "autoets": (avg_ets, peak_ets),
        "auto-ses": (batch.auto_ses(s.avg), batch.auto_ses(s.peak)),
        "last-value": (batch.last_value(s.avg), batch.last_value(s.peak)),
    }
    results = {}
    for where, scores in scoring.held_out_scores(s, preds).items():
        floor = scores["rate-oracle"]["wape_peak"]
        above = {n: sc["wape_peak"] - floor for n, sc in scores.items() if "oracle" not in n}
        results[where] = {
            "wape_peak": {n: sc["wape_peak"] for n, sc in scores.items()},
            "missed_burst": {n: sc["missed_burst"] for n, sc in scores.items()},
            "wape_peak_above_floor": {n: round(v, 4) for n, v in above.items()},
            "above_floor_relative_to_autoets": {
                n: round(v / above["autoets"], 4) for n, v in above.items()
            },
        }
        click.echo(f"{where}: peak WAPE {results[where]['wape_peak']}")
        click.echo(
            f"  above the floor, relative to AutoETS: "
            f"{results[where]['above_floor_relative_to_autoets']}"
        )
    doc = {
        "command": "python " + " ".join(sys.argv),
        "servegen_seed": traces.SEED,
        "draw_seeds": seeds,
        "held_out_windows": [s.tune_end, s.avg.shape[1]],
        "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
