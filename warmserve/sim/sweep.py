"""The largest request rate a policy serves within an SLO, by a walk up a grid of rates.

SLO attainment is not monotone in the rate near a policy's limit (a burst that happens to land
on a full cluster at one rate misses it at a slightly higher one), so bisection, which assumes
it is, gives an answer that moves by several RPS with any change. :func:`max_rps` instead walks
a fixed grid upward and stops at the first rate that fails: the answer is a rate that passed
with every rate tried below it, and a failure below the limit can only lower it. Each workload
seed is one draw of the noise; callers walk the grid once per seed and report each seed's rate
and their median.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warmserve.report.metrics import request_metrics
from warmserve.sim.cluster import ClusterSpec


def rate_grid(lo: float, hi: float, step: float) -> list[float]:
    """``lo, lo + step, ...`` up to ``hi``, rounded to 1e-6 so the same rate is the same key."""
    if not 0 < lo <= hi or step <= 0:
        raise ValueError(f"need 0 < lo <= hi and step > 0, got {lo}, {hi}, {step}")
    return [round(lo + k * step, 6) for k in range(int((hi - lo) / step + 1e-9) + 1)]


def max_rps(serves: Callable[[float], bool], rates: Sequence[float], stride: int = 1) -> float:
    """The last rate of ``rates`` (ascending) passed on a walk upward that stops at the first
    failure; 0 if the first rate fails.

    With ``stride`` 1 that is the largest rate that passes with every lower rate of the grid.
    A larger ``stride`` walks every ``stride``-th rate first and then the rates between the last
    of those that passed and the first that failed, so only the top of the grid is tried
    densely: every rate tried at or below the answer passed, and the answer never exceeds the
    first coarse rate that failed, whatever ``serves`` does above it.
    """
    if stride < 1 or not rates or any(b <= a for a, b in itertools.pairwise(rates)):
        raise ValueError("need ascending rates and stride >= 1")
    coarse = list(range(0, len(rates), stride))
    last = -1  # index of the last rate passed
    stop = len(rates)  # index of the first coarse rate that failed
    for k in coarse:
        if not serves(rates[k]):
            stop = k
            break
        last = k
    for k in range(last + 1, stop):  # the rates between the last coarse pass and its failure
        if not serves(rates[k]):
            break
        last = k
    return rates[last] if last >= 0 else 0.0


def median_rps(per_seed: Sequence[float]) -> float:
    """The median of the seeds' rates (the middle one for an odd count)."""
    return float(statistics.median(per_seed))


def measured(requests: pa.Table, warmup: float) -> pa.Table:
    """The requests that arrived after the warm-up (the forecaster's first history)."""
    return requests.filter(pc.greater_equal(requests.column("arrival"), warmup))


def attainment(requests: pa.Table, slo_ttft: float, warmup: float = 0.0) -> float:
    """Fraction of the measured requests that got a first token within ``slo_ttft``."""
    return float(request_metrics(measured(requests, warmup), slo_ttft)["slo_attainment"])


def gpus_needed(workload: pa.Table, spec: ClusterSpec, capacity: int, warmup: float) -> np.ndarray:
    """At each arrival after ``warmup``, the devices that serving every request in flight at
    once would take: per model, ``ceil(in flight / capacity)`` instances of ``tp`` devices,
    each request in flight from its arrival for its prefill and decode time (cost profile).

    What a policy with one instance per device and ``capacity`` slots each cannot do better
    than, whatever it prewarms: where this exceeds the cluster's devices some request waits
    (it ignores that groups must be aligned within a node, which only makes it harder).
    """
    arrival = workload.column("arrival").to_numpy(zero_copy_only=False).astype(np.float64)
    out = workload.column("output_tokens").to_numpy(zero_copy_only=False).astype(np.float64)
    model = np.asarray(workload.column("model").to_pylist(), dtype=object)
    at = arrival[arrival >= warmup]
    need = np.zeros(len(at), np.int64)
    for name, m in spec.models.items():
        sel = model == name
        prof = spec.costs.profile(m)
        start = np.sort(arrival[sel])
        end = np.sort(arrival[sel] + prof.prefill_s + np.maximum(out[sel] - 1, 0) * prof.decode_s)
        level = np.searchsorted(start, at, side="right") - np.searchsorted(end, at, side="right")
        need += m.tp * -(-level // capacity)
    return need
