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

from warmserve.evaluation.batch import mixture_pair
from warmserve.policy.config import PolicyConfig
from warmserve.policy.load import LoadMeter
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


def model_load(table: pa.Table, window: float, period: float) -> Load:
    """Per-window load of every model in ``table`` and the planner's forecast of each window.

    The windows come from the :class:`~warmserve.policy.load.LoadMeter` the scheduler plugin and
    the simulator measure load with, fed each request's arrival and end in time order (an end
    before an arrival at the same time; a request that ended as it arrived holds no load)."""
    config = PolicyConfig(window=window, period=period)
    arrival, end = request_spans(table)
    names = table.column("model").to_pylist()
    models = sorted(set(names))
    row = {m: i for i, m in enumerate(models)}
    n = max(1, int(np.ceil(float(end.max(initial=0.0)) / window)))
    held = np.flatnonzero(end > arrival)
    times = np.concatenate([end[held], arrival[held]])
    arriving = np.repeat([False, True], len(held))
    meter = LoadMeter(window)
    for k in np.lexsort((arriving, times)).tolist():
        model = names[held[k % len(held)]]
        if arriving[k]:
            meter.arrive(model, float(times[k]))
        else:
            meter.depart(model, float(times[k]))
    avg = np.zeros((len(models), n))
    peak = np.zeros((len(models), n))
    for w in meter.close_until(n * window):
        if w.index < n:
            avg[row[w.model], w.index] = w.avg
            peak[row[w.model], w.index] = w.peak
    pred_avg, pred_peak = mixture_pair(avg, peak, csp_params(config))
    return Load(models, window, avg, peak, pred_avg, pred_peak)
