"""The Corrective Seasonal Predictor and the expert mixture on hand-made series, and online ==
batch."""

from __future__ import annotations

import numpy as np
import pytest

from warmserve.evaluation.batch import (
    auto_ses,
    burst_shift,
    choose_peak,
    csp,
    experts,
    last_value,
    mix_experts,
    mixture,
    mixture_pair,
    recent_quantile,
    seasonal_naive,
    seasonal_part,
    seasonal_slope,
)
from warmserve.policy.forecast import CSPParams, Forecaster, MixParams
from warmserve.policy.forecast.shift import SHIFT_BINS, SHIFT_COLUMNS, SHIFT_REACH, SHIFT_STEPS

NAN = np.nan


def test_pure_season_is_predicted_exactly_after_one_period() -> None:
    day = np.array([1.0, 5.0, 9.0, 3.0])
    h = np.tile(day, 4)[None, :]
    pred = csp(h, CSPParams(period=4, periods=3))
    assert np.allclose(pred[0, 4:], h[0, 4:])


def test_seasonal_part_averages_the_available_periods_only() -> None:
    h = np.array([[1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 0.0]])
    s = seasonal_part(h, period=3, periods=3)
    assert np.isnan(s[0, :3]).all()
    assert s[0, 3] == 1.0  # one period of history
    assert s[0, 6] == pytest.approx((1.0 + 5.0) / 2)  # two periods, fewer than D=3


def test_correction_weights_double_toward_the_newest_error() -> None:
    # Period 3; day 0 = 0,0,0; day 1 = 1,4,?: seasonal of day 1 is 0, so errors are 1 and 4.
    h = np.array([[0.0, 0.0, 0.0, 1.0, 4.0, 0.0]])
    pred = csp(h, CSPParams(period=3, periods=3, correction_windows=10, decay=0.5))
    assert pred[0, 5] == pytest.approx((0.5 * 1.0 + 1.0 * 4.0) / 1.5)
    assert pred[0, 3] == 0.0  # first window of a period: no correction (the paper's reset)


def test_correction_uses_at_most_n_errors() -> None:
    h = np.array([[100.0, 0.0, 0.0, 0.0, 0.0]])
    pred = csp(h, CSPParams(period=100, periods=1, correction_windows=2))
    assert pred[0, 1] == 100.0
    assert pred[0, 3] == 0.0  # the 100 is three windows back, beyond N=2


def test_prediction_is_clamped_at_zero() -> None:
    h = np.array([[10.0, 10.0, 0.0, 0.0]])  # day 1 falls to zero: error -10
    pred = csp(h, CSPParams(period=2, periods=1, correction_windows=1, decay=0.5))
    assert pred[0, 3] == 0.0  # seasonal 10 + correction -10, and never below zero


def test_missing_windows_drop_out() -> None:
    h = np.array([[2.0, NAN, 4.0, 6.0, NAN, NAN]])
    pred = csp(h, CSPParams(period=3, periods=3, correction_windows=2, decay=0.5))
    # window 4: seasonal of the missing window 1 is nothing -> 0; correction: error of
    # window 3 is 6 - 2 = 4 (window 2 was in the previous period).
    assert pred[0, 4] == pytest.approx(4.0)
    # window 5: seasonal 4; errors: window 4 missing, window 3 is 4 -> weight renormalised.
    assert pred[0, 5] == pytest.approx(4.0 + 4.0)
    assert not np.isnan(pred).any()


def test_new_model_predicts_zero_then_follows_its_level() -> None:
    f = Forecaster(CSPParams(period=4, periods=3))
    f.observe("old", 0, 1.0, 2.0)
    f.observe("new", 1, 3.0, 5.0)  # first seen mid-period
    pred = f.predict_model(2)
    assert pred["new"] == pytest.approx((3.0, 5.0))
    f2 = Forecaster(CSPParams(period=4, periods=3), models=("never",))
    assert f2.predict_model(7) == {"never": (0.0, 0.0)}


def test_baselines() -> None:
    h = np.array([[1.0, NAN, 3.0, 4.0]])
    assert list(last_value(h)[0]) == [0.0, 1.0, 1.0, 3.0]
    assert list(seasonal_naive(h, 2)[0]) == [0.0, 1.0, 1.0, 3.0]  # window 3: t-2 missing


