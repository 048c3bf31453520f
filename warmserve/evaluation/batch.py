"""The batch forms of the planner's forecaster, over a ``models x windows`` array: the
one-step-ahead prediction of every window from the windows before it, for
``warmserve forecast eval`` to score and ``warmserve report`` to plot.

The same arithmetic as the online :class:`~warmserve.policy.forecast.Forecaster`, in numpy
(one pass over windows), plus the baselines the evaluation scores it against: the plain CSP,
last value, seasonal-naive, recent quantiles and means, simple exponential smoothing.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np

from warmserve.policy.forecast.params import SES_ALPHAS, SES_DISCOUNT, CSPParams, MixParams
from warmserve.policy.forecast.shift import (
    MIN_WINDOWS,
    SHIFT_COLUMNS,
    SHIFT_STEPS,
    best_shift,
    bin_add,
    takes_shift,
    tally,
)


def seasonal_part(history: np.ndarray, period: int, periods: int) -> np.ndarray:
    """Mean of each window over the previous ``periods`` periods; NaN where none was seen."""
    m, t = history.shape
    total = np.zeros((m, t))
    count = np.zeros((m, t))
    for k in range(1, periods + 1):
        lag = k * period
        if lag >= t:
            break
        past = history[:, : t - lag]
        ok = ~np.isnan(past)
        total[:, lag:] += np.where(ok, past, 0.0)
        count[:, lag:] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def last_value(history: np.ndarray) -> np.ndarray:
    """Predict each window as the last observed one before it (0 before any observation)."""
    m, t = history.shape
    out = np.zeros((m, t))
    filled = carry_forward(history)
    out[:, 1:] = filled[:, :-1]
    return np.nan_to_num(out)


def seasonal_naive(history: np.ndarray, period: int) -> np.ndarray:
    """Predict each window as the same window one period ago; last value before that."""
    out = last_value(history)
    if period < history.shape[1]:
        past = history[:, :-period]
        out[:, period:] = np.where(np.isnan(past), out[:, period:], past)
    return out


def csp(history: np.ndarray, params: CSPParams) -> np.ndarray:
    """One-step-ahead CSP predictions for every window of ``history`` (models x windows)."""
    m, t = history.shape
    seasonal = np.nan_to_num(seasonal_part(history, params.period, params.periods))
    error = history - seasonal  # NaN where the window is missing
    within = np.arange(t) % params.period if params.reset else np.arange(t)
    num = np.zeros((m, t))
    den = np.zeros((m, t))
    weight = 1.0
    for j in range(1, params.correction_windows + 1):
        if j >= t + 1:
            break
        past = np.full((m, t), np.nan)
        past[:, j:] = error[:, : t - j]
        ok = ~np.isnan(past) & (within >= j)
        num += np.where(ok, weight * past, 0.0)
        den += ok * weight
        weight *= params.decay
    with np.errstate(invalid="ignore", divide="ignore"):
        correction = np.where(den > 0, num / den, 0.0)
    pred = np.maximum(seasonal + correction, 0.0)
    if params.blend:
        pred = (1.0 - params.blend) * pred + params.blend * last_value(history)
    return pred


def quantile0(values: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile along axis 0 (linear interpolation), ignoring NaN; NaN where all
    are. Axis 0 is short (a few windows), so an odd-even transposition sort of whole slices
    (NaN as +inf, sorted last) beats ``np.sort`` along a strided axis and ``np.nanquantile``,
    which loops in Python along the axis when NaN are present."""
    if q >= 1.0:
        return np.fmax.reduce(values, axis=0)
    missing = np.isnan(values)
    gaps = bool(missing.any())
    rows = [np.where(np.isnan(v), np.inf, v) for v in values] if gaps else list(values)
    k = len(rows)
    for r in range(k):
        for i in range(r % 2, k - 1, 2):
            rows[i], rows[i + 1] = (
                np.minimum(rows[i], rows[i + 1]),
                np.maximum(rows[i], rows[i + 1]),
            )
    if not gaps:  # the same position in every column
        pos = q * (k - 1)
        lo = int(pos)
        return rows[lo] + (pos - lo) * (rows[min(lo + 1, k - 1)] - rows[lo])
    ordered = np.stack(rows)
    n = k - missing.sum(axis=0)
    pos = q * np.maximum(n - 1, 0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    a = np.take_along_axis(ordered, lo[None], 0)[0]
    b = np.take_along_axis(ordered, hi[None], 0)[0]
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, a + (pos - lo) * (b - a), np.nan)


