"""Per-model load over time from result rows, and the planner's forecast of it beside it.

A simulated run and a live replay both record, per request, when it arrived and when it ended
(``finish``, or ``arrival + latency``). Load is what the scheduler's meter counts: requests in
flight, queued or served, from arrival to end. Per window it is averaged over time and its peak
taken, as the planner observes it.

The forecast is the planner's own forecaster (:func:`warmserve.policy.planner.csp_params`) run
one window ahead over those windows: what the planner predicts for each window from the ones
before it. A live run's own forecasts live only in its scheduler (the dashboard shows them); the
report computes them again from what was measured, so both kinds of results are reported the
same way. Windows start at time 0 of the run; a live scheduler counts them from the epoch, so
its windows may be shifted by part of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from warmserve.policy.config import PolicyConfig
from warmserve.policy.forecast import mixture_pair
from warmserve.policy.planner import csp_params


@dataclass
class Load:
    """Average and peak concurrency per model (rows) and window (columns), and the forecast."""

    models: list[str]
    window: float
    avg: np.ndarray
    peak: np.ndarray
    forecast_avg: np.ndarray
    forecast_peak: np.ndarray

    def wape(self) -> dict[str, float]:
        """Weighted absolute percentage error of the forecast, all models together (windows
        with no load anywhere weigh nothing)."""
        out = {}
        for name, actual, pred in (
            ("avg", self.avg, self.forecast_avg),
            ("peak", self.peak, self.forecast_peak),
        ):
            total = float(actual.sum())
            out[name] = float(np.abs(pred - actual).sum() / total) if total else float("nan")
        return out


def request_spans(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Arrival and end of every request; a request with no known end holds no load."""
    arrival = table.column("arrival").to_numpy(zero_copy_only=False).astype(np.float64)
    end = np.full_like(arrival, np.nan)
    if "finish" in table.column_names:
        end = table.column("finish").to_numpy(zero_copy_only=False).astype(np.float64)
    if "latency" in table.column_names:
        latency = table.column("latency").to_numpy(zero_copy_only=False).astype(np.float64)
        end = np.where(np.isfinite(end), end, arrival + latency)
    return arrival, np.where(np.isfinite(end), np.maximum(end, arrival), arrival)


def concurrency(start: np.ndarray, end: np.ndarray, window: float, n: int) -> tuple:
    """Mean and peak of the number of [start, end) spans open, over ``n`` windows from 0."""
    t = np.concatenate([start, end])
    step = np.concatenate([np.ones(len(start)), -np.ones(len(end))])
    order = np.lexsort((step, t))  # at equal times a span ends before the next one starts
    t, count = t[order], np.cumsum(step[order])
    bounds = window * np.arange(n + 1)
    # Area under the step function up to each event, then up to each window boundary.
    area = np.concatenate([[0.0], np.cumsum(count[:-1] * np.diff(t))]) if len(t) else t
    at = np.searchsorted(t, bounds, side="right") - 1
    inside = at >= 0
    upto = np.zeros(n + 1)
    upto[inside] = area[at[inside]] + count[at[inside]] * (bounds[inside] - t[at[inside]])
    avg = np.diff(upto) / window
    peak = np.where(inside[:-1], count[np.maximum(at[:-1], 0)], 0.0)  # open at the window's start
    events = np.floor(t / window).astype(np.int64)
    ok = (events >= 0) & (events < n)
    np.maximum.at(peak, events[ok], count[ok])
    return avg, peak


def model_load(table: pa.Table, window: float, period: float) -> Load:
    """Per-window load of every model in ``table`` and the planner's forecast of each window."""
    config = PolicyConfig(window=window, period=period)
    arrival, end = request_spans(table)
    names = np.asarray(table.column("model").to_pylist(), dtype=object)
    models = sorted(set(names.tolist()))
    n = max(1, int(np.ceil(float(end.max(initial=0.0)) / window)))
    avg = np.zeros((len(models), n))
    peak = np.zeros((len(models), n))
    for i, m in enumerate(models):
        sel = names == m
        avg[i], peak[i] = concurrency(arrival[sel], end[sel], window, n)
    pred_avg, pred_peak = mixture_pair(avg, peak, csp_params(config))
    return Load(models, window, avg, peak, pred_avg, pred_peak)