@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize("blend", [0.0, 0.5])
def test_online_forecaster_matches_batch(reset: bool, blend: float) -> None:
    rng = np.random.default_rng(7)
    period, t, m = 6, 40, 5
    avg = rng.gamma(2.0, 3.0, (m, t)) * (1 + np.sin(np.arange(t) * 2 * np.pi / period))
    avg[rng.random((m, t)) < 0.1] = NAN
    peak = avg * 2
    params = CSPParams(period=period, periods=3, correction_windows=4, reset=reset, blend=blend)
    want_avg, want_peak = csp(avg, params), csp(peak, params)
    f = Forecaster(params, models=tuple(f"m{i}" for i in range(m)))
    for w in range(t):
        got_avg, got_peak = f.predict(w)
        assert np.allclose(got_avg, want_avg[:, w]), w
        assert np.allclose(got_peak, want_peak[:, w]), w
        for i in range(m):
            if not np.isnan(avg[i, w]):
                f.observe(f"m{i}", w, avg[i, w], peak[i, w])


def test_recent_quantile_ignores_missing_windows() -> None:
    h = np.array([[4.0, NAN, 2.0, 8.0]])
    assert recent_quantile(h, 2, 0.5)[0].tolist() == [0.0, 4.0, 4.0, 2.0]
    assert recent_quantile(h, 3, 0.5)[0, 3] == 3.0  # the median of 4 and 2
    assert recent_quantile(h, 3, 1.0)[0, 3] == 4.0


def test_mixture_follows_the_expert_with_the_least_recent_error() -> None:
    # A flat series: last value is exact from window 1 on, so it takes (nearly) all the weight.
    h = np.full((1, 60), 7.0)
    h[0, :5] = [1.0, 30.0, 2.0, 50.0, 7.0]
    pred = mixture(h, CSPParams(period=10, mix=MixParams()))
    assert pred[0, -1] == pytest.approx(7.0)


def test_online_mixture_matches_batch() -> None:
    rng = np.random.default_rng(3)
    period, t, m = 6, 40, 4
    avg = rng.gamma(2.0, 3.0, (m, t)) * (1 + np.sin(np.arange(t) * 2 * np.pi / period))
    avg[rng.random((m, t)) < 0.1] = NAN
    peak = avg * rng.uniform(1.0, 3.0, (m, t))
    params = CSPParams(period, 3, 4, decay=0.8, reset=False, mix=MixParams(eta=(50.0, 50.0)))
    want_avg, want_peak = mixture_pair(avg, peak, params)
    f = Forecaster(params, models=tuple(f"m{i}" for i in range(m)))
    for w in range(t):
        got_avg, got_peak = f.predict(w)
        assert np.allclose(got_avg, want_avg[:, w]), w
        assert np.allclose(got_peak, want_peak[:, w]), w
        for i in range(m):
            if not np.isnan(avg[i, w]):
                f.observe(f"m{i}", w, avg[i, w], peak[i, w])


def test_observe_all_skips_models_whose_window_is_missing() -> None:
    """NaN in ``observe_all`` means not observed: the same as never calling ``observe``."""
    rng = np.random.default_rng(5)
    period, t, m = 4, 30, 3
    avg = rng.gamma(2.0, 3.0, (m, t))
    avg[rng.random((m, t)) < 0.2] = NAN
    peak = avg * 1.5
    params = CSPParams(period, 2, 3, decay=0.8, reset=False, mix=MixParams())
    names = tuple(f"m{i}" for i in range(m))
    vec, one = Forecaster(params, names), Forecaster(params, names)
    want_avg, want_peak = mixture_pair(avg, peak, params)
    for w in range(t):
        got_avg, got_peak = vec.predict(w)
        assert np.allclose(got_avg, want_avg[:, w]) and np.allclose(got_peak, want_peak[:, w])
        vec.observe_all(w, avg[:, w], peak[:, w])
        for i in range(m):
            if not np.isnan(avg[i, w]):
                one.observe(names[i], w, avg[i, w], peak[i, w])
        assert np.allclose(vec.predict(w + 1), one.predict(w + 1))


def test_peak_forecast_is_never_below_the_average_forecast() -> None:
    rng = np.random.default_rng(9)
    avg = rng.gamma(2.0, 3.0, (4, 50))
    peak = avg * rng.uniform(0.2, 1.2, avg.shape)  # peaks often below averages: bad data
    params = CSPParams(5, 3, 4, mix=MixParams())
    a, p = mixture_pair(avg, peak, params)
    assert (p >= a).all()