def recent_quantile(history: np.ndarray, windows: int, q: float) -> np.ndarray:
    """Predict each window as the ``q`` quantile of the ``windows`` windows before it (missing
    ones ignored); last value where all of them are missing."""
    m, t = history.shape
    lagged = np.full((windows, m, t), np.nan)
    for j in range(1, min(windows, t - 1) + 1):  # lags past the start stay missing
        lagged[j - 1, :, j:] = history[:, : t - j]
    out = quantile0(lagged, q)
    return np.where(np.isnan(out), last_value(history), out)


def recent_ewma(history: np.ndarray, alpha: float, windows: int) -> np.ndarray:
    """Predict each window as the mean of the ``windows`` windows before it, weighted
    ``alpha * (1 - alpha) ** age`` over those observed; last value where none was."""
    m, t = history.shape
    num = np.zeros((m, t))
    den = np.zeros((m, t))
    for j in range(1, min(windows, t - 1) + 1):  # lags past the start see nothing
        past = np.full((m, t), np.nan)
        past[:, j:] = history[:, : t - j]
        ok = ~np.isnan(past)
        w = alpha * (1.0 - alpha) ** (j - 1)
        num += np.where(ok, w * past, 0.0)
        den += ok * w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, last_value(history))


def auto_ses(
    history: np.ndarray, alphas: tuple[float, ...] = SES_ALPHAS, discount: float = SES_DISCOUNT
) -> np.ndarray:
    """Simple exponential smoothing whose smoothing weight each series picks online: every
    window is predicted by the ``alphas`` member with the least absolute one-step error so far
    (discounted by ``discount`` per window, about ``1 / (1 - discount)`` windows of memory).

    This is what statsforecast's AutoETS mostly amounts to on these traces (a level model with
    its weight fitted on the last days), computed in one pass instead of a fit per window, so
    the planner can run it online (:class:`Forecaster` keeps its levels and errors). A missing
    window updates nothing; a series is predicted 0 until its first observation."""
    m, t = history.shape
    a = np.asarray(alphas, float)[:, None]
    level = np.full((len(alphas), m), np.nan)
    loss = np.zeros((len(alphas), m))
    out = np.zeros((m, t))
    cols = np.arange(m)
    for i in range(t):
        pred = np.nan_to_num(level)
        out[:, i] = pred[loss.argmin(axis=0), cols]
        x = history[:, i]
        seen = ~np.isnan(x)
        first = np.isnan(level)
        loss = np.where(seen & ~first, discount * loss + np.abs(x - pred), loss)
        level = np.where(seen, np.where(first, x, level + a * (x - level)), level)
    return out


def seasonal_slope(history: np.ndarray, period: int, periods: int, half: int) -> np.ndarray:
    """How load usually changes into each window at its time of day: over each of the previous
    ``periods`` periods, the mean change per window across the ``2 * half + 1`` windows centred
    on the same window (``(x[w + half] - x[w - half - 1]) / (2 * half + 1)`` at ``w`` one
    period back, two, ...), averaged over the periods whose two ends were observed; 0 where
    none was.

    At 600 s one window's change is mostly noise; a daily ramp shows across a couple of hours,
    so the change is taken across many windows. ``half`` is capped at ``period - 1``, so every
    window read is before the one predicted."""
    half = min(half, period - 1)
    m, t = history.shape
    total = np.zeros((m, t))
    count = np.zeros((m, t))
    idx = np.arange(t)
    for k in range(1, periods + 1):
        hi, lo = idx - k * period + half, idx - k * period - half - 1
        at = np.flatnonzero(lo >= 0)
        diff = history[:, hi[at]] - history[:, lo[at]]
        ok = ~np.isnan(diff)
        total[:, at] += np.where(ok, diff, 0.0)
        count[:, at] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / (count * (2 * half + 1)), 0.0)


