"""Load forecasting: the Corrective Seasonal Predictor (CSP), its baselines, and the expert
mixture the planner runs.

LLM load repeats daily, so the prediction for window ``i`` of period ``k`` starts from the mean of
the same window over the previous ``D`` periods (the *seasonal part*). Days differ in level, so a
*correction* is added: the weighted mean of the last ``min(i, N)`` errors (observed minus seasonal)
of this period, each weight twice the one before it, so the newest error counts most. The sum is
clamped at zero. Average and peak concurrency are forecast the same way, each on its own.

Missing windows are NaN: they drop out of the seasonal mean and of the correction (the weights of
the remaining errors are renormalised). A window with no seasonal history (the first period, a new
model) has a seasonal part of zero, so its correction is the recent level itself.

On real traces (``warmserve forecast eval``) the plain CSP loses to last-value: at 600 s the
seasonal part carries day-to-day noise straight into the prediction. What the planner runs is an
online mixture (:class:`MixParams`, :func:`mixture`) in which the CSP is one expert beside
last-value, seasonal-naive, the seasonal delta, recent quantiles and means, and exponential
smoothing with and without the seasonal slope: each model's weights follow the experts' recent
pinball losses. The peak has two forecasts, and each series takes the one that did better so
far (:func:`choose_peak`): the mixture scored at a quantile above the median, which predicts
peaks a little high to miss fewer bursts, and the median mixture moved by a *burst shift*
(:func:`burst_shift`), fitted on its last week of residuals to trade absolute error against
missed bursts (peaks more than one instance's capacity above the forecast).

Two forms share the same arithmetic:

- batch functions over a ``models x windows`` array give the one-step-ahead prediction of every
  window from the windows before it (``warmserve forecast eval`` scores them);
- :class:`Forecaster` keeps ring buffers and predicts one window for all models at once, which
  is what the planner calls every tick; the mixture runs as three numba kernels (experts and
  their weighted sum per block of models; scoring and weights when a window closes; the
  smoothing expert's levels), whose blocks of models run on all cores, so 10,000 models take a
  few milliseconds (``bench/policy_bench.py``). Nothing here forks, so numba's OpenMP threads
  are safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numba
import numpy as np


@dataclass(frozen=True)
class MixParams:
    """An exponentially weighted mixture of experts over the CSP and cheap baselines.

    The experts are, in this order: last value, seasonal-naive, the CSP of :class:`CSPParams`,
    the *seasonal delta* (the seasonal part plus the newest error alone: the last value moved by
    how the season moved), one ``q`` quantile of the last ``n`` windows per ``(n, q)`` of
    ``recent``, an exponentially weighted mean of the last ``ewma[1]`` windows (weight
    ``ewma[0] * (1 - ewma[0]) ** age``), with ``ses`` simple exponential smoothing whose weight
    each series picks online (:func:`auto_ses`, what statsforecast's AutoETS amounts to on these
    traces), with ``slope`` that smoothing moved by the *seasonal slope* (:func:`seasonal_slope`
    over ``2 * slope + 1`` windows: how load usually changes at this time of day), and last the
    plain mean of all the experts before it (which wins where following any one expert costs
    more than it gains: noisy, sparse series).

    ``eta``, ``discount`` and ``tau`` are per plane (average, peak). They, and which experts
    take part, were chosen on the first part of each evaluated trace only (see
    ``warmserve forecast eval``, which scores the rest): the average plane learns slowly from a
    long memory, the peak plane from its last hundred or so windows, and it is scored at a quantile
    above the median, so it predicts peaks a little high and misses fewer bursts.

    ``capacity``, ``miss_cost`` and ``shift_periods`` shape the other peak forecast, the median
    mixture (the peak plane's ``eta`` and ``discount``) moved by its burst shift
    (:func:`burst_shift`); ``miss_cost`` was chosen on the same tune part, the shift's window
    (a week, so every day of the week is in it) by design.
    """

    eta: tuple[float, float] = (300.0, 30_000.0)  # sharpness: weights exp(-eta * excess / level)
    discount: tuple[float, float] = (0.998, 0.99)  # weight of an expert's past error per window
    tau: tuple[float, float] = (0.5, 0.65)  # pinball quantile scoring the avg and peak experts
    recent: tuple[tuple[int, float], ...] = ((3, 0.5), (6, 0.5), (12, 0.5), (6, 0.8), (2, 1.0))
    ewma: tuple[float, int] = (0.3, 12)
    ses: bool = True
    slope: int = 12  # half width (windows) of the seasonal slope; 0: no seasonal-slope expert
    capacity: float = 32.0  # one instance's requests: a peak this far above its forecast is missed
    miss_cost: float = 1.0  # a missed burst costs this many capacities of absolute error
    shift_periods: int = 7  # periods of residuals the burst shift is fitted on

    def __post_init__(self) -> None:
        if self.slope and not self.ses:
            raise ValueError("the seasonal-slope expert moves the ses expert: slope needs ses")
        if self.slope < 0:
            raise ValueError(f"slope must be >= 0, not {self.slope}")
        if self.capacity <= 0 or self.miss_cost < 0 or self.shift_periods < 1:
            raise ValueError("need capacity > 0, miss_cost >= 0 and shift_periods >= 1")

    @property
    def experts(self) -> int:
        return 6 + len(self.recent) + int(self.ses) + int(self.slope > 0)

    @property
    def depth(self) -> int:
        """Windows back the recent-window experts look."""
        return max(max((n for n, _ in self.recent), default=0), self.ewma[1])


@dataclass(frozen=True)
class CSPParams:
    """Shape of a CSP forecaster; defaults are the paper's (plain CSP).

    With ``mix`` set the forecast is a mixture of experts (:func:`mixture`) in which this CSP
    is one expert; the planner runs that (see :func:`warmserve.policy.planner.csp_params`).
    """

    period: int  # windows per period
    periods: int = 3  # D
    correction_windows: int = 10  # N
    decay: float = 0.5  # weight ratio of an error to the next more recent one
    reset: bool = True  # corrections use only errors of the current period (the paper's CSP)
    blend: float = 0.0  # weight of the last observed value mixed into the prediction
    mix: MixParams | None = None


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
    filled = _carry_forward(history)
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


SES_ALPHAS = (0.2, 0.3, 0.5, 0.7, 0.85, 1.0)
SES_DISCOUNT = 0.995


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


MIN_WINDOWS = 12  # windows seen before the burst shift and the choice of peak forecast act
SHIFT_STEPS = 16  # burst shifts per instance's capacity: the shift is a multiple of capacity / 16
SHIFT_REACH = 8  # capacities the shift may move either way
SHIFT_BINS = 2 * SHIFT_REACH * SHIFT_STEPS + 2  # bins of residuals, see _shift_bin
SHIFT_COLUMNS = SHIFT_BINS + 2  # then the residuals below the middle bin, then all of them


@numba.njit(cache=True, nogil=True, inline="always")
def _shift_bin(v, step, k):  # pragma: no cover (compiled)
    """The bin of residual ``v`` among the shifts ``j * step`` (``|j| <= k``): bin ``j + k``
    holds ``((j - 1) * step, j * step]``, bin 0 everything up to ``-k * step`` and the last bin
    everything above ``k * step``."""
    j = math.ceil(v / step)
    return min(max(j, -k), k + 1) + k


@numba.njit(cache=True, nogil=True)
def _bin_add(cnt, v, sign, step):  # pragma: no cover (compiled)
    """Add (``sign`` 1) or take out (-1) residual ``v`` in ``cnt`` (2 x ``SHIFT_COLUMNS``: counts,
    then sums): its bin, the residuals below the middle bin (where the median usually is, so
    :func:`_best_shift` starts there) and all residuals."""
    k = SHIFT_REACH * SHIFT_STEPS
    b = _shift_bin(v, step, k)
    for col in (b, SHIFT_BINS + 1):
        cnt[0, col] += sign
        cnt[1, col] += sign * v
    if b < k:
        cnt[0, SHIFT_BINS] += sign
        cnt[1, SHIFT_BINS] += sign * v


@numba.njit(cache=True, nogil=True)
def _best_shift(cnt, cost, capacity):  # pragma: no cover (compiled)
    """The shift ``d`` on the lattice (multiples of ``capacity / SHIFT_STEPS``) minimising
    ``sum |r - d| + cost * #(r - d > capacity)`` over the residuals ``r`` binned in ``cnt``
    (:func:`_bin_add`). Bin edges are lattice points, so both terms are exact there: the
    residuals at or below ``d`` are whole bins, and so are those above ``d + capacity``. The
    lowest least wins unless a later one is lower by more than rounding (the batch and online
    forms add the same numbers in different orders).

    Only a few bins are scored. Below the median both terms fall as ``d`` rises, so the scan
    starts at the last lattice point below it, found by walking from the middle bin; above the
    median the absolute error only grows, so once it alone reaches the least so far no later
    shift can win."""
    k = SHIFT_REACH * SHIFT_STEPS
    step = capacity / SHIFT_STEPS
    n = cnt[0, SHIFT_BINS + 1]
    total = cnt[1, SHIFT_BINS + 1]
    b = k  # below: the residuals in bins before b, and their sum
    below = cnt[0, SHIFT_BINS]
    below_sum = cnt[1, SHIFT_BINS]
    while b > 0 and 2.0 * below >= n:
        b -= 1
        below -= cnt[0, b]
        below_sum -= cnt[1, b]
    while b < 2 * k - SHIFT_STEPS + 1 and 2.0 * (below + cnt[0, b]) < n:
        below += cnt[0, b]
        below_sum += cnt[1, b]
        b += 1
    if b > 0:  # b holds the median: start at the lattice point below it, its bin in first
        b -= 1
        below -= cnt[0, b]
        below_sum -= cnt[1, b]
    within = below  # residuals <= d + capacity
    for i in range(b, b + SHIFT_STEPS):
        within += cnt[0, i]
    best = 0.0
    arg = 0.0
    for j in range(b - k, k - SHIFT_STEPS + 1):
        i = j + k
        below += cnt[0, i]
        below_sum += cnt[1, i]
        within += cnt[0, i + SHIFT_STEPS]
        d = j * step
        absdev = d * (2.0 * below - n) - 2.0 * below_sum + total
        if i > b and 2.0 * below >= n and absdev >= best:  # the error alone only grows
            break
        obj = absdev + cost * (n - within)
        if i == b or obj < best - 1e-9 * (1.0 + abs(best)):
            best = obj
            arg = d
    return arg


@numba.njit(cache=True, nogil=True)
def _burst_shift(central, peak, n, cost, capacity, out):  # pragma: no cover (compiled)
    """Batch :func:`burst_shift` for one series: after each observed window, the shift from
    the residuals of the observed windows among the last ``n``, binned as they come and go (the
    oldest leave first, then the newest comes in, as in :func:`_refit_shift`)."""
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
            _bin_add(cnt, vals[head], -1.0, step)
            head += 1
        v = peak[j] - central[j]
        wins[tail] = j
        vals[tail] = v
        tail += 1
        _bin_add(cnt, v, 1.0, step)
        if tail - head >= MIN_WINDOWS:
            shift = _best_shift(cnt, cost, capacity)


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
    zero (:func:`_best_shift`): residuals then need only a count and a sum per step, so a
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
        use = _takes_shift(err, missed, seen)
        out[:, i] = np.where(use, shifted[:, i], quantile[:, i])
        ok = ~np.isnan(peak[:, i])
        _tally(err, missed, peak[:, i], ok, (quantile[:, i], shifted[:, i]), capacity)
        seen += ok
    return out


def _takes_shift(err: np.ndarray, missed: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Where the shifted peak forecast did better so far (:func:`choose_peak`), from the sums
    of :func:`_tally` (quantile first) over ``seen`` windows."""
    return (seen >= MIN_WINDOWS) & (err[1] * (missed[1] + 1) < err[0] * (missed[0] + 1))


def _tally(
    err: np.ndarray,
    missed: np.ndarray,
    peak: np.ndarray,
    ok: np.ndarray,
    forecasts: tuple[np.ndarray, np.ndarray],
    capacity: float,
) -> None:
    """Add, in place and where ``ok``, one window's absolute error and missed burst of each
    peak forecast (quantile, shifted)."""
    for c, pred in enumerate(forecasts):
        err[c] += np.where(ok, np.abs(peak - pred), 0.0)
        missed[c] += np.where(ok, peak - pred > capacity, 0.0)


def _weights(loss: np.ndarray, level: np.ndarray, eta: float) -> np.ndarray:
    """Mixture weights (experts first) from discounted losses and levels; equal without data."""
    excess = (loss - loss.min(axis=0)) / np.maximum(level, 1e-12)
    w = np.exp(-eta * excess)
    return w / w.sum(axis=0)


def _carry_forward(history: np.ndarray) -> np.ndarray:
    """Replace each NaN by the last non-NaN value before it in its row (NaN if none)."""
    m, t = history.shape
    idx = np.where(~np.isnan(history), np.arange(t), -1)
    np.maximum.accumulate(idx, axis=1, out=idx)
    out = history[np.arange(m)[:, None], np.maximum(idx, 0)]
    out[idx < 0] = np.nan
    return out


@numba.njit(cache=True, nogil=True, parallel=True)
def _expert_kernel(  # pragma: no cover (compiled)
    obs,
    obs_win,
    err,
    err_win,
    last,
    ncols,
    window,
    newest,
    period,
    periods,
    ncorr,
    decay,
    reset,
    rn,
    rq,
    alpha,
    newma,
    ses_level,
    ses_loss,
    half,
    weights,
    out,
    pred,
):
    """Every expert's prediction of ``window`` (see :class:`MixParams`) for columns
    ``0..ncols``, from the rings of :class:`Forecaster`, with errors up to window ``newest``.
    ``ses_level`` and ``ses_loss`` (weights x 2 x columns, no weights without that expert) are
    the smoothing expert's state: it predicts the level of the weight with the least loss; with
    ``half`` >= 0 the seasonal slope over ``2 * half + 1`` windows moves it.

    With ``weights`` (experts x planes x columns) the weighted sum goes to ``pred`` (planes x
    columns; a peak is never predicted below the average, and a third plane weighs the peak
    experts again for the central peak, left unfloored); otherwise each expert goes to ``out``
    (experts x 2 x columns). Every expert is built in the same pass, block by block, so a
    prediction reads each ring slot once and never materialises a full expert array."""
    span = obs.shape[0]
    nerr = err.shape[0]
    depth = 0
    for n in rn:
        depth = max(depth, n)
    depth = max(depth, newma)
    nalpha = ses_level.shape[0]
    use_ses = nalpha > 0
    k = 6 + len(rn) + (1 if use_ses else 0) + (1 if half >= 0 else 0)
    ew = np.empty(max(newma, 1))  # weights of the exponentially weighted mean, newest first
    for j in range(newma):
        ew[j] = alpha * (1.0 - alpha) ** j
    # Windows (and ring slots) each expert reads: the same for every model, so the modulo
    # arithmetic is done once here and the model loop only loads and compares.
    nrec = max(depth, 1)
    rwin = np.empty(nrec, np.int64)
    rslot = np.empty(nrec, np.int64)
    for j in range(depth):
        rwin[j] = window - 1 - j
        rslot[j] = rwin[j] % span if rwin[j] >= 0 else 0
    swin = np.empty(max(periods, 1), np.int64)
    sslot = np.empty(max(periods, 1), np.int64)
    ns = 0
    for kk in range(1, periods + 1):
        w = window - kk * period
        if w < 0:
            break
        swin[ns] = w
        sslot[ns] = w % span
        ns += 1
    # The seasonal slope: per period back, the windows at both ends of its span.
    hwin = np.empty(max(periods, 1), np.int64)
    lwin = np.empty(max(periods, 1), np.int64)
    nh = 0
    if half >= 0:
        for kk in range(1, periods + 1):
            lo = window - kk * period - half - 1
            if lo < 0:
                break
            hwin[nh] = lo + 2 * half + 1
            lwin[nh] = lo
            nh += 1
    hslot = np.empty(max(nh, 1), np.int64)
    lslot = np.empty(max(nh, 1), np.int64)
    for i in range(nh):
        hslot[i] = hwin[i] % span
        lslot[i] = lwin[i] % span
    nwin = window - period
    nslot = nwin % span if nwin >= 0 else 0
    start = window - window % period if reset else 0  # oldest error the CSP may use
    cwin = np.empty(max(ncorr, 1), np.int64)
    cslot = np.empty(max(ncorr, 1), np.int64)
    cw = np.empty(max(ncorr, 1))
    nc = 0
    weight = 1.0
    for j in range(ncorr):
        w = newest - j
        if w < start or w < 0:
            break
        cwin[nc] = w
        cslot[nc] = w % nerr
        cw[nc] = weight
        weight *= decay
        nc += 1
    dslot = newest % nerr if newest >= 0 else 0
    # Models go in blocks: first each ring slot a block needs is streamed into small local
    # arrays (one contiguous run per slot, which memory prefetching follows), then every model
    # of the block is computed from those. Reading model by model instead touches dozens of
    # rows per model and waits on memory at every one of them.
    blk = 256
    mixed = weights.shape[0] > 0
    # Blocks are independent (each writes only its own columns), so they run on all cores;
    # each block has its own scratch arrays.
    for bi in numba.prange((ncols + blk - 1) // blk):
        c0 = bi * blk
        b = min(blk, ncols - c0)
        rec = np.empty((nrec, 2, blk))
        stot = np.empty((2, blk))
        scnt = np.empty(blk)
        num = np.empty((2, blk))
        den = np.empty(blk)
        naive = np.empty((2, blk))
        delta = np.empty((2, blk))
        srt = np.empty((nrec, blk))
        recv = np.empty((max(len(rn), 1), 2, blk))
        cnt = np.empty((max(len(rn), 1), blk))
        sesv = np.empty((2, blk))
        best = np.empty(blk)
        rise = np.empty((2, blk))
        sdays = np.empty(blk)
        vals = np.empty(k)
        for j in range(depth):
            for c in range(b):
                ok = rwin[j] >= 0 and obs_win[rslot[j], c0 + c] == rwin[j]
                for p in range(2):
                    rec[j, p, c] = obs[rslot[j], p, c0 + c] if ok else np.nan
        stot[:, :b] = 0.0
        scnt[:b] = 0.0
        for i in range(ns):
            for c in range(b):
                if obs_win[sslot[i], c0 + c] == swin[i]:
                    stot[0, c] += obs[sslot[i], 0, c0 + c]
                    stot[1, c] += obs[sslot[i], 1, c0 + c]
                    scnt[c] += 1.0
        num[:, :b] = 0.0
        den[:b] = 0.0
        for i in range(nc):
            for c in range(b):
                if err_win[cslot[i], c0 + c] == cwin[i]:
                    num[0, c] += cw[i] * err[cslot[i], 0, c0 + c]
                    num[1, c] += cw[i] * err[cslot[i], 1, c0 + c]
                    den[c] += cw[i]
        # The smoothing expert (the level with the least loss; numpy's argmin keeps the first
        # of equals, so does the strict comparison) and the seasonal slope that moves it.
        if use_ses:
            for p in range(2):
                best[:b] = np.inf
                for a in range(nalpha):
                    for c in range(b):
                        if ses_loss[a, p, c0 + c] < best[c]:
                            best[c] = ses_loss[a, p, c0 + c]
                            v = ses_level[a, p, c0 + c]
                            sesv[p, c] = 0.0 if np.isnan(v) else v
        rise[:, :b] = 0.0
        sdays[:b] = 0.0
        for i in range(nh):
            for c in range(b):
                if obs_win[hslot[i], c0 + c] == hwin[i] and obs_win[lslot[i], c0 + c] == lwin[i]:
                    rise[0, c] += obs[hslot[i], 0, c0 + c] - obs[lslot[i], 0, c0 + c]
                    rise[1, c] += obs[hslot[i], 1, c0 + c] - obs[lslot[i], 1, c0 + c]
                    sdays[c] += 1.0
        for c in range(b):
            last_c = (last[0, c0 + c], last[1, c0 + c])
            n_ok = nwin >= 0 and obs_win[nslot, c0 + c] == nwin
            d_ok = newest >= 0 and err_win[dslot, c0 + c] == newest
            for p in range(2):
                lv = 0.0 if np.isnan(last_c[p]) else last_c[p]
                naive[p, c] = obs[nslot, p, c0 + c] if n_ok else lv
                delta[p, c] = err[dslot, p, c0 + c] if d_ok else 0.0
        # The recent quantiles: an odd-even transposition sort of each window count's values
        # across the block (missing ones as +inf, so they sort last), branch-free and
        # vectorised; experts over the same windows share one sort.
        for e in range(len(rn)):
            n = rn[e]
            done = False
            for e2 in range(e):
                done = done or rn[e2] == n
            if done:
                continue
            cnt[e, :b] = 0.0
            for p in range(2):
                for j in range(n):
                    for c in range(b):
                        v = rec[j, p, c]
                        srt[j, c] = np.inf if np.isnan(v) else v
                        if p == 0:
                            cnt[e, c] += 0.0 if np.isnan(v) else 1.0
                for r in range(n):
                    for i in range(r % 2, n - 1, 2):
                        for c in range(b):
                            x = srt[i, c]
                            y = srt[i + 1, c]
                            srt[i, c] = x if x < y else y
                            srt[i + 1, c] = y if x < y else x
                for e2 in range(e, len(rn)):
                    if rn[e2] != n:
                        continue
                    cnt[e2, :b] = cnt[e, :b]
                    for c in range(b):
                        m = int(cnt[e, c])
                        if m > 0:
                            pos = rq[e2] * (m - 1)
                            lo = int(pos)
                            hi = min(lo + 1, m - 1)
                            recv[e2, p, c] = srt[lo, c] + (pos - lo) * (srt[hi, c] - srt[lo, c])
        for c in range(b):
            for p in range(2):
                lastv = last[p, c0 + c]
                if np.isnan(lastv):
                    lastv = 0.0
                seasonal = stot[p, c] / scnt[c] if scnt[c] > 0 else 0.0
                corr = num[p, c] / den[c] if den[c] > 0 else 0.0
                vals[0] = lastv
                vals[1] = naive[p, c]
                vals[2] = max(seasonal + corr, 0.0)
                vals[3] = max(seasonal + delta[p, c], 0.0)
                for e in range(len(rn)):
                    vals[4 + e] = recv[e, p, c] if cnt[e, c] > 0 else lastv
                num_e = 0.0
                den_e = 0.0
                for j in range(newma):
                    v = rec[j, p, c]
                    if not np.isnan(v):
                        num_e += ew[j] * v
                        den_e += ew[j]
                e = 4 + len(rn)
                vals[e] = num_e / den_e if den_e > 0 else lastv
                if use_ses:
                    e += 1
                    vals[e] = sesv[p, c]
                if half >= 0:
                    step = rise[p, c] / (sdays[c] * (2 * half + 1)) if sdays[c] > 0 else 0.0
                    e += 1
                    vals[e] = max(sesv[p, c] + step, 0.0)
                total = 0.0
                for e in range(k - 1):
                    total += vals[e]
                vals[k - 1] = total / (k - 1)
                if mixed:
                    acc = 0.0
                    for e in range(k):
                        acc += weights[e, p, c0 + c] * vals[e]
                    pred[p, c0 + c] = acc if p == 0 else max(acc, pred[0, c0 + c])
                    if p == 1 and pred.shape[0] == 3:  # the central peak mixture, unfloored
                        acc = 0.0
                        for e in range(k):
                            acc += weights[e, 2, c0 + c] * vals[e]
                        pred[2, c0 + c] = acc
                else:
                    for e in range(k):
                        out[e, p, c0 + c] = vals[e]


@numba.njit(cache=True, nogil=True, parallel=True)
def _learn(experts, values, seen, tau, discount, eta, loss, level, w):  # pragma: no cover
    """Score every expert's prediction on ``values`` (what :func:`mixture` does per window) and
    update, in place, the discounted losses, levels and weights of the models ``seen``.
    ``tau``, ``discount`` and ``eta`` have one value per plane of weights; a third plane (the
    central peak mixture) scores the peak experts again, at its own quantile.

    Blocks of models run on all cores; within a block, loops run expert by expert over
    contiguous model rows (memory streams, not strides), and a weight below ``exp(-60)`` of the
    best one is taken as zero (its ``exp`` would be subnormal, which is slow, and changes no
    sum)."""
    k = experts.shape[0]
    n = values.shape[1]
    blk = 1024
    for bi in numba.prange((n + blk - 1) // blk):
        lo = bi * blk
        hi = min(n, lo + blk)
        factor = np.empty(hi - lo)
        top = np.empty(hi - lo)
        total = np.empty(hi - lo)
        for p in range(loss.shape[1]):
            src = min(p, 1)  # the plane of load the weights score
            for e in range(k):
                for c in range(lo, hi):
                    if seen[c]:
                        err = values[src, c] - experts[e, src, c]
                        pin = max(tau[p] * err, (tau[p] - 1.0) * err)
                        loss[e, p, c] = discount[p] * loss[e, p, c] + pin
            for c in range(lo, hi):
                if seen[c]:
                    level[p, c] = discount[p] * level[p, c] + abs(values[src, c])
                    factor[c - lo] = -eta[p] / max(level[p, c], 1e-12)
            top[:] = -np.inf
            for e in range(k):  # exponents, and the largest (the least loss) to shift them by
                for c in range(lo, hi):
                    if seen[c]:
                        w[e, p, c] = factor[c - lo] * loss[e, p, c]
                        top[c - lo] = max(top[c - lo], w[e, p, c])
            total[:] = 0.0
            for e in range(k):
                for c in range(lo, hi):
                    if seen[c]:
                        x = w[e, p, c] - top[c - lo]
                        w[e, p, c] = np.exp(x) if x > -60.0 else 0.0
                        total[c - lo] += w[e, p, c]
            for e in range(k):
                for c in range(lo, hi):
                    if seen[c]:
                        w[e, p, c] /= total[c - lo]


@numba.njit(cache=True, nogil=True, parallel=True)
def _smooth(values, seen, alphas, discount, level, loss):  # pragma: no cover (compiled)
    """Score and update, in place, the smoothing expert's level and discounted absolute error
    per weight ``alphas`` (weights x 2 x models) on ``values`` of the models ``seen``: one
    window of :func:`auto_ses`."""
    n = values.shape[1]
    blk = 1024
    for bi in numba.prange((n + blk - 1) // blk):
        for a in range(alphas.shape[0]):
            for p in range(2):
                for c in range(bi * blk, min(n, (bi + 1) * blk)):
                    if seen[c]:
                        x = values[p, c]
                        old = level[a, p, c]
                        if np.isnan(old):
                            level[a, p, c] = x
                        else:
                            loss[a, p, c] = discount * loss[a, p, c] + abs(x - old)
                            level[a, p, c] = old + alphas[a] * (x - old)


@numba.njit(cache=True, nogil=True, parallel=True)
def _refit_shift(residual, window, cost, capacity, ring, last, hist, shift):  # pragma: no cover
    """Write ``residual`` (NaN: not observed) of ``window`` into each model's ring, clearing
    the slots of the windows it skipped since its last one (oldest first), and refit the shift
    of every model observed, as :func:`burst_shift` does. ``hist`` (models x 2 x
    ``SHIFT_COLUMNS``) holds each ring binned (:func:`_bin_add`), so a window moves a value or
    two in and out, and no model's ring is read whole. A window observed again replaces its
    residual."""
    n = ring.shape[0]
    step = capacity / SHIFT_STEPS
    for c in numba.prange(residual.shape[0]):
        v = residual[c]
        if np.isnan(v):
            continue
        gone = min(max(window - last[c] - 1, 0), n - 1) if last[c] >= 0 else 0
        for j in range(gone, -1, -1):  # skipped windows' slots, then this window's
            slot = (window - j) % n
            if not np.isnan(ring[slot, c]):
                _bin_add(hist[c], ring[slot, c], -1.0, step)
            ring[slot, c] = np.nan
        ring[window % n, c] = v
        _bin_add(hist[c], v, 1.0, step)
        last[c] = max(last[c], window)
        if hist[c, 0, SHIFT_BINS + 1] >= MIN_WINDOWS:
            shift[c] = _best_shift(hist[c], cost, capacity)


@numba.njit(cache=True, nogil=True)
def _rebin(ring, last, capacity, hist):  # pragma: no cover (compiled)
    """Bin each model's residual ring (columns) oldest first, as :func:`_refit_shift` did."""
    n = ring.shape[0]
    step = capacity / SHIFT_STEPS
    for c in range(ring.shape[1]):
        hist[c] = 0.0
        for j in range(n - 1, -1, -1):
            v = ring[(last[c] - j) % n, c]
            if not np.isnan(v):
                _bin_add(hist[c], v, 1.0, step)


class Forecaster:
    """Online forecaster over many models: ring buffers, computed for all models at once.

    Models are columns (added as they are first observed, so new models need no registration);
    two planes hold average (0) and peak (1) concurrency. Buffers are laid out time-major
    (``ring x plane x models``), so each step reads a few contiguous ``2 x models`` slices.
    :meth:`predict` forecasts any window from what was observed before it, so the planner can
    ask for the window now open and the next one. With ``params.mix`` it predicts the expert
    mixture (equal to :func:`mixture_pair`), otherwise the CSP (equal to :func:`csp`).
    """

    def __init__(self, params: CSPParams, models: tuple[str, ...] = ()) -> None:
        self.params = params
        mix = params.mix
        # The ring reaches back D periods, and the seasonal slope's span past that.
        self._half = min(mix.slope, params.period - 1) if mix and mix.slope else -1  # -1: none
        reach = params.period * params.periods + self._half + 1
        self._span = max(reach, mix.depth if mix else 0, 1)
        self._nerr = max(params.correction_windows, 1)
        self._n = 0  # columns allocated
        self._rows: dict[str, int] = {}
        self._obs = np.full((self._span, 2, 0), np.nan)
        self._obs_win = np.full((self._span, 0), -1, dtype=np.int64)
        self._err = np.full((self._nerr, 2, 0), np.nan)
        self._err_win = np.full((self._nerr, 0), -1, dtype=np.int64)
        self._last = np.full((2, 0), np.nan)
        self._last_win = np.full(0, -1, dtype=np.int64)
        self._k = mix.experts if mix else 0
        # Planes of weights: average, peak (at the peak quantile), central peak (the median).
        self._loss = np.zeros((self._k, 3, 0))  # discounted pinball loss per expert
        self._level = np.zeros((3, 0))  # discounted observed load
        self._w = np.full((self._k, 3, 0), 1 / max(self._k, 1))  # expert weights, from the losses
        # The burst shift of the central peak (:func:`burst_shift`): a ring of residuals, the
        # newest window in it, and the shift fitted on it; then what :func:`choose_peak` sums
        # for the quantile and the shifted peak forecasts (absolute error, missed bursts).
        self._nres = mix.shift_periods * params.period if mix else 1
        self._res = np.full((self._nres, 0), np.nan)
        self._res_last = np.full(0, -1, dtype=np.int64)
        self._hist = np.zeros((0, 2, SHIFT_COLUMNS))  # each ring binned (model rows), see
        # _refit_shift; rebuilt by restore
        self._shift = np.zeros(0)
        self._sel_err = np.zeros((2, 0))
        self._sel_missed = np.zeros((2, 0))
        self._sel_seen = np.zeros(0)
        # The ses expert (:func:`auto_ses`): a level and a discounted absolute error per weight.
        self._alphas = np.array(SES_ALPHAS if mix and mix.ses else (), dtype=float)
        self._ses_level = np.full((len(self._alphas), 2, 0), np.nan)
        self._ses_loss = np.zeros((len(self._alphas), 2, 0))
        self._tau = np.array((*mix.tau, 0.5) if mix else (0.5, 0.5, 0.5))
        self._eta = np.array((*mix.eta, mix.eta[1]) if mix else (0.0,) * 3, dtype=float)
        self._discount = np.array((*mix.discount, mix.discount[1]) if mix else (1.0,) * 3)
        self._rn = np.array([n for n, _ in mix.recent] if mix else [], dtype=np.int64)
        self._rq = np.array([q for _, q in mix.recent] if mix else [], dtype=float)
        self._alpha, self._newma = (float(mix.ewma[0]), int(mix.ewma[1])) if mix else (0.0, 0)
        for model in models:
            self._row(model)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._rows)

    def _row(self, model: str) -> int:
        row = self._rows.get(model)
        if row is not None:
            return row
        row = self._rows[model] = len(self._rows)
        if row >= self._n:
            grow = max(16, row)
            self._n += grow

            def more(a: np.ndarray, fill: float) -> np.ndarray:
                pad = np.full((*a.shape[:-1], grow), fill, dtype=a.dtype)
                return np.concatenate([a, pad], axis=-1)

            self._obs, self._err, self._last = (
                more(a, np.nan) for a in (self._obs, self._err, self._last)
            )
            self._obs_win, self._err_win, self._last_win = (
                more(a, -1) for a in (self._obs_win, self._err_win, self._last_win)
            )
            self._loss, self._level = more(self._loss, 0.0), more(self._level, 0.0)
            self._w = more(self._w, 1 / max(self._k, 1))
            self._ses_level = more(self._ses_level, np.nan)
            self._ses_loss = more(self._ses_loss, 0.0)
            self._res, self._res_last = more(self._res, np.nan), more(self._res_last, -1)
            self._hist = np.concatenate([self._hist, np.zeros((grow, 2, SHIFT_COLUMNS))])
            self._shift = more(self._shift, 0.0)
            self._sel_err, self._sel_missed = more(self._sel_err, 0.0), more(self._sel_missed, 0.0)
            self._sel_seen = more(self._sel_seen, 0.0)
        return row

    def _past(self, cols: slice, window: int) -> np.ndarray:
        """Observations (2 x cols) of ``window``; NaN where it was not observed."""
        if window < 0:
            return np.full(self._last[:, cols].shape, np.nan)
        slot = window % self._span
        return np.where(self._obs_win[slot, cols] == window, self._obs[slot, :, cols], np.nan)

    def _seasonal(self, cols: slice, window: int) -> np.ndarray:
        """Seasonal part (2 x cols) of ``window`` from the ring; 0 where nothing was seen."""
        p = self.params
        total = np.zeros(self._last[:, cols].shape)
        count = np.zeros(total.shape[1])
        for k in range(1, p.periods + 1):
            w = window - k * p.period
            if w < 0:
                break
            slot = w % self._span
            ok = self._obs_win[slot, cols] == w
            total += np.where(ok, self._obs[slot, :, cols], 0.0)
            count += ok
        return total / np.maximum(count, 1)

    def _csp(self, cols: slice, window: int, newest: int) -> np.ndarray:
        """Unblended CSP (2 x cols) of ``window``, with errors up to window ``newest``."""
        p = self.params
        seasonal = self._seasonal(cols, window)
        start = window - window % p.period if p.reset else 0  # oldest error allowed
        num = np.zeros(seasonal.shape)
        den = np.zeros(seasonal.shape[1])
        weight = 1.0
        for j in range(p.correction_windows):
            w = newest - j
            if w < start:
                break
            slot = w % self._nerr
            ok = self._err_win[slot, cols] == w
            num += np.where(ok, weight * self._err[slot, :, cols], 0.0)
            den += ok * weight
            weight *= p.decay
        return np.maximum(seasonal + num / np.where(den > 0, den, 1.0), 0.0)

    def _kernel(self, cols: slice, window: int, newest: int, weights: np.ndarray | None):
        """Run :func:`_expert_kernel` on ``cols``: every expert (``weights`` None) or their
        weighted sum."""
        p = self.params
        n = len(range(*cols.indices(self._n)))
        k = self._k
        mixed = weights is not None
        out = np.empty((0 if mixed else k, 2, n))
        pred = np.empty((weights.shape[1] if mixed else 2, n if mixed else 0))
        _expert_kernel(
            self._obs[:, :, cols],
            self._obs_win[:, cols],
            self._err[:, :, cols],
            self._err_win[:, cols],
            self._last[:, cols],
            n,
            window,
            newest,
            p.period,
            p.periods,
            p.correction_windows,
            p.decay,
            p.reset,
            self._rn,
            self._rq,
            self._alpha,
            self._newma,
            self._ses_level[:, :, cols],
            self._ses_loss[:, :, cols],
            self._half,
            weights if mixed else np.empty((0, 2, 0)),
            out,
            pred,
        )
        return pred if mixed else out

    def _experts(self, cols: slice, window: int, newest: int) -> np.ndarray:
        """Every expert's prediction (experts x 2 x cols) of ``window``; see :func:`experts`."""
        return self._kernel(cols, window, newest, None)

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        """Record the closed window ``window`` of ``model``."""
        row = self._row(model)
        self._store(slice(row, row + 1), window, np.array([[avg], [peak]], dtype=float))

    def observe_all(self, window: int, avg: np.ndarray, peak: np.ndarray) -> None:
        """Record ``window`` for every model of :attr:`models` at once (arrays in that order);
        a model whose average or peak is NaN was not observed."""
        cols = slice(0, len(self._rows))
        self._store(cols, window, np.stack([avg, peak]).astype(float))

    def _store(self, cols: slice, window: int, values: np.ndarray) -> None:
        """Score the experts on ``values`` (their one-step predictions, before the window is
        known), then write the window into the rings."""
        mix = self.params.mix
        seen = ~np.isnan(values).any(axis=0)
        if not seen.all():
            values = np.where(seen, values, 0.0)
        if mix is not None:
            experts = self._experts(cols, window, window - 1)
            self._score_peaks(cols, window, experts, values, seen)
            _learn(
                experts,
                values,
                seen,
                self._tau,
                self._discount,
                self._eta,
                self._loss[:, :, cols],
                self._level[:, cols],
                self._w[:, :, cols],
            )
            _smooth(
                values,
                seen,
                self._alphas,
                SES_DISCOUNT,
                self._ses_level[:, :, cols],
                self._ses_loss[:, :, cols],
            )
        seasonal = self._seasonal(cols, window)
        slot = window % self._span
        eslot = window % self._nerr
        fresh = values - seasonal
        if not seen.all():  # keep what the slots held for the models not observed
            values = np.where(seen, values, self._obs[slot, :, cols])
            fresh = np.where(seen, fresh, self._err[eslot, :, cols])
        self._obs[slot, :, cols] = values
        self._obs_win[slot, cols] = np.where(seen, window, self._obs_win[slot, cols])
        self._err[eslot, :, cols] = fresh
        self._err_win[eslot, cols] = np.where(seen, window, self._err_win[eslot, cols])
        newer = seen & (window >= self._last_win[cols])
        self._last[:, cols] = np.where(newer, values, self._last[:, cols])
        self._last_win[cols] = np.where(newer, window, self._last_win[cols])

    def _score_peaks(
        self, cols: slice, window: int, experts: np.ndarray, values: np.ndarray, seen: np.ndarray
    ) -> None:
        """Before the weights learn ``window``: add its errors to what :func:`choose_peak`
        compares, and refit the burst shift on the residuals with it (models ``seen`` only)."""
        mix = self.params.mix
        assert mix is not None
        w = self._w[:, :, cols]
        avg = (w[:, 0] * experts[:, 0]).sum(axis=0)
        central = (w[:, 2] * experts[:, 1]).sum(axis=0)
        y = values[1]
        forecasts = (
            np.maximum((w[:, 1] * experts[:, 1]).sum(axis=0), avg),
            np.maximum(central + self._shift[cols], avg),
        )
        _tally(self._sel_err[:, cols], self._sel_missed[:, cols], y, seen, forecasts, mix.capacity)
        self._sel_seen[cols] += seen
        _refit_shift(
            np.where(seen, y - central, np.nan),
            window,
            mix.miss_cost * mix.capacity,
            mix.capacity,
            self._res[:, cols],
            self._res_last[cols],
            self._hist[cols],
            self._shift[cols],
        )

    def predict(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (average, peak) concurrency of ``window`` for every model, in row order."""
        p = self.params
        n = len(self._rows)
        cols = slice(0, n)
        # The newest error is that of the last closed window, even when predicting further out.
        newest = min(window, int(self._last_win[:n].max()) + 1 if n else 0) - 1
        if p.mix is not None:
            pred = self._kernel(cols, window, newest, self._w[:, :, cols])
            shifted = np.maximum(pred[2] + self._shift[cols], pred[0])
            use = _takes_shift(
                self._sel_err[:, cols], self._sel_missed[:, cols], self._sel_seen[cols]
            )
            return pred[0], np.where(use, shifted, pred[1])
        else:
            pred = self._csp(cols, window, newest)
            if p.blend:
                pred = (1.0 - p.blend) * pred + p.blend * np.nan_to_num(self._last[:, cols])
        return pred[0], pred[1]

    def last(self) -> tuple[np.ndarray, np.ndarray]:
        """The newest observed (average, peak) of every model, 0 where none, in row order."""
        last = np.nan_to_num(self._last[:, : len(self._rows)])
        return last[0], last[1]

    def predict_model(self, window: int) -> dict[str, tuple[float, float]]:
        """:meth:`predict` as a mapping model -> (average, peak)."""
        avg, peak = self.predict(window)
        return {m: (float(avg[r]), float(peak[r])) for m, r in self._rows.items()}

    # Everything :meth:`observe` changes, by attribute name; the last axis is the model column.
    _STATE = (
        "_obs",
        "_obs_win",
        "_err",
        "_err_win",
        "_last",
        "_last_win",
        "_loss",
        "_level",
        "_w",
        "_ses_level",
        "_ses_loss",
        "_res",
        "_res_last",
        "_shift",
        "_sel_err",
        "_sel_missed",
        "_sel_seen",
    )

    def state(self) -> dict[str, np.ndarray]:
        """A copy of what the forecaster has learnt, so a restarted planner can go on from it:
        one array per ring or mixture statistic (model columns last, in :attr:`models` order)."""
        n = len(self._rows)
        return {name.lstrip("_"): getattr(self, name)[..., :n].copy() for name in self._STATE}

    def restore(self, models: tuple[str, ...], state: dict[str, np.ndarray]) -> None:
        """Take over ``state`` (from :meth:`state`) for ``models``, its columns in order.

        Models observed here and not in ``models`` keep what they have. Raises ValueError when
        the arrays do not fit this forecaster's shape (its parameters changed), since windows
        would land in the wrong ring slots."""
        cols = [self._row(m) for m in models]
        for name in self._STATE:
            have, saved = getattr(self, name), state[name.lstrip("_")]
            if saved.shape != (*have.shape[:-1], len(models)):
                raise ValueError(f"{name}: saved shape {saved.shape} does not fit {have.shape}")
            have[..., cols] = saved
        if self.params.mix is not None:  # each residual ring binned again
            idx = np.array(cols, dtype=np.int64)
            hist = self._hist[idx]
            _rebin(self._res[:, idx], self._res_last[idx], self.params.mix.capacity, hist)
            self._hist[idx] = hist