def test_batch_mixture_takes_fewer_windows_than_its_experts_look_back() -> None:
    """The recent-window experts look up to 12 windows back; a shorter history (a short run's
    report) still gets one prediction per window, equal to the online forecaster's."""
    params = CSPParams(5, 3, 4, mix=MixParams())
    history = np.array([[1.0, 3.0, 2.0]])
    a, p = mixture_pair(history, 2 * history, params)
    f = Forecaster(params, ("m",))
    online = []
    for w in range(3):
        online.append(f.predict(w)[0][0])
        f.observe("m", w, history[0, w], 2 * history[0, w])
    np.testing.assert_allclose(a[0], online)
    assert p.shape == (1, 3)


def test_auto_ses_follows_a_random_walk_and_smooths_noise() -> None:
    """A random walk is best predicted by its last value (weight 1); noise around a constant
    by a heavy smoothing (the smallest weight): each series picks its own."""
    rng = np.random.default_rng(3)
    walk = 100 + np.cumsum(rng.normal(0, 5, 400))
    noise = 100 + rng.normal(0, 5, 400)
    pred = auto_ses(np.stack([walk, noise]), alphas=(0.2, 1.0))
    assert np.allclose(pred[0, 300:], walk[299:-1])  # weight 1: the last value
    smooth = auto_ses(noise[None], alphas=(0.2,))[0]
    assert np.allclose(pred[1, 300:], smooth[300:])
    assert np.abs(pred[1, 300:] - 100).mean() < 0.5 * np.abs(noise[299:-1] - 100).mean()


def test_auto_ses_skips_missing_windows_and_waits_for_a_first_value() -> None:
    h = np.array([[NAN, NAN, 4.0, NAN, 8.0, 8.0]])
    pred = auto_ses(h, alphas=(1.0,))
    assert pred[0].tolist() == [0.0, 0.0, 0.0, 4.0, 4.0, 8.0]


def test_mix_experts_of_the_planner_stack_is_the_mixture() -> None:
    rng = np.random.default_rng(4)
    h = rng.gamma(2.0, 10.0, (3, 60))
    params = CSPParams(
        period=12, periods=3, correction_windows=10, decay=0.8, reset=False, mix=MixParams()
    )
    e = experts(h, params)
    assert np.array_equal(mix_experts(e, h, MixParams(), 1), mixture(h, params, 1))


def test_seasonal_slope_is_yesterdays_ramp_at_this_time_of_day() -> None:
    """A daily ramp of 2 per window from window 10 to 30: the slope into a window is 2 where
    the span around the same window a day earlier lies on the ramp, less at its ends, and
    days with an end missing are left out."""
    period = 48
    day = np.zeros(period)
    day[10:31] = np.arange(0, 42, 2)
    day[31:] = 40.0
    h = np.tile(day, 3)[None].astype(float)
    slope = seasonal_slope(h, period, periods=2, half=3)
    assert slope[0, period + 20] == pytest.approx(2.0)  # mid-ramp, a day on
    assert slope[0, period + 40] == pytest.approx(0.0)  # flat
    assert 0.0 < slope[0, period + 11] < 2.0  # the span straddles the ramp's start
    assert (slope[0, : period - 3] == 0.0).all()  # no day before
    h[0, 20 + 3] = NAN  # an end of day 0's span for window period + 20
    assert seasonal_slope(h, period, 2, 3)[0, 2 * period + 20] == pytest.approx(2.0)  # day 1
    assert seasonal_slope(h, period, 2, 3)[0, period + 20] == 0.0  # no day left


def test_slope_needs_the_smoothing_it_moves() -> None:
    with pytest.raises(ValueError, match="slope needs ses"):
        MixParams(ses=False, slope=9)
    assert MixParams(ses=False, slope=0).experts == MixParams().experts - 2


def _assert_online_matches(params, avg, peak, want_avg, want_peak) -> None:
    """Feed the windows to a Forecaster one by one (observe_all) and check each prediction
    against the batch form's."""
    f = Forecaster(params, models=tuple(f"m{i}" for i in range(avg.shape[0])))
    for w in range(avg.shape[1]):
        got_avg, got_peak = f.predict(w)
        np.testing.assert_allclose(got_avg, want_avg[:, w], err_msg=str(w))
        np.testing.assert_allclose(got_peak, want_peak[:, w], err_msg=str(w))
        f.observe_all(w, avg[:, w], peak[:, w])