def experts(history: np.ndarray, params: CSPParams) -> np.ndarray:
    """One-step predictions of every expert of the mixture (experts x models x windows), in the
    order :class:`Forecaster` computes them (see :class:`MixParams`)."""
    mix = params.mix or MixParams()
    plain = replace(params, blend=0.0)
    e = [
        last_value(history),
        seasonal_naive(history, params.period),
        csp(history, plain),
        csp(history, replace(plain, correction_windows=1, reset=False)),
        *(recent_quantile(history, n, q) for n, q in mix.recent),
        recent_ewma(history, *mix.ewma),
    ]
    if mix.ses:
        e.append(auto_ses(history))
    if mix.slope:
        slope = seasonal_slope(history, params.period, params.periods, mix.slope)
        e.append(np.maximum(e[-1] + slope, 0.0))
    return np.stack([*e, np.mean(e, axis=0)])


def mixture(history: np.ndarray, params: CSPParams, plane: int = 0) -> np.ndarray:
    """One-step predictions of the expert mixture for every window of ``history``.

    Each expert's pinball loss (quantile ``mix.tau[plane]``: 0 = average, 1 = peak; ``eta`` and
    ``discount`` are the plane's too) is summed with weights ``discount ** age`` over the
    windows observed so far, as is the observed load (the level); an expert's weight is
    ``exp(-eta * (its loss - the least loss) / level)``, so the mixture is scale free: it
    learns online, per series, from the windows before the one it predicts. Missing windows
    teach nothing. A pinball quantile above one half biases a forecast upward (fewer missed
    bursts for a larger error), which the peak plane uses.

    This is the batch form (numpy, one pass over windows); :class:`Forecaster` computes the
    same numbers online.
    """
    return mix_experts(experts(history, params), history, params.mix or MixParams(), plane)


def mix_experts(
    e: np.ndarray, history: np.ndarray, mix: MixParams, plane: int, tau: float | None = None
) -> np.ndarray:
    """The weighting of :func:`mixture` over any stack of expert predictions (experts x models
    x windows), so ``warmserve forecast eval`` can score candidate experts before the online
    kernels learn them. ``tau`` overrides the plane's quantile (the central peak mixture)."""
    eta, discount = mix.eta[plane], mix.discount[plane]
    tau = mix.tau[plane] if tau is None else tau
    k, m, t = e.shape
    loss = np.zeros((k, m))
    level = np.zeros(m)
    out = np.zeros((m, t))
    for i in range(t):
        out[:, i] = (_weights(loss, level, eta) * e[:, :, i]).sum(axis=0)
        seen = ~np.isnan(history[:, i])
        err = history[:, i] - e[:, :, i]
        pin = np.maximum(tau * err, (tau - 1.0) * err)
        loss = np.where(seen, discount * loss + np.nan_to_num(pin), loss)
        level = np.where(seen, discount * level + np.abs(np.nan_to_num(history[:, i])), level)
    return out


def mixture_pair(
    avg: np.ndarray, peak: np.ndarray, params: CSPParams
) -> tuple[np.ndarray, np.ndarray]:
    """What :class:`Forecaster` predicts for ``avg`` and ``peak`` histories: the mixture of
    the averages, and for the peaks the better so far of two forecasts (:func:`choose_peak`):
    the quantile mixture, and the central mixture moved by its burst shift
    (:func:`burst_shift`); each peak raised to the average where it falls below it."""
    mix = params.mix or MixParams()
    a = mixture(avg, params, 0)
    e = experts(peak, params)
    quantile = np.maximum(mix_experts(e, peak, mix, 1), a)
    central = mix_experts(e, peak, mix, 1, tau=0.5)
    shifted = shifted_peak(central, peak, a, mix, params.period)
    return a, choose_peak(quantile, shifted, peak, mix.capacity)


def shifted_peak(
    central: np.ndarray, peak: np.ndarray, avg: np.ndarray, mix: MixParams, period: int
) -> np.ndarray:
    """The central peak forecast moved by its burst shift, never below the average forecast
    ``avg``: one of the two peak forecasts :func:`choose_peak` takes from."""
    return np.maximum(central + burst_shift(central, peak, mix, period), avg)


