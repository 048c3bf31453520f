"""The planner's online forecaster: :class:`Forecaster` keeps ring buffers and predicts one
window for all models at once (the module docstring of :mod:`warmserve.policy.forecast` says
what it forecasts)."""

from __future__ import annotations

import numpy as np

from warmserve.policy.forecast.kernels import expert_kernel, learn, smooth
from warmserve.policy.forecast.params import SES_ALPHAS, SES_DISCOUNT, CSPParams
from warmserve.policy.forecast.shift import SHIFT_COLUMNS, rebin, refit_shift, takes_shift, tally


class Forecaster:
    """Online forecaster over many models: ring buffers, computed for all models at once.

    Models are columns (added as they are first observed, so new models need no registration);
    two planes hold average (0) and peak (1) concurrency. Buffers are laid out time-major
    (``ring x plane x models``), so each step reads a few contiguous ``2 x models`` slices.
    :meth:`predict` forecasts any window from what was observed before it, so the planner can
    ask for the window now open and the next one. With ``params.mix`` it predicts the expert
    mixture (equal to :func:`mixture_pair`), otherwise the CSP (equal to :func:`csp`).
    """

    def __init__(self, params: CSPParams, models: tuple[str, ...] = ()) -> None:
        self.params = params
        mix = params.mix
        # The ring reaches back D periods, and the seasonal slope's span past that.
        self._half = min(mix.slope, params.period - 1) if mix and mix.slope else -1  # -1: none
        reach = params.period * params.periods + self._half + 1
        self._span = max(reach, mix.depth if mix else 0, 1)
        self._nerr = max(params.correction_windows, 1)
        self._n = 0  # columns allocated
        self._rows: dict[str, int] = {}
        self._obs = np.full((self._span, 2, 0), np.nan)
        self._obs_win = np.full((self._span, 0), -1, dtype=np.int64)
        self._err = np.full((self._nerr, 2, 0), np.nan)
        self._err_win = np.full((self._nerr, 0), -1, dtype=np.int64)
        self._last = np.full((2, 0), np.nan)
        self._last_win = np.full(0, -1, dtype=np.int64)
        self._k = mix.experts if mix else 0
        # Planes of weights: average, peak (at the peak quantile), central peak (the median).
        self._loss = np.zeros((self._k, 3, 0))  # discounted pinball loss per expert
        self._level = np.zeros((3, 0))  # discounted observed load
        self._w = np.full((self._k, 3, 0), 1 / max(self._k, 1))  # expert weights, from the losses
        # The burst shift of the central peak (:func:`burst_shift`): a ring of residuals, the
        # newest window in it, and the shift fitted on it; then what :func:`choose_peak` sums
        # for the quantile and the shifted peak forecasts (absolute error, missed bursts).
        self._nres = mix.shift_periods * params.period if mix else 1
        self._res = np.full((self._nres, 0), np.nan)
        self._res_last = np.full(0, -1, dtype=np.int64)
        self._hist = np.zeros((0, 2, SHIFT_COLUMNS))  # each ring binned (model rows), see
        # refit_shift; rebuilt by restore
        self._shift = np.zeros(0)
        self._sel_err = np.zeros((2, 0))
        self._sel_missed = np.zeros((2, 0))
        self._sel_seen = np.zeros(0)
        # The ses expert (:func:`auto_ses`): a level and a discounted absolute error per weight.
        self._alphas = np.array(SES_ALPHAS if mix and mix.ses else (), dtype=float)
        self._ses_level = np.full((len(self._alphas), 2, 0), np.nan)
        self._ses_loss = np.zeros((len(self._alphas), 2, 0))
        self._tau = np.array((*mix.tau, 0.5) if mix else (0.5, 0.5, 0.5))
        self._eta = np.array((*mix.eta, mix.eta[1]) if mix else (0.0,) * 3, dtype=float)
        self._discount = np.array((*mix.discount, mix.discount[1]) if mix else (1.0,) * 3)
        self._rn = np.array([n for n, _ in mix.recent] if mix else [], dtype=np.int64)
        self._rq = np.array([q for _, q in mix.recent] if mix else [], dtype=float)
        self._alpha, self._newma = (float(mix.ewma[0]), int(mix.ewma[1])) if mix else (0.0, 0)
        for model in models:
            self._row(model)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._rows)

    def _row(self, model: str) -> int:
        row = self._rows.get(model)
        if row is not None:
            return row
        row = self._rows[model] = len(self._rows)
        if row >= self._n:
            grow = max(16, row)
            self._n += grow

            def more(a: np.ndarray, fill: float) -> np.ndarray:
                pad = np.full((*a.shape[:-1], grow), fill, dtype=a.dtype)
                return np.concatenate([a, pad], axis=-1)

            self._obs, self._err, self._last = (
                more(a, np.nan) for a in (self._obs, self._err, self._last)
            )
            self._obs_win, self._err_win, self._last_win = (
                more(a, -1) for a in (self._obs_win, self._err_win, self._last_win)
            )
            self._loss, self._level = more(self._loss, 0.0), more(self._level, 0.0)
            self._w = more(self._w, 1 / max(self._k, 1))
            self._ses_level = more(self._ses_level, np.nan)
            self._ses_loss = more(self._ses_loss, 0.0)
            self._res, self._res_last = more(self._res, np.nan), more(self._res_last, -1)
            self._hist = np.concatenate([self._hist, np.zeros((grow, 2, SHIFT_COLUMNS))])
            self._shift = more(self._shift, 0.0)
            self._sel_err, self._sel_missed = more(self._sel_err, 0.0), more(self._sel_missed, 0.0)
            self._sel_seen = more(self._sel_seen, 0.0)
        return row

    def _past(self, cols: slice, window: int) -> np.ndarray:
        """Observations (2 x cols) of ``window``; NaN where it was not observed."""
        if window < 0:
            return np.full(self._last[:, cols].shape, np.nan)
        slot = window % self._span
        return np.where(self._obs_win[slot, cols] == window, self._obs[slot, :, cols], np.nan)

    def _seasonal(self, cols: slice, window: int) -> np.ndarray:
        """Seasonal part (2 x cols) of ``window`` from the ring; 0 where nothing was seen."""
        p = self.params
        total = np.zeros(self._last[:, cols].shape)
        count = np.zeros(total.shape[1])
        for k in range(1, p.periods + 1):
            w = window - k * p.period
            if w < 0:
                break
            slot = w % self._span
            ok = self._obs_win[slot, cols] == w
            total += np.where(ok, self._obs[slot, :, cols], 0.0)
            count += ok
        return total / np.maximum(count, 1)

    def _csp(self, cols: slice, window: int, newest: int) -> np.ndarray:
        """Unblended CSP (2 x cols) of ``window``, with errors up to window ``newest``."""
        p = self.params
        seasonal = self._seasonal(cols, window)
        start = window - window % p.period if p.reset else 0  # oldest error allowed
        num = np.zeros(seasonal.shape)
        den = np.zeros(seasonal.shape[1])
        weight = 1.0
        for j in range(p.correction_windows):
            w = newest - j
            if w < start:
                break
            slot = w % self._nerr
            ok = self._err_win[slot, cols] == w
            num += np.where(ok, weight * self._err[slot, :, cols], 0.0)
            den += ok * weight
            weight *= p.decay
        return np.maximum(seasonal + num / np.where(den > 0, den, 1.0), 0.0)

    def _kernel(self, cols: slice, window: int, newest: int, weights: np.ndarray | None):
        """Run :func:`expert_kernel` on ``cols``: every expert (``weights`` None) or their
        weighted sum."""
        p = self.params
        n = len(range(*cols.indices(self._n)))
        k = self._k
        mixed = weights is not None
        out = np.empty((0 if mixed else k, 2, n))
        pred = np.empty((weights.shape[1] if mixed else 2, n if mixed else 0))
        expert_kernel(
            self._obs[:, :, cols],
            self._obs_win[:, cols],
            self._err[:, :, cols],
            self._err_win[:, cols],
            self._last[:, cols],
            n,
            window,
            newest,
            p.period,
            p.periods,
            p.correction_windows,
            p.decay,
            p.reset,
            self._rn,
            self._rq,
            self._alpha,
            self._newma,
            self._ses_level[:, :, cols],
            self._ses_loss[:, :, cols],
            self._half,
            weights if mixed else np.empty((0, 2, 0)),
            out,
            pred,
        )
        return pred if mixed else out

    def _experts(self, cols: slice, window: int, newest: int) -> np.ndarray:
        """Every expert's prediction (experts x 2 x cols) of ``window``; see :func:`experts`."""
        return self._kernel(cols, window, newest, None)

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        """Record the closed window ``window`` of ``model``."""
        row = self._row(model)
        self._store(slice(row, row + 1), window, np.array([[avg], [peak]], dtype=float))

    def observe_all(self, window: int, avg: np.ndarray, peak: np.ndarray) -> None:
        """Record ``window`` for every model of :attr:`models` at once (arrays in that order);
        a model whose average or peak is NaN was not observed."""
        cols = slice(0, len(self._rows))
        self._store(cols, window, np.stack([avg, peak]).astype(float))

    def _store(self, cols: slice, window: int, values: np.ndarray) -> None:
        """Score the experts on ``values`` (their one-step predictions, before the window is
        known), then write the window into the rings."""
        mix = self.params.mix
        seen = ~np.isnan(values).any(axis=0)
        if not seen.all():
            values = np.where(seen, values, 0.0)
        if mix is not None:
            experts = self._experts(cols, window, window - 1)
            self._score_peaks(cols, window, experts, values, seen)
            learn(
                experts,
                values,
                seen,
                self._tau,
                self._discount,
                self._eta,
                self._loss[:, :, cols],
                self._level[:, cols],
                self._w[:, :, cols],
            )
            smooth(
                values,
                seen,
                self._alphas,
                SES_DISCOUNT,
                self._ses_level[:, :, cols],
                self._ses_loss[:, :, cols],
            )
        seasonal = self._seasonal(cols, window)
        slot = window % self._span
        eslot = window % self._nerr
        fresh = values - seasonal
        if not seen.all():  # keep what the slots held for the models not observed
            values = np.where(seen, values, self._obs[slot, :, cols])
            fresh = np.where(seen, fresh, self._err[eslot, :, cols])
        self._obs[slot, :, cols] = values
        self._obs_win[slot, cols] = np.where(seen, window, self._obs_win[slot, cols])
        self._err[eslot, :, cols] = fresh
        self._err_win[eslot, cols] = np.where(seen, window, self._err_win[eslot, cols])
        newer = seen & (window >= self._last_win[cols])
        self._last[:, cols] = np.where(newer, values, self._last[:, cols])
        self._last_win[cols] = np.where(newer, window, self._last_win[cols])

    def _score_peaks(
        self, cols: slice, window: int, experts: np.ndarray, values: np.ndarray, seen: np.ndarray
    ) -> None:
        """Before the weights learn ``window``: add its errors to what :func:`choose_peak`
        compares, and refit the burst shift on the residuals with it (models ``seen`` only)."""
        mix = self.params.mix
        assert mix is not None
        w = self._w[:, :, cols]
        avg = (w[:, 0] * experts[:, 0]).sum(axis=0)
        central = (w[:, 2] * experts[:, 1]).sum(axis=0)
        y = values[1]
        forecasts = (
            np.maximum((w[:, 1] * experts[:, 1]).sum(axis=0), avg),
            np.maximum(central + self._shift[cols], avg),
        )
        tally(self._sel_err[:, cols], self._sel_missed[:, cols], y, seen, forecasts, mix.capacity)
        self._sel_seen[cols] += seen
        refit_shift(
            np.where(seen, y - central, np.nan),
            window,
            mix.miss_cost * mix.capacity,
            mix.capacity,
            self._res[:, cols],
            self._res_last[cols],
            self._hist[cols],
            self._shift[cols],
        )

    def predict(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (average, peak) concurrency of ``window`` for every model, in row order."""
        p = self.params
        n = len(self._rows)
        cols = slice(0, n)
        # The newest error is that of the last closed window, even when predicting further out.
        newest = min(window, int(self._last_win[:n].max()) + 1 if n else 0) - 1
        if p.mix is not None:
            pred = self._kernel(cols, window, newest, self._w[:, :, cols])
            shifted = np.maximum(pred[2] + self._shift[cols], pred[0])
            use = takes_shift(
                self._sel_err[:, cols], self._sel_missed[:, cols], self._sel_seen[cols]
            )
            return pred[0], np.where(use, shifted, pred[1])
        else:
            pred = self._csp(cols, window, newest)
            if p.blend:
                pred = (1.0 - p.blend) * pred + p.blend * np.nan_to_num(self._last[:, cols])
        return pred[0], pred[1]

    def last(self) -> tuple[np.ndarray, np.ndarray]:
        """The newest observed (average, peak) of every model, 0 where none, in row order."""
        last = np.nan_to_num(self._last[:, : len(self._rows)])
        return last[0], last[1]

    def predict_model(self, window: int) -> dict[str, tuple[float, float]]:
        """:meth:`predict` as a mapping model -> (average, peak)."""
        avg, peak = self.predict(window)
        return {m: (float(avg[r]), float(peak[r])) for m, r in self._rows.items()}

    def compile(self) -> None:
        """Compile the numba kernels for forecasters of these parameters, on a scratch one
        (this one is not touched): 30 to 40 s on 2 cores while numba's disk cache holds none,
        under a second from it. The live scheduler runs this in a thread at start, so that no
        request waits for it on the event loop (the soak saw the first request wait 12 s, and
        every request stop for 15 s when the first load window closed)."""
        scratch = Forecaster(self.params, ("scratch",))
        for window in range(2):
            scratch.predict(window)
            scratch.observe("scratch", window, 1.0, 2.0)
        scratch.predict(2)

    # Everything :meth:`observe` changes, by attribute name; the last axis is the model column.
    _STATE = (
        "_obs",
        "_obs_win",
        "_err",
        "_err_win",
        "_last",
        "_last_win",
        "_loss",
        "_level",
        "_w",
        "_ses_level",
        "_ses_loss",
        "_res",
        "_res_last",
        "_shift",
        "_sel_err",
        "_sel_missed",
        "_sel_seen",
    )

    def state(self) -> dict[str, np.ndarray]:
        """A copy of what the forecaster has learnt, so a restarted planner can go on from it:
        one array per ring or mixture statistic (model columns last, in :attr:`models` order)."""
        n = len(self._rows)
        return {name.lstrip("_"): getattr(self, name)[..., :n].copy() for name in self._STATE}

    def restore(self, models: tuple[str, ...], state: dict[str, np.ndarray]) -> None:
        """Take over ``state`` (from :meth:`state`) for ``models``, its columns in order.

        Models observed here and not in ``models`` keep what they have. Raises ValueError when
        the arrays do not fit this forecaster's shape (its parameters changed), since windows
        would land in the wrong ring slots."""
        cols = [self._row(m) for m in models]
        for name in self._STATE:
            have, saved = getattr(self, name), state[name.lstrip("_")]
            if saved.shape != (*have.shape[:-1], len(models)):
                raise ValueError(f"{name}: saved shape {saved.shape} does not fit {have.shape}")
            have[..., cols] = saved
        if self.params.mix is not None:  # each residual ring binned again
            idx = np.array(cols, dtype=np.int64)
            hist = self._hist[idx]
            rebin(self._res[:, idx], self._res_last[idx], self.params.mix.capacity, hist)
            self._hist[idx] = hist
