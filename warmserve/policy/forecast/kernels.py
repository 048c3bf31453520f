"""The numba kernels of the planner's expert mixture: every expert's prediction and their
weighted sum per block of models (:func:`expert_kernel`), scoring and weights when a window
closes (:func:`learn`), and the smoothing expert's levels (:func:`smooth`). Blocks of models run
on all cores, so 10,000 models take a few milliseconds (``bench/policy_bench.py``). Nothing
here forks, so numba's OpenMP threads are safe.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, parallel=True)
def expert_kernel(  # pragma: no cover (compiled)
    obs,
    obs_win,
    err,
    err_win,
    last,
    ncols,
    window,
    newest,
    period,
    periods,
    ncorr,
    decay,
    reset,
    rn,
    rq,
    alpha,
    newma,
    ses_level,
    ses_loss,
    half,
    weights,
    out,
    pred,
):
    """Every expert's prediction of ``window`` (see :class:`MixParams`) for columns
    ``0..ncols``, from the rings of :class:`Forecaster`, with errors up to window ``newest``.
    ``ses_level`` and ``ses_loss`` (weights x 2 x columns, no weights without that expert) are
    the smoothing expert's state: it predicts the level of the weight with the least loss; with
    ``half`` >= 0 the seasonal slope over ``2 * half + 1`` windows moves it.

    With ``weights`` (experts x planes x columns) the weighted sum goes to ``pred`` (planes x
    columns; a peak is never predicted below the average, and a third plane weighs the peak
    experts again for the central peak, left unfloored); otherwise each expert goes to ``out``
    (experts x 2 x columns). Every expert is built in the same pass, block by block, so a
    prediction reads each ring slot once and never materialises a full expert array."""
    span = obs.shape[0]
    nerr = err.shape[0]
    depth = 0
    for n in rn:
        depth = max(depth, n)
    depth = max(depth, newma)
    nalpha = ses_level.shape[0]
    use_ses = nalpha > 0
    k = 6 + len(rn) + (1 if use_ses else 0) + (1 if half >= 0 else 0)
    ew = np.empty(max(newma, 1))  # weights of the exponentially weighted mean, newest first
    for j in range(newma):
        ew[j] = alpha * (1.0 - alpha) ** j
    # Windows (and ring slots) each expert reads: the same for every model, so the modulo
    # arithmetic is done once here and the model loop only loads and compares.
    nrec = max(depth, 1)
    rwin = np.empty(nrec, np.int64)
    rslot = np.empty(nrec, np.int64)
    for j in range(depth):
        rwin[j] = window - 1 - j
        rslot[j] = rwin[j] % span if rwin[j] >= 0 else 0
    swin = np.empty(max(periods, 1), np.int64)
    sslot = np.empty(max(periods, 1), np.int64)
    ns = 0
    for kk in range(1, periods + 1):
        w = window - kk * period
        if w < 0:
            break
        swin[ns] = w
        sslot[ns] = w % span
        ns += 1
    # The seasonal slope: per period back, the windows at both ends of its span.
    hwin = np.empty(max(periods, 1), np.int64)
    lwin = np.empty(max(periods, 1), np.int64)
    nh = 0
    if half >= 0:
        for kk in range(1, periods + 1):
            lo = window - kk * period - half - 1
            if lo < 0:
                break
            hwin[nh] = lo + 2 * half + 1
            lwin[nh] = lo
            nh += 1
    hslot = np.empty(max(nh, 1), np.int64)
    lslot = np.empty(max(nh, 1), np.int64)
    for i in range(nh):
        hslot[i] = hwin[i] % span
        lslot[i] = lwin[i] % span
    nwin = window - period
    nslot = nwin % span if nwin >= 0 else 0
    start = window - window % period if reset else 0  # oldest error the CSP may use
    cwin = np.empty(max(ncorr, 1), np.int64)
    cslot = np.empty(max(ncorr, 1), np.int64)
    cw = np.empty(max(ncorr, 1))
    nc = 0
    weight = 1.0
    for j in range(ncorr):
        w = newest - j
        if w < start or w < 0:
            break
        cwin[nc] = w
        cslot[nc] = w % nerr
        cw[nc] = weight
        weight *= decay
        nc += 1
    dslot = newest % nerr if newest >= 0 else 0
    # Models go in blocks: first each ring slot a block needs is streamed into small local
    # arrays (one contiguous run per slot, which memory prefetching follows), then every model
    # of the block is computed from those. Reading model by model instead touches dozens of
    # rows per model and waits on memory at every one of them.
    blk = 256
    mixed = weights.shape[0] > 0
    # Blocks are independent (each writes only its own columns), so they run on all cores;
    # each block has its own scratch arrays.
    for bi in numba.prange((ncols + blk - 1) // blk):
        c0 = bi * blk
        b = min(blk, ncols - c0)
        rec = np.empty((nrec, 2, blk))
        stot = np.empty((2, blk))
        scnt = np.empty(blk)
        num = np.empty((2, blk))
        den = np.empty(blk)
        naive = np.empty((2, blk))
        delta = np.empty((2, blk))
        srt = np.empty((nrec, blk))
        recv = np.empty((max(len(rn), 1), 2, blk))
        cnt = np.empty((max(len(rn), 1), blk))
        sesv = np.empty((2, blk))
        best = np.empty(blk)
        rise = np.empty((2, blk))
        sdays = np.empty(blk)
        vals = np.empty(k)
        for j in range(depth):
            for c in range(b):
                ok = rwin[j] >= 0 and obs_win[rslot[j], c0 + c] == rwin[j]
                for p in range(2):
                    rec[j, p, c] = obs[rslot[j], p, c0 + c] if ok else np.nan
        stot[:, :b] = 0.0
        scnt[:b] = 0.0
        for i in range(ns):
            for c in range(b):
                if obs_win[sslot[i], c0 + c] == swin[i]:
                    stot[0, c] += obs[sslot[i], 0, c0 + c]
                    stot[1, c] += obs[sslot[i], 1, c0 + c]
                    scnt[c] += 1.0
        num[:, :b] = 0.0
        den[:b] = 0.0
        for i in range(nc):
            for c in range(b):
                if err_win[cslot[i], c0 + c] == cwin[i]:
                    num[0, c] += cw[i] * err[cslot[i], 0, c0 + c]
                    num[1, c] += cw[i] * err[cslot[i], 1, c0 + c]
                    den[c] += cw[i]
        # The smoothing expert (the level with the least loss; numpy's argmin keeps the first
        # of equals, so does the strict comparison) and the seasonal slope that moves it.
        if use_ses:
            for p in range(2):
                best[:b] = np.inf
                for a in range(nalpha):
                    for c in range(b):
                        if ses_loss[a, p, c0 + c] < best[c]:
                            best[c] = ses_loss[a, p, c0 + c]
                            v = ses_level[a, p, c0 + c]
                            sesv[p, c] = 0.0 if np.isnan(v) else v
        rise[:, :b] = 0.0
        sdays[:b] = 0.0
        for i in range(nh):
            for c in range(b):
                if obs_win[hslot[i], c0 + c] == hwin[i] and obs_win[lslot[i], c0 + c] == lwin[i]:
                    rise[0, c] += obs[hslot[i], 0, c0 + c] - obs[lslot[i], 0, c0 + c]
                    rise[1, c] += obs[hslot[i], 1, c0 + c] - obs[lslot[i], 1, c0 + c]
                    sdays[c] += 1.0
        for c in range(b):
            last_c = (last[0, c0 + c], last[1, c0 + c])
            n_ok = nwin >= 0 and obs_win[nslot, c0 + c] == nwin
            d_ok = newest >= 0 and err_win[dslot, c0 + c] == newest
            for p in range(2):
                lv = 0.0 if np.isnan(last_c[p]) else last_c[p]
                naive[p, c] = obs[nslot, p, c0 + c] if n_ok else lv
                delta[p, c] = err[dslot, p, c0 + c] if d_ok else 0.0
        # The recent quantiles: an odd-even transposition sort of each window count's values
        # across the block (missing ones as +inf, so they sort last), branch-free and
        # vectorised; experts over the same windows share one sort.
        for e in range(len(rn)):
            n = rn[e]
            done = False
            for e2 in range(e):
                done = done or rn[e2] == n
            if done:
                continue
            cnt[e, :b] = 0.0
            for p in range(2):
                for j in range(n):
                    for c in range(b):
                        v = rec[j, p, c]
                        srt[j, c] = np.inf if np.isnan(v) else v
                        if p == 0:
                            cnt[e, c] += 0.0 if np.isnan(v) else 1.0
                for r in range(n):
                    for i in range(r % 2, n - 1, 2):
                        for c in range(b):
                            x = srt[i, c]
                            y = srt[i + 1, c]
                            srt[i, c] = x if x < y else y
                            srt[i + 1, c] = y if x < y else x
                for e2 in range(e, len(rn)):
                    if rn[e2] != n:
                        continue
                    cnt[e2, :b] = cnt[e, :b]
                    for c in range(b):
                        m = int(cnt[e, c])
                        if m > 0:
                            pos = rq[e2] * (m - 1)
                            lo = int(pos)
                            hi = min(lo + 1, m - 1)
                            recv[e2, p, c] = srt[lo, c] + (pos - lo) * (srt[hi, c] - srt[lo, c])
        for c in range(b):
            for p in range(2):
                lastv = last[p, c0 + c]
                if np.isnan(lastv):
                    lastv = 0.0
                seasonal = stot[p, c] / scnt[c] if scnt[c] > 0 else 0.0
                corr = num[p, c] / den[c] if den[c] > 0 else 0.0
                vals[0] = lastv
                vals[1] = naive[p, c]
                vals[2] = max(seasonal + corr, 0.0)
                vals[3] = max(seasonal + delta[p, c], 0.0)
                for e in range(len(rn)):
                    vals[4 + e] = recv[e, p, c] if cnt[e, c] > 0 else lastv
                num_e = 0.0
                den_e = 0.0
                for j in range(newma):
                    v = rec[j, p, c]
                    if not np.isnan(v):
                        num_e += ew[j] * v
                        den_e += ew[j]
                e = 4 + len(rn)
                vals[e] = num_e / den_e if den_e > 0 else lastv
                if use_ses:
                    e += 1
                    vals[e] = sesv[p, c]
                if half >= 0:
                    step = rise[p, c] / (sdays[c] * (2 * half + 1)) if sdays[c] > 0 else 0.0
                    e += 1
                    vals[e] = max(sesv[p, c] + step, 0.0)
                total = 0.0
                for e in range(k - 1):
                    total += vals[e]
                vals[k - 1] = total / (k - 1)
                if mixed:
                    acc = 0.0
                    for e in range(k):
                        acc += weights[e, p, c0 + c] * vals[e]
                    pred[p, c0 + c] = acc if p == 0 else max(acc, pred[0, c0 + c])
                    if p == 1 and pred.shape[0] == 3:  # the central peak mixture, unfloored
                        acc = 0.0
                        for e in range(k):
                            acc += weights[e, 2, c0 + c] * vals[e]
                        pred[2, c0 + c] = acc
                else:
                    for e in range(k):
                        out[e, p, c0 + c] = vals[e]


@numba.njit(cache=True, nogil=True, parallel=True)
def learn(experts, values, seen, tau, discount, eta, loss, level, w):  # pragma: no cover
    """Score every expert's prediction on ``values`` (what :func:`mixture` does per window) and
    update, in place, the discounted losses, levels and weights of the models ``seen``.
    ``tau``, ``discount`` and ``eta`` have one value per plane of weights; a third plane (the
    central peak mixture) scores the peak experts again, at its own quantile.

    Blocks of models run on all cores; within a block, loops run expert by expert over
    contiguous model rows (memory streams, not strides), and a weight below ``exp(-60)`` of the
    best one is taken as zero (its ``exp`` would be subnormal, which is slow, and changes no
    sum)."""
    k = experts.shape[0]
    n = values.shape[1]
    blk = 1024
    for bi in numba.prange((n + blk - 1) // blk):
        lo = bi * blk
        hi = min(n, lo + blk)
        factor = np.empty(hi - lo)
        top = np.empty(hi - lo)
        total = np.empty(hi - lo)
        for p in range(loss.shape[1]):
            src = min(p, 1)  # the plane of load the weights score
            for e in range(k):
                for c in range(lo, hi):
                    if seen[c]:
                        err = values[src, c] - experts[e, src, c]
                        pin = max(tau[p] * err, (tau[p] - 1.0) * err)
                        loss[e, p, c] = discount[p] * loss[e, p, c] + pin
            for c in range(lo, hi):
                if seen[c]:
                    level[p, c] = discount[p] * level[p, c] + abs(values[src, c])
                    factor[c - lo] = -eta[p] / max(level[p, c], 1e-12)
            top[:] = -np.inf
            for e in range(k):  # exponents, and the largest (the least loss) to shift them by
                for c in range(lo, hi):
                    if seen[c]:
                        w[e, p, c] = factor[c - lo] * loss[e, p, c]
                        top[c - lo] = max(top[c - lo], w[e, p, c])
            total[:] = 0.0
            for e in range(k):
                for c in range(lo, hi):
                    if seen[c]:
                        x = w[e, p, c] - top[c - lo]
                        w[e, p, c] = np.exp(x) if x > -60.0 else 0.0
                        total[c - lo] += w[e, p, c]
            for e in range(k):
                for c in range(lo, hi):
                    if seen[c]:
                        w[e, p, c] /= total[c - lo]


@numba.njit(cache=True, nogil=True, parallel=True)
def smooth(values, seen, alphas, discount, level, loss):  # pragma: no cover (compiled)
    """Score and update, in place, the smoothing expert's level and discounted absolute error
    per weight ``alphas`` (weights x 2 x models) on ``values`` of the models ``seen``: one
    window of :func:`auto_ses`."""
    n = values.shape[1]
    blk = 1024
    for bi in numba.prange((n + blk - 1) // blk):
        for a in range(alphas.shape[0]):
            for p in range(2):
                for c in range(bi * blk, min(n, (bi + 1) * blk)):
                    if seen[c]:
                        x = values[p, c]
                        old = level[a, p, c]
                        if np.isnan(old):
                            level[a, p, c] = x
                        else:
                            loss[a, p, c] = discount * loss[a, p, c] + abs(x - old)
                            level[a, p, c] = old + alphas[a] * (x - old)
