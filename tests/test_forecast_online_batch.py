"""The planner's online forecaster equals its batch form (what ``warmserve forecast eval``
scores) on every window of real load series: the committed ServeGen and BurstGPT samples.

The series are built the way the eval builds its own from the raw traces
(:mod:`warmserve.evaluation.traces`), from what CI has: ServeGen's per-model and per-client
rates (Little's law for the average, a Poisson count's three standard deviations above it for
the peak; a window without a request is a gap), BurstGPT's requests with the eval's service time.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from warmserve.evaluation.batch import mixture_pair
from warmserve.evaluation.traces import LATENCY, TPOT, TTFT, _concurrency, _scaled
from warmserve.policy.forecast import CSPParams, Forecaster, MixParams
from warmserve.traces.schema import read_workload

SERVEGEN = "traces/servegen_language.parquet"
BURSTGPT = "traces/burstgpt.parquet"


def servegen() -> tuple[np.ndarray, np.ndarray, int]:
    table = pq.read_table(SERVEGEN, columns=["model", "client_id", "window_start_s", "rate_rps"])
    cols = table.to_pydict()
    keys = sorted(set(zip(cols["model"], cols["client_id"], strict=True)))
    win = np.array(cols["window_start_s"]) // 600
    t = int(win.max()) + 1
    avg = np.zeros((len(keys), t))
    for m, c, w, r in zip(cols["model"], cols["client_id"], win, cols["rate_rps"], strict=True):
        avg[keys.index((m, c)), w] = r * LATENCY
    peak = avg + 3 * np.sqrt(avg)
    avg[avg == 0], peak[peak == 0] = np.nan, np.nan
    return avg, peak, 144


def burstgpt() -> tuple[np.ndarray, np.ndarray, int]:
    cols = read_workload(BURSTGPT).to_pydict()
    arrive = np.array(cols["arrival"])
    depart = arrive + TTFT + TPOT * np.array(cols["output_tokens"], dtype=float)
    model = np.array(cols["model"])
    t = int(np.ceil(arrive.max() / 300)) + 1
    names = sorted(set(model))
    series = [_concurrency(arrive[model == m], depart[model == m], 300.0, t) for m in names]
    avg, peak = _scaled(*(np.array(s) for s in zip(*series, strict=True)))
    return avg, peak, 288


@pytest.mark.parametrize("load", [servegen, burstgpt])
def test_online_forecaster_equals_batch_on_every_window(load) -> None:
    avg, peak, period = load()
    params = CSPParams(period, 3, 10, decay=0.8, reset=False, mix=MixParams(capacity=32.0))
    want_avg, want_peak = mixture_pair(avg, peak, params)
    f = Forecaster(params, models=tuple(f"s{i}" for i in range(len(avg))))
    got_avg, got_peak = np.zeros_like(avg), np.zeros_like(peak)
    for w in range(avg.shape[1]):
        got_avg[:, w], got_peak[:, w] = f.predict(w)
        f.observe_all(w, avg[:, w], peak[:, w])
    assert np.isfinite(avg).sum() > 1000  # a real series, gaps included
    np.testing.assert_allclose(got_avg, want_avg, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got_peak, want_peak, rtol=1e-9, atol=1e-9)
