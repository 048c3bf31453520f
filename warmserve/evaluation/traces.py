"""The traces ``warmserve forecast eval`` scores forecasters on (the module docstring of
:mod:`warmserve.evaluation.cli` says how each series is built): ServeGen's per-client windows
with peaks sampled from its own arrival model, and BurstGPT's per-request arrivals, as average
and peak concurrency per window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

SERVEGEN = "/work/shared/traces/raw/servegen/servegen_client_windows_long.csv.gz"
BURSTGPT = "/work/shared/traces/raw/burstgpt/BurstGPT_1_first7days.csv"
LATENCY = 2.0  # s, assumed mean latency of a ServeGen request
PEAK_Z = 3.0  # standard deviations from mean to peak, for --servegen-peak gaussian only
TTFT = 0.5  # s, assumed time to first token of a BurstGPT request
TPOT = 0.02  # s, assumed time per output token
CAPACITY = 32  # concurrent requests per instance
SCALE_INSTANCES = 4.0  # mean average concurrency of every series, in instances
TOP_CLIENTS = 4  # ServeGen clients with the highest total rate, evaluated on their own
SAMPLE_DT = 0.1  # s, resolution of the sampled ServeGen arrivals
SEED = 0  # of the sampled ServeGen arrivals (one realisation; series i uses SEED + i)
TUNE_DAYS = {"servegen": 4, "burstgpt": 2}  # after the warmup; the rest is held out

Forecasts = tuple[np.ndarray, np.ndarray]  # average and peak, series x windows


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
