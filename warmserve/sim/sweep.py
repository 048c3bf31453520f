"""The largest request rate a policy serves within an SLO, by bisection over workloads.

``max_rps`` assumes that serving is monotone in the rate (a policy that meets the SLO at some
rate meets it at every lower one), which holds for these policies up to workload noise; the
workloads of all rates share one seed, so the noise is the same draw scaled.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from warmserve.report.metrics import request_metrics


def max_rps(serves: Callable[[float], bool], lo: float, hi: float, tol: float) -> float:
    """The largest rate in ``[lo, hi]`` (within ``tol``) for which ``serves`` holds; 0 if it
    fails at ``lo``, ``hi`` if it holds there."""
    if not 0 < lo < hi or tol <= 0:
        raise ValueError(f"need 0 < lo < hi and tol > 0, got {lo}, {hi}, {tol}")
    if not serves(lo):
        return 0.0
    if serves(hi):
        return hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if serves(mid):
            lo = mid
        else:
            hi = mid
    return lo


def measured(requests: pa.Table, warmup: float) -> pa.Table:
    """The requests that arrived after the warm-up (the forecaster's first history)."""
    return requests.filter(pc.greater_equal(requests.column("arrival"), warmup))


def attainment(requests: pa.Table, slo_ttft: float, warmup: float = 0.0) -> float:
    """Fraction of the measured requests that got a first token within ``slo_ttft``."""
    return float(request_metrics(measured(requests, warmup), slo_ttft)["slo_attainment"])
