"""Scores of the forecasters on a trace's series (rolling origin, one step ahead): WAPE of
the average and of the peak and the missed-burst fraction, on the tune and held-out windows and
at the statsforecast origins (:func:`evaluate`), and the mixture's margin over each baseline
with a paired block-bootstrap interval (:func:`bar`)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace

import click
import numpy as np

from warmserve.evaluation import batch
from warmserve.evaluation.traces import CAPACITY, Forecasts, Series
from warmserve.policy.forecast import CSPParams, MixParams

STATS_ORIGINS = 144  # statsforecast origins per series, all in the held-out part
STATS_DAYS = 4  # days of history each statsforecast fit sees
STATS_CACHE = os.path.expanduser("~/.cache/warmserve/forecast-stats")
TRADEOFF_TAU = (0.5, 0.55, 0.6, 0.65, 0.7, 0.8)


def methods(period: int) -> dict:
    """The cheap forecasters, as functions of a models x windows history."""
    return {
        "csp": lambda h: batch.csp(h, CSPParams(period)),
        "last-value": batch.last_value,
        "seasonal-naive": lambda h: batch.seasonal_naive(h, period),
        "blend": lambda h: batch.csp(h, blend_params(period)),
        "auto-ses": batch.auto_ses,
    }


def planner_params(period: int, mix: MixParams | None = None) -> CSPParams:
    """The planner's forecaster (:func:`warmserve.policy.planner.csp_params`) at ``period``."""
    mix = mix or MixParams(capacity=CAPACITY)
    return CSPParams(period, 3, 10, decay=0.8, reset=False, mix=mix)


def blend_params(period: int) -> CSPParams:
    """The tuned CSP of the module docstring."""
    return CSPParams(period, periods=3, correction_windows=10, decay=0.8, reset=False, blend=0.7)


