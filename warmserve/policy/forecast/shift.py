"""The burst shift of the central peak forecast and the choice between the two peak forecasts,
as the online :class:`~warmserve.policy.forecast.forecaster.Forecaster` and the batch forms
(:mod:`warmserve.evaluation.batch`) both compute them.

Residuals (peak minus central forecast) are binned on a lattice of ``capacity / SHIFT_STEPS``
(a count and a sum per bin), so refitting the shift after a window moves a value or two in and
out of the bins instead of sorting a week of residuals.
"""

from __future__ import annotations

import math

import numba
import numpy as np

MIN_WINDOWS = 12  # windows seen before the burst shift and the choice of peak forecast act
SHIFT_STEPS = 16  # burst shifts per instance's capacity: the shift is a multiple of capacity / 16
SHIFT_REACH = 8  # capacities the shift may move either way
SHIFT_BINS = 2 * SHIFT_REACH * SHIFT_STEPS + 2  # bins of residuals, see _shift_bin
SHIFT_COLUMNS = SHIFT_BINS + 2  # then the residuals below the middle bin, then all of them


@numba.njit(cache=True, nogil=True, inline="always")
def _shift_bin(v, step, k):  # pragma: no cover (compiled)
    """The bin of residual ``v`` among the shifts ``j * step`` (``|j| <= k``): bin ``j + k``
    holds ``((j - 1) * step, j * step]``, bin 0 everything up to ``-k * step`` and the last bin
    everything above ``k * step``."""
    j = math.ceil(v / step)
    return min(max(j, -k), k + 1) + k


@numba.njit(cache=True, nogil=True)
def bin_add(cnt, v, sign, step):  # pragma: no cover (compiled)
    """Add (``sign`` 1) or take out (-1) residual ``v`` in ``cnt`` (2 x ``SHIFT_COLUMNS``: counts,
    then sums): its bin, the residuals below the middle bin (where the median usually is, so
    :func:`best_shift` starts there) and all residuals."""
    k = SHIFT_REACH * SHIFT_STEPS
    b = _shift_bin(v, step, k)
    for col in (b, SHIFT_BINS + 1):
        cnt[0, col] += sign
        cnt[1, col] += sign * v
    if b < k:
        cnt[0, SHIFT_BINS] += sign
        cnt[1, SHIFT_BINS] += sign * v


@numba.njit(cache=True, nogil=True)
def best_shift(cnt, cost, capacity):  # pragma: no cover (compiled)
    """The shift ``d`` on the lattice (multiples of ``capacity / SHIFT_STEPS``) minimising
    ``sum |r - d| + cost * #(r - d > capacity)`` over the residuals ``r`` binned in ``cnt``
    (:func:`bin_add`). Bin edges are lattice points, so both terms are exact there: the
    residuals at or below ``d`` are whole bins, and so are those above ``d + capacity``. The
    lowest least wins unless a later one is lower by more than rounding (the batch and online
    forms add the same numbers in different orders).

    Only a few bins are scored. Below the median both terms fall as ``d`` rises, so the scan
    starts at the last lattice point below it, found by walking from the middle bin; above the
    median the absolute error only grows, so once it alone reaches the least so far no later
    shift can win."""
    k = SHIFT_REACH * SHIFT_STEPS
    step = capacity / SHIFT_STEPS
    n = cnt[0, SHIFT_BINS + 1]
    total = cnt[1, SHIFT_BINS + 1]
    b = k  # below: the residuals in bins before b, and their sum
    below = cnt[0, SHIFT_BINS]
    below_sum = cnt[1, SHIFT_BINS]
    while b > 0 and 2.0 * below >= n:
        b -= 1
        below -= cnt[0, b]
        below_sum -= cnt[1, b]
    while b < 2 * k - SHIFT_STEPS + 1 and 2.0 * (below + cnt[0, b]) < n:
        below += cnt[0, b]
        below_sum += cnt[1, b]
        b += 1
    if b > 0:  # b holds the median: start at the lattice point below it, its bin in first
        b -= 1
        below -= cnt[0, b]
        below_sum -= cnt[1, b]
    within = below  # residuals <= d + capacity
    for i in range(b, b + SHIFT_STEPS):
        within += cnt[0, i]
    best = 0.0
    arg = 0.0
    for j in range(b - k, k - SHIFT_STEPS + 1):
        i = j + k
        below += cnt[0, i]
        below_sum += cnt[1, i]
        within += cnt[0, i + SHIFT_STEPS]
        d = j * step
        absdev = d * (2.0 * below - n) - 2.0 * below_sum + total
        if i > b and 2.0 * below >= n and absdev >= best:  # the error alone only grows
            break
        obj = absdev + cost * (n - within)
        if i == b or obj < best - 1e-9 * (1.0 + abs(best)):
            best = obj
            arg = d
    return arg


def takes_shift(err: np.ndarray, missed: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Where the shifted peak forecast did better so far (:func:`choose_peak`), from the sums
    of :func:`tally` (quantile first) over ``seen`` windows."""
    return (seen >= MIN_WINDOWS) & (err[1] * (missed[1] + 1) < err[0] * (missed[0] + 1))


def tally(
    err: np.ndarray,
    missed: np.ndarray,
    peak: np.ndarray,
    ok: np.ndarray,
    forecasts: tuple[np.ndarray, np.ndarray],
    capacity: float,
) -> None:
    """Add, in place and where ``ok``, one window's absolute error and missed burst of each
    peak forecast (quantile, shifted)."""
    for c, pred in enumerate(forecasts):
        err[c] += np.where(ok, np.abs(peak - pred), 0.0)
        missed[c] += np.where(ok, peak - pred > capacity, 0.0)


@numba.njit(cache=True, nogil=True, parallel=True)
def refit_shift(residual, window, cost, capacity, ring, last, hist, shift):  # pragma: no cover
    """Write ``residual`` (NaN: not observed) of ``window`` into each model's ring, clearing
    the slots of the windows it skipped since its last one (oldest first), and refit the shift
    of every model observed, as :func:`burst_shift` does. ``hist`` (models x 2 x
    ``SHIFT_COLUMNS``) holds each ring binned (:func:`bin_add`), so a window moves a value or
    two in and out, and no model's ring is read whole. A window observed again replaces its
    residual."""
    n = ring.shape[0]
    step = capacity / SHIFT_STEPS
    for c in numba.prange(residual.shape[0]):
        v = residual[c]
        if np.isnan(v):
            continue
        gone = min(max(window - last[c] - 1, 0), n - 1) if last[c] >= 0 else 0
        for j in range(gone, -1, -1):  # skipped windows' slots, then this window's
            slot = (window - j) % n
            if not np.isnan(ring[slot, c]):
                bin_add(hist[c], ring[slot, c], -1.0, step)
            ring[slot, c] = np.nan
        ring[window % n, c] = v
        bin_add(hist[c], v, 1.0, step)
        last[c] = max(last[c], window)
        if hist[c, 0, SHIFT_BINS + 1] >= MIN_WINDOWS:
            shift[c] = best_shift(hist[c], cost, capacity)


@numba.njit(cache=True, nogil=True)
def rebin(ring, last, capacity, hist):  # pragma: no cover (compiled)
    """Bin each model's residual ring (columns) oldest first, as :func:`refit_shift` did."""
    n = ring.shape[0]
    step = capacity / SHIFT_STEPS
    for c in range(ring.shape[1]):
        hist[c] = 0.0
        for j in range(n - 1, -1, -1):
            v = ring[(last[c] - j) % n, c]
            if not np.isnan(v):
                bin_add(hist[c], v, 1.0, step)
