"""Load forecasting: the Corrective Seasonal Predictor (CSP), its baselines and a tuned blend.

LLM load repeats daily, so the prediction for window ``i`` of period ``k`` starts from the mean of
the same window over the previous ``D`` periods (the *seasonal part*). Days differ in level, so a
*correction* is added: the weighted mean of the last ``min(i, N)`` errors (observed minus seasonal)
of this period, each weight twice the one before it, so the newest error counts most. The sum is
clamped at zero. Average and peak concurrency are forecast the same way, each on its own.

Missing windows are NaN: they drop out of the seasonal mean and of the correction (the weights of
the remaining errors are renormalised). A window with no seasonal history (the first period, a new
model) has a seasonal part of zero, so its correction is the recent level itself.

Two forms share the same arithmetic:

- batch functions over a ``models x windows`` array give the one-step-ahead prediction of every
  window from the windows before it (``warmserve forecast eval`` scores them);
- :class:`Forecaster` keeps ring buffers and predicts one window for all models at once, which
  is what the planner calls every tick (vectorised across models: 10,000 models in well under a
  millisecond, see ``bench/policy_bench.py``).

The tuned variant (``reset=False``, ``blend``) lets the correction run across period boundaries
and mixes in the last observed value: on 600 s ServeGen windows the seasonal part carries
day-to-day noise that the plain CSP passes straight into its prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CSPParams:
    """Shape of a CSP forecaster; defaults are the paper's (plain CSP)."""

    period: int  # windows per period
    periods: int = 3  # D
    correction_windows: int = 10  # N
    decay: float = 0.5  # weight ratio of an error to the next more recent one
    reset: bool = True  # corrections use only errors of the current period (the paper's CSP)
    blend: float = 0.0  # weight of the last observed value mixed into the prediction


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


def _carry_forward(history: np.ndarray) -> np.ndarray:
    """Replace each NaN by the last non-NaN value before it in its row (NaN if none)."""
    m, t = history.shape
    idx = np.where(~np.isnan(history), np.arange(t), -1)
    np.maximum.accumulate(idx, axis=1, out=idx)
    out = history[np.arange(m)[:, None], np.maximum(idx, 0)]
    out[idx < 0] = np.nan
    return out


class Forecaster:
    """Online CSP over many models: ring buffers of observations and errors, vectorised.

    Rows are models (added as they are first observed, so new models need no registration);
    two planes hold average (0) and peak (1) concurrency. :meth:`predict` forecasts any window
    from what was observed before it, so the planner can ask for the window now open and the
    next one.
    """

    def __init__(self, params: CSPParams, models: tuple[str, ...] = ()) -> None:
        self.params = params
        self._span = params.period * params.periods  # ring of observations
        self._nerr = max(params.correction_windows, 1)
        self._rows: dict[str, int] = {}
        self._obs = np.full((2, 0, self._span), np.nan)
        self._obs_win = np.full((0, self._span), -1, dtype=np.int64)
        self._err = np.full((2, 0, self._nerr), np.nan)
        self._err_win = np.full((0, self._nerr), -1, dtype=np.int64)
        self._last = np.full((2, 0), np.nan)
        self._last_win = np.full(0, -1, dtype=np.int64)
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
        if row >= self._obs.shape[1]:
            grow = max(16, row)
            self._obs = np.concatenate([self._obs, np.full((2, grow, self._span), np.nan)], 1)
            self._obs_win = np.concatenate(
                [self._obs_win, np.full((grow, self._span), -1, dtype=np.int64)]
            )
            self._err = np.concatenate([self._err, np.full((2, grow, self._nerr), np.nan)], 1)
            self._err_win = np.concatenate(
                [self._err_win, np.full((grow, self._nerr), -1, dtype=np.int64)]
            )
            self._last = np.concatenate([self._last, np.full((2, grow), np.nan)], 1)
            self._last_win = np.concatenate([self._last_win, np.full(grow, -1, dtype=np.int64)])
        return row

    def _seasonal(self, rows: np.ndarray | slice, window: int) -> np.ndarray:
        """Seasonal part (2 x rows) of ``window`` from the ring; 0 where nothing was seen."""
        p = self.params
        obs = self._obs[:, rows]
        wins = self._obs_win[rows]
        total = np.zeros(obs.shape[:2])
        count = np.zeros(obs.shape[1])
        for k in range(1, p.periods + 1):
            w = window - k * p.period
            if w < 0:
                break
            slot = w % self._span
            ok = wins[:, slot] == w
            total += np.where(ok, obs[:, :, slot], 0.0)
            count += ok
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), 0.0)

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        """Record the closed window ``window`` of ``model``."""
        row = self._row(model)
        rows = np.array([row])
        self._store(rows, window, np.array([[avg], [peak]], dtype=float))

    def observe_all(self, window: int, avg: np.ndarray, peak: np.ndarray) -> None:
        """Record ``window`` for every model of :attr:`models` at once (arrays in that order)."""
        rows = np.arange(len(self._rows))
        self._store(rows, window, np.stack([avg, peak]).astype(float))

    def _store(self, rows: np.ndarray, window: int, values: np.ndarray) -> None:
        seasonal = self._seasonal(rows, window)
        slot = window % self._span
        self._obs[:, rows, slot] = values
        self._obs_win[rows, slot] = window
        eslot = window % self._nerr
        self._err[:, rows, eslot] = values - seasonal
        self._err_win[rows, eslot] = window
        newer = window >= self._last_win[rows]
        self._last[:, rows[newer]] = values[:, newer]
        self._last_win[rows[newer]] = window

    def predict(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (average, peak) concurrency of ``window`` for every model, in row order."""
        p = self.params
        n = len(self._rows)
        seasonal = self._seasonal(slice(0, n), window)
        start = window - window % p.period if p.reset else 0  # oldest error allowed
        num = np.zeros((2, n))
        den = np.zeros(n)
        weight = 1.0
        # The newest error is that of the last closed window, even when predicting further out.
        newest = int(self._last_win[:n].max()) if n else -1
        for j in range(1, p.correction_windows + 1):
            w = min(window, newest + 1) - j
            if w < start:
                break
            slot = w % self._nerr
            ok = self._err_win[:n, slot] == w
            num += np.where(ok, weight * self._err[:, :n, slot], 0.0)
            den += ok * weight
            weight *= p.decay
        correction = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
        pred = np.maximum(seasonal + correction, 0.0)
        if p.blend:
            pred = (1.0 - p.blend) * pred + p.blend * np.nan_to_num(self._last[:, :n])
        return pred[0], pred[1]

    def last(self) -> tuple[np.ndarray, np.ndarray]:
        """The newest observed (average, peak) of every model, 0 where none, in row order."""
        last = np.nan_to_num(self._last[:, : len(self._rows)])
        return last[0], last[1]

    def predict_model(self, window: int) -> dict[str, tuple[float, float]]:
        """:meth:`predict` as a mapping model -> (average, peak)."""
        avg, peak = self.predict(window)
        return {m: (float(avg[r]), float(peak[r])) for m, r in self._rows.items()}
