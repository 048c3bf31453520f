"""The tuning of the planner mixture's settings on the tune part of every series
(:func:`tune`): which experts take part, and per plane the weighting's sharpness and memory."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from warmserve.evaluation import batch
from warmserve.evaluation.scoring import MEASURES, _scores, model_rows, planner_params
from warmserve.evaluation.traces import CAPACITY, Forecasts, Series
from warmserve.policy.forecast import MixParams

GRID = {  # the mixture's hyper-parameters searched on the tune part
    "eta": (100.0, 300.0, 1000.0, 3000.0, 10_000.0, 30_000.0),
    "discount": (0.9, 0.95, 0.97, 0.99, 0.995, 0.998),
    "tau_peak": (0.5, 0.55, 0.6, 0.65, 0.7),
    "miss_cost": (1.0, 2.0),  # capacities of error a missed burst costs the burst shift
}

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
        refs[pool] = {
            "last-value": scores(pool, (batch.last_value(s.avg), batch.last_value(s.peak)))
        }
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
            params = planner_params(s.period, MixParams(**flags))
            stacks[name] = (batch.experts(s.avg, params), batch.experts(s.peak, params))
        avg_rows = []
        for eta, discount in itertools.product(GRID["eta"], GRID["discount"]):
            mix = MixParams(eta=(eta, eta), discount=(discount, discount), **flags)
            preds = {n: batch.mix_experts(stacks[n][0], s.avg, mix, 0) for n, s in loaded.items()}
            rows = {n: (a, a) for n, a in preds.items()}
            avg_rows.append(((eta, discount), ratios(rows, ("wape_avg",)), preds))
        (eta_a, disc_a), avg_ratios, avg_pred = best(avg_rows)
        peak_rows = []
        for eta, discount in itertools.product(GRID["eta"], GRID["discount"]):
            # What the peak forecast chooses between (batch.mixture_pair): the central mixture
            # moved by its burst shift, per miss cost, and the quantile mixture, per tau.
            mix = MixParams((eta, eta), (discount, discount), capacity=CAPACITY, **flags)
            shifted = {cost: {} for cost in GRID["miss_cost"]}
            for n, s in loaded.items():
                central = batch.mix_experts(stacks[n][1], s.peak, mix, 1, tau=0.5)
                for cost in GRID["miss_cost"]:
                    costed = replace(mix, miss_cost=cost)
                    shifted[cost][n] = batch.shifted_peak(
                        central, s.peak, avg_pred[n], costed, s.period
                    )
            for tau in GRID["tau_peak"]:
                quantile = {
                    n: np.maximum(
                        batch.mix_experts(stacks[n][1], s.peak, mix, 1, tau=tau), avg_pred[n]
                    )
                    for n, s in loaded.items()
                }
                for cost in GRID["miss_cost"]:
                    preds = {
                        n: (
                            avg_pred[n],
                            batch.choose_peak(quantile[n], shifted[cost][n], s.peak, mix.capacity),
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
    default = MixParams()
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
