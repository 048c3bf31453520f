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
:func:`warmserve.policy.forecast.mixture_pair`; it learns only from windows before each
prediction), ``auto-ses`` (simple exponential smoothing whose weight each series
picks online, :func:`warmserve.policy.forecast.auto_ses`: a one-pass stand-in for what
AutoETS fits per window), ``autoets`` and, at the origins, ``mstl``.
``peak_tradeoff`` scores the mixture with other pinball quantiles for its peak plane's quantile
mixture: a higher one predicts higher peaks there, so fewer missed bursts for a larger WAPE.

``bar`` is the mixture's margin over each baseline on the held-out part, with a 95% interval
from a paired block bootstrap (quarter days of a series resampled for both methods at once):
a margin of a few percent over a few days can be noise, and the interval says which.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, replace

import click
import numba
import numpy as np

from warmserve.policy import forecast as fc

SERVEGEN = "/work/shared/traces/raw/servegen/servegen_client_windows_long.csv.gz"
BURSTGPT = "/work/shared/traces/raw/burstgpt/BurstGPT_1_first7days.csv"
LATENCY = 2.0  # s, assumed mean latency of a ServeGen request
PEAK_Z = 3.0  # standard deviations from mean to peak, for --servegen-peak gaussian only
TTFT = 0.5  # s, assumed time to first token of a BurstGPT request
TPOT = 0.02  # s, assumed time per output token
CAPACITY = 32  # concurrent requests per instance
STATS_ORIGINS = 144  # statsforecast origins per series, all in the held-out part
STATS_DAYS = 4  # days of history each statsforecast fit sees
SCALE_INSTANCES = 4.0  # mean average concurrency of every series, in instances
TOP_CLIENTS = 4  # ServeGen clients with the highest total rate, evaluated on their own
SAMPLE_DT = 0.1  # s, resolution of the sampled ServeGen arrivals
SEED = 0  # of the sampled ServeGen arrivals (one realisation; series i uses SEED + i)
TUNE_DAYS = {"servegen": 4, "burstgpt": 2}  # after the warmup; the rest is held out
GRID = {  # the mixture's hyper-parameters searched on the tune part
    "eta": (100.0, 300.0, 1000.0, 3000.0, 10_000.0, 30_000.0),
    "discount": (0.9, 0.95, 0.97, 0.99, 0.995, 0.998),
    "tau_peak": (0.5, 0.55, 0.6, 0.65, 0.7),
    "miss_cost": (1.0, 2.0),  # capacities of error a missed burst costs the burst shift
}
STATS_CACHE = os.path.expanduser("~/.cache/warmserve/forecast-stats")
TRADEOFF_TAU = (0.5, 0.55, 0.6, 0.65, 0.7, 0.8)


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
    tune_end: int = 0  # first held-out window
    gaps: int = 0  # windows (over all series) marked missing

    def __post_init__(self) -> None:
        if not self.tune_end:
            self.tune_end = self.warmup + TUNE_DAYS[self.source] * self.period