def test_online_mixture_matches_batch_with_the_seasonal_slope() -> None:
    """The planner's defaults (a slope over 19 windows) on a daily pattern with gaps: the
    online forecaster reads the slope's ends from its ring, the batch form from the array."""
    rng = np.random.default_rng(8)
    period, t, m = 24, 5 * 24, 3
    base = 50 * (1.2 + np.sin(np.arange(t) * 2 * np.pi / period))
    avg = base * rng.uniform(0.8, 1.2, (m, t))
    avg[rng.random((m, t)) < 0.1] = NAN
    peak = avg * rng.uniform(1.0, 2.0, (m, t))
    params = CSPParams(period, 3, 4, decay=0.8, reset=False, mix=MixParams())
    want_avg, want_peak = mixture_pair(avg, peak, params)
    _assert_online_matches(params, avg, peak, want_avg, want_peak)


def _shift_cost(r: np.ndarray, d: float, cost: float, capacity: float) -> float:
    return float(np.abs(r - d).sum() + cost * ((r - d) > capacity).sum())


def test_burst_shift_minimises_error_plus_missed_bursts() -> None:
    """The shift after the last window is the least, over its lattice (multiples of
    capacity / SHIFT_STEPS within SHIFT_REACH capacities), of the absolute error plus the cost
    of the missed bursts over the residuals of the window it looks back on, checked against
    every lattice point; some residuals lie beyond the lattice's reach."""
    rng = np.random.default_rng(4)
    mix = MixParams(capacity=10.0, miss_cost=2.0, shift_periods=5)
    r = np.round(rng.gamma(1.5, 6.0, 80) - 6.0, 1)  # right-skewed, with ties
    r[[45, 60]] = (-95.0, 130.0)
    central = np.zeros((1, 81))
    peak = np.append(r, NAN)[None, :]
    d = burst_shift(central, peak, mix, period=8)[0, -1]  # fitted on the last 40 residuals
    window = r[-40:]
    step = 10.0 / SHIFT_STEPS
    lattice = np.arange(-SHIFT_REACH * SHIFT_STEPS, (SHIFT_REACH - 1) * SHIFT_STEPS + 1) * step
    assert d in lattice and d > 0
    best = min(_shift_cost(window, g, 20.0, 10.0) for g in lattice)
    assert _shift_cost(window, d, 20.0, 10.0) <= best + 1e-9


def test_burst_shift_is_the_median_unless_raising_buys_hits() -> None:
    """Residuals far inside one capacity miss nothing: the shift is their median. Residuals
    that now and then exceed it by a little: raising by that little costs less than the
    misses it saves, so the shift is just enough to catch them."""
    mix = MixParams(capacity=32.0, miss_cost=2.0, shift_periods=10)
    central = np.zeros((1, 101))
    calm = np.append(np.tile([-2.0, -1.0, 0.0, 1.0, 3.0], 20), NAN)[None, :]
    assert burst_shift(central, calm, mix, period=10)[0, -1] == 0.0  # the median
    spiky = np.append(np.tile([0.0, 0.0, 0.0, 0.0, 40.0], 20), NAN)[None, :]
    # Raising to 8 (40 - 32) costs 8 per window, 6.4 on average; a miss costs 64, 12.8.
    assert burst_shift(central, spiky, mix, period=10)[0, -1] == pytest.approx(8.0)


def test_choose_peak_takes_the_forecast_that_did_better_so_far() -> None:
    """The quantile forecast serves for the first windows and keeps ties; then whichever
    has the lower product of absolute error and missed bursts (plus one) so far."""
    peak = np.full((2, 30), 100.0)
    exact, low = np.full((2, 30), 100.0), np.full((2, 30), 50.0)  # low misses every window
    chosen = choose_peak(np.stack([exact[0], low[1]]), np.stack([low[0], exact[1]]), peak, 32.0)
    assert (chosen[0] == 100.0).all()  # the quantile forecast is the better one
    assert (chosen[1, :12] == 50.0).all() and (chosen[1, 12:] == 100.0).all()