def _window_parts(
    pred: np.ndarray, actual: np.ndarray, pred_peak: np.ndarray, actual_peak: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The windows observed, and per window what the three measures sum (see
    :func:`_measures`): absolute error and actual of the average, of the peak, a missed burst
    (1 or 0), and the window itself (1)."""
    ok = ~np.isnan(actual) & ~np.isnan(actual_peak)
    parts = [
        np.abs(pred - actual),
        actual,
        np.abs(pred_peak - actual_peak),
        actual_peak,
        (actual_peak - pred_peak > CAPACITY).astype(float),
        np.ones_like(actual),
    ]
    return ok, parts


def _measures(sums: np.ndarray) -> np.ndarray:
    """WAPE of average, WAPE of peak and missed-burst fraction from the sums of
    :func:`_window_parts` (last axis)."""
    return np.stack(
        [sums[..., 0] / sums[..., 1], sums[..., 2] / sums[..., 3], sums[..., 4] / sums[..., 5]],
        axis=-1,
    )


def _scores(pred: np.ndarray, actual: np.ndarray, pred_peak, actual_peak) -> dict[str, float]:
    """WAPE of average and peak, and the missed-burst fraction, over windows observed."""
    ok, parts = _window_parts(pred, actual, pred_peak, actual_peak)
    wape_avg, wape_peak, missed = (
        float(v) for v in _measures(np.array([x[ok].sum() for x in parts]))
    )
    return {
        "wape_avg": round(wape_avg, 4),
        "wape_peak": round(wape_peak, 4),
        "accuracy_avg": round(1 - wape_avg, 4),
        "accuracy_peak": round(1 - wape_peak, 4),
        "missed_burst": round(missed, 4),
        "windows": int(ok.sum()),
    }


MEASURES = ("wape_avg", "wape_peak", "missed_burst")


def held_out_scores(series: Series, preds: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Scores of each ``name: (avg, peak)`` prediction on the held-out windows of ``series``,
    over the per-model series (``models_only``, the issue's) and over every series."""
    held = np.arange(series.tune_end, series.avg.shape[1])
    rows = {
        "models_only": model_rows(series),
        "all_series": list(range(len(series.names))),
    }
    out = {}
    for where, r in rows.items():
        at = np.ix_(r, held)
        out[where] = {
            n: _scores(a[at], series.avg[at], p[at], series.peak[at]) for n, (a, p) in preds.items()
        }
    return out


def model_rows(series: Series) -> np.ndarray:
    """Rows of ``series`` that are models (ServeGen's client series are ``model/client``): the
    rows the issue's bar is on."""
    return np.array([i for i, n in enumerate(series.names) if "/" not in str(n)], dtype=np.int64)


def _part(s: Series, part: str) -> slice:
    t = s.avg.shape[1]
    return slice(s.warmup, s.tune_end) if part == "tune" else slice(s.tune_end, t)


def _part_scores(s: Series, pred: np.ndarray, pred_peak: np.ndarray, part: str) -> dict:
    w = _part(s, part)
    return _scores(pred[:, w], s.avg[:, w], pred_peak[:, w], s.peak[:, w])


def _stats(
    series: Series, values: np.ndarray, origins: np.ndarray, names=("autoets", "mstl")
) -> dict[str, np.ndarray]:
    """AutoETS and MSTL one-step forecasts at ``origins`` (series x origins). A fit depends only
    on its inputs, so each row's forecasts are kept under ``STATS_CACHE``, named by a hash of
    the model, the statsforecast version, the series values and the origins."""
    import statsforecast
    from statsforecast.models import MSTL, AutoETS

    models = {
        "autoets": lambda: AutoETS(season_length=1),
        "mstl": lambda: MSTL(season_length=series.period, trend_forecaster=AutoETS(model="ZZN")),
    }
    filled = np.nan_to_num(batch.carry_forward(values))  # gaps: the last value seen
    span = STATS_DAYS * series.period
    out = {name: np.zeros((values.shape[0], len(origins))) for name in names}
    for name in names:
        make = models[name]
        for i in range(values.shape[0]):
            key = hashlib.sha256(
                f"{name} {statsforecast.__version__} {span} {series.period}".encode()
                + filled[i].tobytes()
                + np.asarray(origins, np.int64).tobytes()
            ).hexdigest()[:24]
            path = os.path.join(STATS_CACHE, f"{key}.npy")
            if os.path.exists(path):
                out[name][i] = np.load(path)
                continue
            for k, t in enumerate(origins):
                y = filled[i, max(0, t - span) : t]
                try:
                    out[name][i, k] = max(0.0, float(make().forecast(y=y, h=1)["mean"][0]))
                except Exception:  # a fit that fails to converge counts as a last-value forecast
                    out[name][i, k] = y[-1]
            os.makedirs(STATS_CACHE, exist_ok=True)
            np.save(path, out[name][i])
    return out


def autoets_all(series: Series) -> Forecasts:
    """AutoETS one-step forecasts of average and peak at every window after the warmup (NaN
    before it), each from the ``STATS_DAYS`` days before it. That is a fit per window and
    series (some 25,000 on both traces), so rows are fitted in parallel, one process per core
    (spawned: the parent's numba threads must not be forked), and cached (:func:`_stats`)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    t = series.avg.shape[1]
    origins = np.arange(series.warmup, t)
    jobs = [(series, plane, row, origins) for plane in (0, 1) for row in range(len(series.names))]
    out = np.full((2, *series.avg.shape), np.nan)
    with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("spawn")) as pool:
        for done, ((_, plane, row, _), fit) in enumerate(
            zip(jobs, pool.map(_autoets_row, jobs), strict=True), 1
        ):
            out[plane, row, origins] = fit
            click.echo(f"  AutoETS {series.source}: {done}/{len(jobs)} series fitted", err=True)
    return out[0], np.maximum(out[1], 0.0)


def _autoets_row(job: tuple[Series, int, int, np.ndarray]) -> np.ndarray:
    series, plane, row, origins = job
    values = (series.avg if plane == 0 else series.peak)[row : row + 1]
    return _stats(series, values, origins, ("autoets",))["autoets"][0]


def evaluate(series: Series, stats: bool = True, autoets: Forecasts | None = None) -> dict:
    """Scores of every method on ``series``: tune and held-out windows (AutoETS too, given its
    forecasts at every window), and the statsforecast origins (held out)."""
    t = series.avg.shape[1]
    preds = {name: (f(series.avg), f(series.peak)) for name, f in methods(series.period).items()}
    params = planner_params(series.period)
    preds["mixture"] = batch.mixture_pair(series.avg, series.peak, params)
    if autoets is not None:
        preds["autoets"] = autoets
    result: dict = {
        "series": [str(n) for n in series.names],
        "window_s": series.window,
        "windows": t,
        "gap_windows": series.gaps,
        "split": {
            "warmup": [0, series.warmup],
            "tune": [series.warmup, series.tune_end],
            "held_out": [series.tune_end, t],
        },
    }
    for part in ("tune", "held_out"):
        result[part] = {n: _part_scores(series, a, p, part) for n, (a, p) in preds.items()}
    # The bar of the issue is on per-model series (ServeGen's largest clients are extra rows).
    models = model_rows(series)
    sub_series = replace(series, avg=series.avg[models], peak=series.peak[models])
    result["held_out_models_only"] = {
        n: _part_scores(sub_series, a[models], p[models], "held_out") for n, (a, p) in preds.items()
    }
    w = _part(series, "held_out")
    result["held_out_by_series"] = {
        str(name): {
            n: {
                k: v
                for k, v in _scores(
                    a[i : i + 1, w],
                    series.avg[i : i + 1, w],
                    p[i : i + 1, w],
                    series.peak[i : i + 1, w],
                ).items()
                if k in MEASURES
            }
            for n, (a, p) in preds.items()
        }
        for i, name in enumerate(series.names)
    }
    tradeoff = {}
    for tau in TRADEOFF_TAU:
        mix = replace(params.mix, tau=(params.mix.tau[0], tau))
        a, p = batch.mixture_pair(series.avg, series.peak, replace(params, mix=mix))
        tradeoff[str(tau)] = {
            part: {k: v for k, v in _part_scores(series, a, p, part).items() if k != "windows"}
            for part in ("tune", "held_out")
        }
    result["peak_tradeoff"] = tradeoff
    if stats:
        origins = np.linspace(series.tune_end, t - 1, STATS_ORIGINS).round().astype(np.int64)
        started = time.perf_counter()
        # AutoETS at every window (``autoets``) holds these origins' fits already.
        names = ("mstl",) if "autoets" in preds else ("autoets", "mstl")
        fa = _stats(series, series.avg, origins, names)
        fp = _stats(series, series.peak, origins, names)
        sub = {name: (a[:, origins], p[:, origins]) for name, (a, p) in preds.items()}
        stats_preds = {name: (fa[name], np.maximum(fp[name], 0.0)) for name in fa}
        sub |= stats_preds
        result["_origins"], result["_stats_preds"] = origins, stats_preds
        actual_a, actual_p = series.avg[:, origins], series.peak[:, origins]
        result["held_out_stats_origins"] = {
            "origins_per_series": STATS_ORIGINS,
            "fit_days": STATS_DAYS,
            "seconds": round(time.perf_counter() - started, 1),
            "scores": {n: _scores(a, actual_a, p, actual_p) for n, (a, p) in sub.items()},
            "scores_models_only": {
                n: _scores(a[models], actual_a[models], p[models], actual_p[models])
                for n, (a, p) in sub.items()
            },
        }
    result["_preds"] = preds
    return result


BOOT_RESAMPLES = 2000  # paired block-bootstrap resamples behind each margin's interval
BOOT_SEED = 0
# Bootstrap blocks: a quarter day of one series. Errors of neighbouring windows correlate (a
# level shift is missed for several windows), so windows are not resampled one by one; whole
# days would leave BurstGPT's held-out part (3 days, 2 models) with 6 blocks.
BOOT_BLOCK_S = 6 * 3600.0


def _block_sums(
    series: Series, a: np.ndarray, p: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Per block (``BOOT_BLOCK_S`` of one series) of the windows ``cols`` of ``rows``: the sums
    of :func:`_window_parts`. ``a`` and ``p`` are predictions for exactly those rows and
    columns."""
    act_a, act_p = series.avg[np.ix_(rows, cols)], series.peak[np.ix_(rows, cols)]
    ok, parts = _window_parts(a, act_a, p, act_p)
    span = cols // max(1, round(BOOT_BLOCK_S / series.window))  # the block of each window
    block = np.arange(len(rows))[:, None] * (span.max() + 1) + (span - span.min())[None, :]
    block = np.broadcast_to(block, ok.shape)[ok]
    _, idx = np.unique(block, return_inverse=True)
    return np.stack([np.bincount(idx, x[ok]) for x in parts], axis=1)


def _intervals(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """95% intervals (measures x 2) of the relative difference mine / theirs - 1, by a paired
    bootstrap over blocks (``BOOT_BLOCK_S`` of one series): a block is resampled for both
    methods at once, so what both get wrong there cancels, and stays whole, since errors
    correlate across neighbouring windows."""
    rng = np.random.default_rng(BOOT_SEED)
    pick = rng.integers(0, len(mine), (BOOT_RESAMPLES, len(mine)))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = _measures(mine[pick].sum(axis=1)) / _measures(theirs[pick].sum(axis=1)) - 1.0
    return np.nanpercentile(rel, [2.5, 97.5], axis=0).T


def bar(result: dict, series: Series) -> dict:
    """For each measure, the mixture's margin over every baseline on the held-out windows (all
    of them for the cheap baselines, the statsforecast origins for every one): the relative
    difference, negative where the mixture is better, and its 95% interval from a paired block
    bootstrap over quarter days of each series (:func:`_intervals`). ``beaten`` is the point
    estimate; ``clear`` says whether the interval excludes zero ("better", "worse") or not
    ("tie")."""
    out = {}
    preds = result["_preds"]
    held = np.arange(series.tune_end, series.avg.shape[1])
    everyone = np.arange(len(series.names))
    models = model_rows(series)
    rows = {
        "all_held_out": (result["held_out"], everyone, held, preds),
        "models_only": (result["held_out_models_only"], models, held, preds),
    }
    if "held_out_stats_origins" in result:
        origins = result["_origins"]
        at = {n: (a[:, origins], p[:, origins]) for n, (a, p) in preds.items()}
        at |= result["_stats_preds"]
        scores = result["held_out_stats_origins"]
        rows["stats_origins"] = (scores["scores"], everyone, origins, at)
        rows["stats_origins_models_only"] = (scores["scores_models_only"], models, origins, at)
    for where, (scores, rws, cols, pr) in rows.items():
        mine = scores["mixture"]
        full = pr is preds  # predictions over every window, else over ``cols`` alone

        def sums(name: str, rws=rws, cols=cols, pr=pr, full=full) -> np.ndarray:
            a, p = pr[name]
            a, p = (a[np.ix_(rws, cols)], p[np.ix_(rws, cols)]) if full else (a[rws], p[rws])
            return _block_sums(series, a, p, rws, cols)

        ours = sums("mixture")
        for other in ("last-value", "seasonal-naive", "csp", "auto-ses", "autoets", "mstl"):
            if other not in scores:
                continue
            ci = _intervals(ours, sums(other))
            for k, m in enumerate(MEASURES):
                theirs = scores[other][m]
                rel = (mine[m] - theirs) / theirs if theirs else 0.0
                lo, hi = (round(float(x), 4) for x in ci[k])
                out.setdefault(where, {}).setdefault(other, {})[m] = {
                    "mixture": mine[m],
                    "baseline": theirs,
                    "relative": round(rel, 4),
                    "ci95": [lo, hi],
                    "beaten": mine[m] < theirs,
                    "clear": "better" if hi < 0 else "worse" if lo > 0 else "tie",
                }
    return out
