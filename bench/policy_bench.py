"""Planning time of the WarmServe policy at scale, and one forecast step for many models.

- plan: 128 nodes x 8 devices (80 GB each), 256 models (Zipf popularity, alpha 0.5; 1 to 70 GB;
  TP 1, 2 or 4), after a week of observed windows. ``cold`` plans on an empty cluster (every
  replica placed), ``warm`` plans again on the result with loads moved one window on.
- forecast: one window's step of the planner's forecaster for 10,000 models with three periods
  of history: ``observe_all`` (scores the experts, learns their weights, refits the burst
  shifts) of the window that closed, then :meth:`Forecaster.predict` of the next.

Reports the median of several runs. Run: ``python bench/policy_bench.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numba
import numpy as np

from warmserve.policy.accounting import apply
from warmserve.policy.config import PolicyConfig
from warmserve.policy.factory import make_policy
from warmserve.policy.forecast import Forecaster
from warmserve.policy.planner import csp_params
from warmserve.policy.state import ClusterSnapshot, DeviceSnapshot
from warmserve.registry import ModelSpec

GB = 10**9
RUNS = 7


def cluster(n_models: int = 256, nodes: int = 128, per_node: int = 8):
    rng = np.random.default_rng(0)
    models = {}
    for i in range(n_models):
        tp = int(rng.choice([1, 1, 1, 2, 4]))
        models[f"m{i}"] = ModelSpec(f"m{i}", f"f{i % 4}", int(rng.integers(1, 70)) * GB, tp)
    devices = tuple(
        DeviceSnapshot(f"n{n}g{g}", f"n{n}", 80 * GB) for n in range(nodes) for g in range(per_node)
    )
    return models, devices


def feed(policy, models, windows: int, config: PolicyConfig) -> None:
    """A week of daily-periodic windows, through the forecaster's vectorised entry point."""
    per_day = config.windows_per_period
    base = 400 * np.arange(1, len(models) + 1) ** -0.5
    for w in range(windows):
        avg = base * (1 + np.sin(2 * np.pi * (w % per_day) / per_day))
        policy.forecaster.observe_all(w, avg, 1.8 * avg)


def median_ms(fn, runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)


def _timed_plan(policy, snapshot: ClusterSnapshot) -> float:
    """Milliseconds of one plan() call (building and feeding the policy is not timed)."""
    t = time.perf_counter()
    policy.plan(snapshot)
    return (time.perf_counter() - t) * 1e3


def bench_plan() -> dict:
    config = PolicyConfig()
    models, devices = cluster()
    windows = 7 * config.windows_per_period
    loads = {m: 20.0 for m in list(models)[:64]}
    now = windows * config.window

    def fresh():
        policy = make_policy("warmserve", models, config)
        feed(policy, models, windows, config)
        return policy

    empty = ClusterSnapshot(now, models, devices, load=loads)
    policy = fresh()
    first = policy.plan(empty)
    placed = apply(empty, first, config)
    cold = statistics.median(_timed_plan(fresh(), empty) for _ in range(3))
    later = ClusterSnapshot(
        now + config.window, models, placed.devices, placed.instances, placed.host_cache, loads
    )
    # First call of a policy on this snapshot: the ledger and the scores built from nothing.
    first_call = statistics.median(_timed_plan(fresh(), later) for _ in range(3))
    # Calls that follow on the same policy, as in the scheduler and the simulator: the policy
    # keeps its ledger in step with each snapshot (LedgerCache) and re-scores what changed.
    warm_policy = fresh()
    warm = median_ms(lambda: warm_policy.plan(later))
    demand = median_ms(lambda: warm_policy.on_demand(later, "m200"))
    return {
        "devices": len(devices),
        "models": len(models),
        "actions_cold": len(first),
        "plan_cold_ms": round(cold, 3),
        "plan_warm_first_call_ms": round(first_call, 3),
        "plan_warm_ms": warm,
        "on_demand_ms": demand,
        "target_ms": 50,
    }


def bench_forecast(n: int = 10_000, steps: int = 21) -> dict:
    """One window's work for ``n`` models, as the planner does it: observe the window that
    closed (``observe_all`` scores the experts, learns their weights and refits the burst
    shifts), then predict the next. Each step is a new window, so the shift's rings move as in
    service. Medians over ``steps`` windows, on all of numba's threads and on one."""
    params = csp_params(PolicyConfig())  # the planner's forecaster (an expert mixture)
    f = Forecaster(params, tuple(f"m{i}" for i in range(n)))
    rng = np.random.default_rng(1)
    window = 3 * 288 + 12
    for w in range(window):
        avg = rng.gamma(2.0, 5.0, n)
        f.observe_all(w, avg, 2 * avg)
    threads = numba.get_num_threads()

    def timed() -> dict[str, float]:
        nonlocal window
        times = []
        for _ in range(steps):
            avg = rng.gamma(2.0, 5.0, n)
            t0 = time.perf_counter()
            f.observe_all(window, avg, 2 * avg)
            t1 = time.perf_counter()
            f.predict(window + 1)
            times.append((t1 - t0, time.perf_counter() - t1))
            window += 1
        observe, predict = (statistics.median(x) * 1e3 for x in zip(*times, strict=True))
        step = statistics.median(sum(x) for x in times) * 1e3
        return {
            "predict_ms": round(predict, 3),
            "observe_all_ms": round(observe, 3),
            "step_ms": round(step, 3),
        }

    timed()  # compile and warm the caches
    result = timed()
    numba.set_num_threads(1)  # the kernels' blocks on one core, in the same run, for the ratio
    one = timed()
    numba.set_num_threads(threads)
    return {"models": n, "threads": threads, **result, "one_thread": one, "target_ms": 5}


def main() -> None:
    result = {
        "command": "python bench/policy_bench.py",
        "python": sys.version.split()[0],
        "runs": RUNS,
        "plan": bench_plan(),
        "forecast": bench_forecast(),
    }
    print(json.dumps(result, indent=1))
    out = os.path.join(os.path.dirname(__file__), "results", "policy.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