@numba.njit(cache=True, nogil=True)
def _burst_shift(central, peak, n, cost, capacity, out):  # pragma: no cover (compiled)
    """Batch :func:`burst_shift` for one series: after each observed window, the shift from
    the residuals of the observed windows among the last ``n``, binned as they come and go (the
    oldest leave first, then the newest comes in, as in :func:`refit_shift`)."""
    t = central.shape[0]
    step = capacity / SHIFT_STEPS
    cnt = np.zeros((2, SHIFT_COLUMNS))
    wins = np.empty(t, np.int64)  # observed windows in order, and their residuals
    vals = np.empty(t)
    head = 0
    tail = 0
    shift = 0.0
    for j in range(t):
        out[j] = shift
        if np.isnan(peak[j]):
            continue
        while head < tail and wins[head] <= j - n:
            bin_add(cnt, vals[head], -1.0, step)
            head += 1
        v = peak[j] - central[j]
        wins[tail] = j
        vals[tail] = v
        tail += 1
        bin_add(cnt, v, 1.0, step)
        if tail - head >= MIN_WINDOWS:
            shift = best_shift(cnt, cost, capacity)


def burst_shift(central: np.ndarray, peak: np.ndarray, mix: MixParams, period: int) -> np.ndarray:
    """The shift (series x windows) the central peak forecast takes to miss fewer bursts.

    A missed burst is a peak more than one instance's capacity above its forecast: requests
    that wait for a start. The shift minimises, over the residuals (peak minus central
    forecast) of the last ``mix.shift_periods`` periods, the absolute error plus ``miss_cost``
    capacities per missed burst: the median of the residuals where the capacity is small
    against their spread, raised where a little more height turns many misses into hits. A
    quantile would raise a broad series as much as a narrow one; this spends error where it
    buys hits. Zero until ``MIN_WINDOWS`` residuals were seen.

    The shift is a multiple of ``capacity / SHIFT_STEPS`` within ``SHIFT_REACH`` capacities of
    zero (:func:`best_shift`): residuals then need only a count and a sum per step, so a
    window costs the same whatever the week holds (a sorted week of residuals per model cost
    about 90 ms a window for 10,000 models, this a few)."""
    out = np.zeros(central.shape)
    cost = mix.miss_cost * mix.capacity
    for i in range(central.shape[0]):
        _burst_shift(central[i], peak[i], mix.shift_periods * period, cost, mix.capacity, out[i])
    return out


def choose_peak(
    quantile: np.ndarray, shifted: np.ndarray, peak: np.ndarray, capacity: float
) -> np.ndarray:
    """Per series and window, the peak forecast that did better on the windows before: the
    lower product of its absolute error and its missed bursts (plus one) over all of them.

    The product weighs a relative gain on either measure alike, whatever the series' scale.
    The quantile mixture serves until ``MIN_WINDOWS`` windows were seen, and keeps ties. The
    choice is a property of the series (where its peaks are coarse against one instance, as
    when a request is a large part of the load, only the quantile mixture's state-dependent
    height pays), so it weighs its whole history."""
    m, t = peak.shape
    out = quantile.copy()
    err = np.zeros((2, m))
    missed = np.zeros((2, m))
    seen = np.zeros(m)
    for i in range(t):
        use = takes_shift(err, missed, seen)
        out[:, i] = np.where(use, shifted[:, i], quantile[:, i])
        ok = ~np.isnan(peak[:, i])
        tally(err, missed, peak[:, i], ok, (quantile[:, i], shifted[:, i]), capacity)
        seen += ok
    return out


def _weights(loss: np.ndarray, level: np.ndarray, eta: float) -> np.ndarray:
    """Mixture weights (experts first) from discounted losses and levels; equal without data."""
    excess = (loss - loss.min(axis=0)) / np.maximum(level, 1e-12)
    w = np.exp(-eta * excess)
    return w / w.sum(axis=0)


def carry_forward(history: np.ndarray) -> np.ndarray:
    """Replace each NaN by the last non-NaN value before it in its row (NaN if none)."""
    m, t = history.shape
    idx = np.where(~np.isnan(history), np.arange(t), -1)
    np.maximum.accumulate(idx, axis=1, out=idx)
    out = history[np.arange(m)[:, None], np.maximum(idx, 0)]
    out[idx < 0] = np.nan
    return out