def test_online_burst_shift_and_peak_choice_match_batch() -> None:
    """A capacity small against the peaks, so bursts are missed, the shift moves and some
    windows take the shifted forecast; a short shift window, so the online ring wraps."""
    rng = np.random.default_rng(11)
    period, t, m = 6, 90, 4
    avg = rng.gamma(2.0, 3.0, (m, t)) * (1 + np.sin(np.arange(t) * 2 * np.pi / period))
    avg[rng.random((m, t)) < 0.1] = NAN
    peak = avg * rng.uniform(1.0, 3.0, (m, t))
    mix = MixParams(eta=(50.0, 50.0), capacity=4.0, shift_periods=3)
    params = CSPParams(period, 3, 4, decay=0.8, reset=False, mix=mix)
    want_avg, want_peak = mixture_pair(avg, peak, params)
    e = experts(peak, params)
    quantile = np.maximum(mix_experts(e, peak, mix, 1), want_avg)
    central = mix_experts(e, peak, mix, 1, tau=0.5)
    assert (burst_shift(central, peak, mix, period) != 0).any()
    assert (want_peak != quantile).any()  # some windows take the shifted forecast
    _assert_online_matches(params, avg, peak, want_avg, want_peak)


def test_a_window_observed_again_replaces_its_residual() -> None:
    """A window delivered twice (a retried report) leaves one residual per window in the burst
    shift's binned ring, not two."""
    rng = np.random.default_rng(13)
    params = CSPParams(6, 3, 4, mix=MixParams(capacity=4.0, shift_periods=10))
    f = Forecaster(params, ("a", "b"))
    for w in range(30):
        avg = rng.gamma(2.0, 3.0, 2)
        f.observe_all(w, avg, 2 * avg)
        f.observe_all(w, avg, 2 * avg)
    assert (f._hist[:2, 0, SHIFT_COLUMNS - 1] == 30).all()  # the count of all residuals
    assert (f._hist[:2, 0, :SHIFT_BINS].sum(axis=1) == 30).all()


def test_restored_forecaster_predicts_as_the_one_it_was_saved_from() -> None:
    """state() and restore() carry the residual rings; restore rebuilds their sorted copies,
    so the burst shift (acting here: a small capacity) goes on as it would have."""
    rng = np.random.default_rng(12)
    period, t, m = 6, 60, 3
    avg = rng.gamma(2.0, 3.0, (m, t))
    peak = avg * rng.uniform(1.0, 3.0, (m, t))
    params = CSPParams(period, 3, 4, mix=MixParams(capacity=4.0, shift_periods=2))
    names = tuple(f"m{i}" for i in range(m))
    saved = Forecaster(params, names)
    for w in range(30):
        saved.observe_all(w, avg[:, w], peak[:, w])
    restored = Forecaster(params)
    restored.restore(names, saved.state())
    assert (restored._shift != 0).any()
    for w in range(30, t):
        np.testing.assert_allclose(restored.predict(w), saved.predict(w))
        saved.observe_all(w, avg[:, w], peak[:, w])
        restored.observe_all(w, avg[:, w], peak[:, w])


_COMPILED = """
import json
from warmserve.policy.config import PolicyConfig
from warmserve.policy.factory import make_policy
from numba.core.registry import CPUDispatcher
from warmserve.policy.forecast import kernels, shift
from warmserve.registry import ModelSpec

def signatures():
    return {
        f"{m.__name__}.{name}": [str(s) for s in k.signatures]
        for m in (kernels, shift)
        for name, k in vars(m).items()
        if isinstance(k, CPUDispatcher)
    }

models = {f"m{i}": ModelSpec(f"m{i}", "f", 10**8) for i in range(7)}
policy = make_policy("warmserve", models, PolicyConfig())
policy.prepare()
prepared = signatures()
now = 6_000_000.0
policy.forecast(now)  # the first request's on-demand call, before any window closed
for k in range(3):  # windows closing one model at a time, as the scheduler feeds them
    for m in models:
        policy.observe(m, int(now // 300) + k, 0.5 * k, 2.0)
    policy.forecast(now + 300 * (k + 1))
print(json.dumps([prepared, signatures()]))
"""


def test_prepare_compiles_every_kernel_the_live_planner_calls() -> None:
    """The live scheduler compiles the forecaster's numba kernels in a thread at start
    (``Policy.prepare``); a kernel signature first seen later would compile on its event loop,
    which froze every request for 15 s in the soak. A fresh process, so no earlier test's
    compiling hides a signature that prepare misses."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _COMPILED], capture_output=True, text=True, check=True
    )
    prepared, used = json.loads(out.stdout.splitlines()[-1])
    assert used == prepared
    kernels = ("expert_kernel", "learn", "smooth")
    assert all(prepared[f"warmserve.policy.forecast.kernels.{k}"] for k in kernels), prepared
    assert prepared["warmserve.policy.forecast.shift.refit_shift"], prepared