def _scaled(avg: np.ndarray, peak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = SCALE_INSTANCES * CAPACITY / np.maximum(avg.mean(axis=1, keepdims=True), 1e-12)
    return avg * scale, peak * scale


def load_servegen(path: str = SERVEGEN, peak: str = "sampled") -> Series:
    """Language models of ServeGen, per model and for the largest clients.

    ``peak`` is ``sampled`` (the definition in the module docstring) or ``gaussian`` (the earlier
    one, kept for comparison: the mean plus ``PEAK_Z`` standard deviations, with each client's
    count variance ``rate * LATENCY * cv**2`` from its empirical CV)."""
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path)
    table = table.filter(pc.equal(table["category"], "language"))
    model = table["model"].to_numpy(zero_copy_only=False)
    client = table["client_id"].to_numpy()
    start = table["window_start_s"].to_numpy()
    rate = table["rate_rps"].to_numpy()
    cv = table["cv"].to_numpy()
    dist = table["arrival_dist"].to_numpy(zero_copy_only=False)
    shape = table["dist_param1"].to_numpy()
    win = (start // 600).astype(np.int64)
    t = int(win.max()) + 1
    keys = np.char.add(np.char.add(model.astype(str), "/c"), client.astype(str))
    totals: dict[str, float] = {}
    for k, r in zip(keys, rate, strict=True):
        totals[k] = totals.get(k, 0.0) + r
    groups = [(m, model == m) for m in sorted(set(model))]
    top = sorted(totals, key=lambda k: (-totals[k], k))[:TOP_CLIENTS]
    groups += [(k, keys == k) for k in top]
    names, avgs, peaks = [], [], []
    for i, (name, sel) in enumerate(groups):
        # Scale the rates (not the concurrency), so burstiness scales as it would.
        factor = SCALE_INSTANCES * CAPACITY / LATENCY / (rate[sel].sum() / t)
        r = rate[sel] * factor
        if peak == "gaussian":
            # cv**2 capped at the window's count: the dispersion of all requests at once.
            var = r * LATENCY * np.minimum(cv[sel] ** 2, r * 600.0)
            avg = np.bincount(win[sel], r * LATENCY, t)
            pk = avg + PEAK_Z * np.sqrt(np.bincount(win[sel], var, t))
        else:
            avg, pk = sampled_concurrency(
                win[sel], r, dist[sel], shape[sel], t, 600.0, seed=SEED + i
            )
        names.append(name)
        avgs.append(avg)
        peaks.append(pk)
    avg, pk = np.array(avgs), np.array(peaks)
    # Collection gaps: a whole model without a request in a window (see the module docstring).
    owner = [name.split("/")[0] for name, _ in groups]
    gap = np.array([avg[owner.index(o)] == 0 for o in owner])
    avg[gap] = np.nan
    pk[gap] = np.nan
    return Series("servegen", names, avg, pk, 600.0, 144, 3 * 144, gaps=int(gap.sum()))


def sampled_concurrency(
    win: np.ndarray,
    rate: np.ndarray,
    dist: np.ndarray,
    shape: np.ndarray,
    t: int,
    window: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Average and peak requests in flight per window, from one sampled realisation of
    ServeGen's fitted arrival model (see the module docstring). Rows are client-windows."""
    rng = np.random.default_rng(seed)
    expect = rate * window
    count = np.floor(expect).astype(np.int64)
    count += rng.random(len(count)) < expect - count  # stochastic rounding: the mean is kept
    fitted = (dist == "Gamma") | (dist == "Weibull")
    count[~fitted] = 0  # no fit: ServeGen leaves windows without requests unfitted
    keep = count > 0
    lag = round(LATENCY / SAMPLE_DT)
    per = round(window / SAMPLE_DT)
    arrivals = _sample_arrivals(
        win[keep],
        count[keep],
        shape[keep].astype(float),
        dist[keep] == "Gamma",
        window,
        SAMPLE_DT,
        t * per + lag,
        seed,
    )
    total = np.concatenate([[0.0], np.cumsum(arrivals)])
    in_flight = (total[lag:] - total[:-lag])[: t * per].reshape(t, per)  # arrived in the last L s
    return in_flight.mean(axis=1), in_flight.max(axis=1)


@numba.njit(cache=True)
def _sample_arrivals(win, count, shape, gamma, window, dt, nbins, seed):  # pragma: no cover
    """Arrivals per ``dt`` bin: each client-window's ``count`` arrivals have gaps drawn from
    its fitted family (gamma or Weibull of the given shape), rescaled so that ``count + 1``
    gaps span the window. All gaps underflowing to zero (a tiny gamma shape) is one clump at a
    uniform time."""
    np.random.seed(seed)
    out = np.zeros(nbins)
    buf = np.empty(count.max() + 1 if len(count) else 1)
    for i in range(len(count)):
        n = count[i]
        total = 0.0
        for j in range(n + 1):
            g = np.random.gamma(shape[i], 1.0) if gamma[i] else np.random.weibull(shape[i])
            buf[j] = g
            total += g
        start = win[i] * window
        if total > 0.0 and np.isfinite(total):
            acc = 0.0
            for j in range(n):
                acc += buf[j]
                out[int((start + window * acc / total) / dt)] += 1.0
        else:
            out[int((start + window * np.random.random()) / dt)] += n
    return out


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
        "auto-ses": fc.auto_ses,
    }


def planner_params(period: int, mix: fc.MixParams | None = None) -> fc.CSPParams:
    """The planner's forecaster (:func:`warmserve.policy.planner.csp_params`) at ``period``."""
    mix = mix or fc.MixParams(capacity=CAPACITY)
    return fc.CSPParams(period, 3, 10, decay=0.8, reset=False, mix=mix)


def blend_params(period: int) -> fc.CSPParams:
    """The tuned CSP of the module docstring."""
    return fc.CSPParams(period, periods=3, correction_windows=10, decay=0.8, reset=False, blend=0.7)


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


# Expert sets the tuning chooses between (one for both planes): the mixture without the
# smoothing experts, with ses, and with ses moved by the seasonal slope of a few half widths.
EXPERT_SETS = {
    "base": {"ses": False, "slope": 0},
    "ses": {"ses": True, "slope": 0},
    "ses+slope6": {"ses": True, "slope": 6},
    "ses+slope9": {"ses": True, "slope": 9},
    "ses+slope12": {"ses": True, "slope": 12},
}
LEADING = 4  # ratios recorded per choice, largest first


def _leximin(ratios: list[float]) -> list[float]:
    """The sort key of the tuning: ratios largest first, so the worst decides and ties (the
    worst is often a count of missed bursts, equal across settings) go to the next."""
    return sorted(ratios, reverse=True)


Forecasts = tuple[np.ndarray, np.ndarray]  # average and peak, series x windows


def tune(loaded: dict[str, Series], autoets: dict[str, Forecasts] | None) -> dict:
    """Choose the planner mixture's settings on the tune part of every series.

    A setting is an expert set (``EXPERT_SETS``), then per plane ``eta`` and ``discount``, and
    the peak plane's ``tau`` (of its quantile mixture) and ``miss_cost`` (of its burst shift;
    the shift's window, a week, and the choice between the two are fixed by design, not
    searched). It is scored by its ratio to a baseline, for every trace, baseline
    (last-value and AutoETS, both on every tune window) and measure of the plane (average WAPE;
    peak WAPE and missed bursts). Each plane takes the setting whose ratios, largest first,
    sort lowest (its worst ratio decides, the next breaks ties); the peak plane is tuned over
    the tuned average, which floors it. The expert set is then chosen the same way over both
    planes' ratios. Below 1 everywhere beats both baselines on the tune part. Without
    ``autoets`` (``--no-stats``) last-value is the only baseline.

    Every trace is scored whole, and where it has client series (ServeGen) its models alone
    too: the issue's bar is on the per-model series, and a setting that wins on all series
    may owe it to the clients."""
    pools = {}  # what is scored: every trace, and a trace's models alone where it has clients
    for name, s in loaded.items():
        pools[name] = (name, np.arange(len(s.names)))
        if len(models := model_rows(s)) < len(s.names):
            pools[f"{name} models"] = (name, models)

    def scores(pool: str, preds: Forecasts) -> dict[str, float]:
        """Scores of ``preds`` (the pool's trace, every series) on the pool's tune windows."""
        name, rows = pools[pool]
        s = loaded[name]
        at = np.ix_(rows, np.arange(s.warmup, s.tune_end))
        return _scores(preds[0][at], s.avg[at], preds[1][at], s.peak[at])

    refs: dict = {}  # pool -> baseline -> scores on the tune windows
    for pool, (name, _) in pools.items():
        s = loaded[name]
        refs[pool] = {"last-value": scores(pool, (fc.last_value(s.avg), fc.last_value(s.peak)))}
        if autoets is not None:
            refs[pool]["autoets"] = scores(pool, autoets[name])

    def ratios(preds: dict, measures: tuple[str, ...]) -> dict[str, float]:
        out = {}
        for pool, (name, _) in pools.items():
            mine = scores(pool, preds[name])
            for b, theirs in refs[pool].items():
                for m in measures:
                    out[f"{pool} {m} / {b}"] = mine[m] / theirs[m]
        return out

    def best(rows: list[tuple]) -> tuple:
        return min(rows, key=lambda r: _leximin(list(r[1].values())))

    chosen_sets = {}
    for label, flags in EXPERT_SETS.items():
        stacks = {}
        for name, s in loaded.items():
            params = planner_params(s.period, fc.MixParams(**flags))
            stacks[name] = (fc.experts(s.avg, params), fc.experts(s.peak, params))
        avg_rows = []
        for eta, discount in itertools.product(GRID["eta"], GRID["discount"]):
            mix = fc.MixParams(eta=(eta, eta), discount=(discount, discount), **flags)
            preds = {n: fc.mix_experts(stacks[n][0], s.avg, mix, 0) for n, s in loaded.items()}
            rows = {n: (a, a) for n, a in preds.items()}
            avg_rows.append(((eta, discount), ratios(rows, ("wape_avg",)), preds))
        (eta_a, disc_a), avg_ratios, avg_pred = best(avg_rows)
        peak_rows = []
        for eta, discount in itertools.product(GRID["eta"], GRID["discount"]):
            # What the peak forecast chooses between (fc.mixture_pair): the central mixture
            # moved by its burst shift, per miss cost, and the quantile mixture, per tau.
            mix = fc.MixParams((eta, eta), (discount, discount), capacity=CAPACITY, **flags)
            shifted = {cost: {} for cost in GRID["miss_cost"]}
            for n, s in loaded.items():
                central = fc.mix_experts(stacks[n][1], s.peak, mix, 1, tau=0.5)
                for cost in GRID["miss_cost"]:
                    costed = replace(mix, miss_cost=cost)
                    shifted[cost][n] = fc.shifted_peak(
                        central, s.peak, avg_pred[n], costed, s.period
                    )
            for tau in GRID["tau_peak"]:
                quantile = {
                    n: np.maximum(
                        fc.mix_experts(stacks[n][1], s.peak, mix, 1, tau=tau), avg_pred[n]
                    )
                    for n, s in loaded.items()
                }
                for cost in GRID["miss_cost"]:
                    preds = {
                        n: (
                            avg_pred[n],
                            fc.choose_peak(quantile[n], shifted[cost][n], s.peak, mix.capacity),
                        )
                        for n, s in loaded.items()
                    }
                    setting = (eta, discount, tau, cost)
                    peak_rows.append((setting, ratios(preds, MEASURES[1:]), None))
        (eta_p, disc_p, tau, cost), peak_ratios, _ = best(peak_rows)
        both = avg_ratios | peak_ratios
        chosen_sets[label] = {
            **flags,
            "eta": [eta_a, eta_p],
            "discount": [disc_a, disc_p],
            "tau_peak": tau,
            "miss_cost": cost,
            "leading_ratios": {
                k: round(v, 4) for k, v in sorted(both.items(), key=lambda kv: -kv[1])[:LEADING]
            },
            "_key": _leximin(list(both.values())),
        }
    label = min(chosen_sets, key=lambda k: chosen_sets[k]["_key"])
    best_set = chosen_sets[label]
    default = fc.MixParams()
    planner = {
        "ses": default.ses,
        "slope": default.slope,
        "eta": list(default.eta),
        "discount": list(default.discount),
        "tau_peak": default.tau[1],
        "miss_cost": default.miss_cost,
    }
    for v in chosen_sets.values():
        del v["_key"]
    return {
        "grid": {"experts": EXPERT_SETS, **GRID},
        "objective": "per plane, then over both: the ratios of the mixture to last-value"
        + (" and to AutoETS" if autoets is not None else "")
        + ", on every tune window of every trace (all series, and the models alone), largest"
        + " first (leximin)",
        "baselines": refs,
        "by_expert_set": chosen_sets,
        "chosen": label,
        "planner_defaults": planner,
        "planner_defaults_are_best": all(best_set[k] == v for k, v in planner.items()),
    }


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
    filled = np.nan_to_num(fc._carry_forward(values))  # gaps: the last value seen
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
    preds["mixture"] = fc.mixture_pair(series.avg, series.peak, params)
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
        a, p = fc.mixture_pair(series.avg, series.peak, replace(params, mix=mix))
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
            k: getattr(fc.MixParams(), k) for k in ("eta", "discount", "tau", "recent", "ewma")
        },
        "tuning": tuning,
        "results": {
            n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results.items()
        },
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
