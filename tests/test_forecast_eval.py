"""``warmserve forecast eval`` pieces that do not need the raw traces: the sampled ServeGen
concurrency, scoring with missing windows, the split."""

from __future__ import annotations

import numpy as np
import pytest

from warmserve.evaluation import scoring, traces, tuning


def _one_client(rate: float, dist: str, shape: float, t: int = 6):
    win = np.arange(t, dtype=np.int64)
    return win, np.full(t, rate), np.array([dist] * t, dtype=object), np.full(t, shape)


def test_sampled_poisson_client_has_littles_law_average_and_a_modest_peak() -> None:
    win, rate, dist, shape = _one_client(20.0, "Gamma", 1.0)  # exponential gaps: Poisson
    avg, peak = traces.sampled_concurrency(win, rate, dist, shape, 6, 600.0, seed=1)
    mean = 20.0 * traces.LATENCY
    assert avg[1:] == pytest.approx(np.full(5, mean), rel=0.05)  # window 0 starts empty
    # The most in flight over 6,000 looks at a Poisson count of mean 40: some 3 to 5 sd above.
    assert ((peak > mean + 2 * np.sqrt(mean)) & (peak < mean + 7 * np.sqrt(mean))).all()


def test_bursty_fit_gives_higher_peaks_than_poisson_at_the_same_rate() -> None:
    calm = traces.sampled_concurrency(*_one_client(20.0, "Gamma", 1.0), 6, 600.0, seed=1)
    bursty = traces.sampled_concurrency(*_one_client(20.0, "Weibull", 0.3), 6, 600.0, seed=1)
    assert bursty[1][1:].mean() > 1.5 * calm[1][1:].mean()
    assert bursty[0][1:] == pytest.approx(calm[0][1:], rel=0.1)  # the same average


def test_sampling_is_deterministic_and_unfitted_windows_are_empty() -> None:
    win, rate, dist, shape = _one_client(5.0, "Weibull", 0.6)
    dist[2] = ""  # ServeGen leaves windows without requests unfitted
    a = traces.sampled_concurrency(win, rate, dist, shape, 6, 600.0, seed=3)
    b = traces.sampled_concurrency(win, rate, dist, shape, 6, 600.0, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0][2] < 5.0 * traces.LATENCY * 0.01  # only the tail of window 1's requests


def test_scores_skip_missing_windows() -> None:
    actual = np.array([[10.0, np.nan, 10.0]])
    pred = np.array([[12.0, 1000.0, 8.0]])
    peak = actual * 2
    sc = scoring._scores(pred, actual, pred * 2, peak)
    assert sc["wape_avg"] == pytest.approx(4.0 / 20.0)
    assert sc["windows"] == 2
    assert sc["missed_burst"] == 0.0


def test_held_out_part_follows_the_tune_part() -> None:
    s = traces.Series("servegen", ["m"], np.ones((1, 2016)), np.ones((1, 2016)), 600.0, 144, 432)
    assert scoring._part(s, "tune") == slice(432, 432 + 4 * 144)
    assert scoring._part(s, "held_out") == slice(432 + 4 * 144, 2016)


def test_bar_intervals_separate_a_clear_margin_from_noise() -> None:
    """A forecaster off by 1 everywhere beats one off by 3 clearly; one that differs from the
    baseline only by noise ties with it; the point estimates agree with ``_scores``."""
    rng = np.random.default_rng(0)
    t, period = 6 * 144, 144
    actual = 50.0 + rng.normal(0.0, 5.0, (2, t))
    s = traces.Series(
        "servegen", ["m0", "m1"], actual, actual * 2, 600.0, period, period, period * 2
    )
    held = np.arange(s.tune_end, t)

    def pair(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x, x * 2

    near = pair(actual + rng.choice([-1.0, 1.0], actual.shape))
    far = pair(actual + rng.choice([-3.0, 3.0], actual.shape))
    noisy = pair(actual + rng.normal(0.0, 1.25, actual.shape))  # mean absolute error 1.0 too
    preds = {"mixture": near, "last-value": far, "auto-ses": noisy}
    result = {
        "_preds": preds,
        "held_out": {
            n: scoring._scores(a[:, held], actual[:, held], p[:, held], s.peak[:, held])
            for n, (a, p) in preds.items()
        },
    }
    result["held_out_models_only"] = result["held_out"]
    out = scoring.bar(result, s)["all_held_out"]
    clear = out["last-value"]["wape_avg"]
    assert clear["clear"] == "better" and clear["ci95"][1] < 0
    assert clear["relative"] == pytest.approx(1 / 3 - 1, abs=0.01)
    assert out["auto-ses"]["wape_avg"]["clear"] == "tie"
    assert out["auto-ses"]["wape_avg"]["ci95"][0] < 0 < out["auto-ses"]["wape_avg"]["ci95"][1]


def test_tuning_picks_the_setting_whose_worst_ratios_sort_lowest(monkeypatch) -> None:
    """On a small grid and a synthetic trace (a daily ramp whose level moves from day to day):
    every expert set gets its best setting, and the chosen set's ratios, largest first, sort
    no higher than any other's; without AutoETS last-value is the only baseline."""
    monkeypatch.setattr(
        tuning,
        "GRID",
        {
            "eta": (300.0, 30_000.0),
            "discount": (0.99, 0.998),
            "tau_peak": (0.6, 0.65),
            "miss_cost": (1.0, 2.0),
        },
    )
    rng = np.random.default_rng(1)
    period, days = 24, 9
    t = period * days
    ramp = np.tile(np.clip(np.arange(period) - 6.0, 0.0, 12.0) * 8.0, days)
    level = np.repeat(rng.uniform(0.7, 1.3, days), period)
    avg = (40.0 + ramp) * level + rng.normal(0.0, 3.0, (2, t))
    peak = avg * 1.4 + rng.gamma(2.0, 4.0, (2, t))
    s = traces.Series("servegen", ["a", "a/c1"], avg, peak, 600.0, period, 3 * period)
    out = tuning.tune({"servegen": s}, None)
    assert set(out["by_expert_set"]) == set(tuning.EXPERT_SETS)
    assert set(out["baselines"]) == {"servegen", "servegen models"}  # a client: models alone too
    assert set(out["baselines"]["servegen models"]) == {"last-value"}

    def key(label: str) -> list[float]:
        return list(out["by_expert_set"][label]["leading_ratios"].values())

    chosen = key(out["chosen"])
    assert chosen == sorted(chosen, reverse=True)
    assert all(chosen <= key(label) for label in tuning.EXPERT_SETS)
    best = out["by_expert_set"][out["chosen"]]
    assert best["eta"][0] in tuning.GRID["eta"] and best["tau_peak"] in tuning.GRID["tau_peak"]
    assert best["miss_cost"] in tuning.GRID["miss_cost"]
    assert isinstance(out["planner_defaults_are_best"], bool)
