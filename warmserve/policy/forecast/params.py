"""The shape of the planner's forecaster: :class:`CSPParams`, the Corrective Seasonal Predictor,
and :class:`MixParams`, the mixture of experts around it that the planner runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MixParams:
    """An exponentially weighted mixture of experts over the CSP and cheap baselines.

    The experts are, in this order: last value, seasonal-naive, the CSP of :class:`CSPParams`,
    the *seasonal delta* (the seasonal part plus the newest error alone: the last value moved by
    how the season moved), one ``q`` quantile of the last ``n`` windows per ``(n, q)`` of
    ``recent``, an exponentially weighted mean of the last ``ewma[1]`` windows (weight
    ``ewma[0] * (1 - ewma[0]) ** age``), with ``ses`` simple exponential smoothing whose weight
    each series picks online (:func:`auto_ses`, what statsforecast's AutoETS amounts to on these
    traces), with ``slope`` that smoothing moved by the *seasonal slope* (:func:`seasonal_slope`
    over ``2 * slope + 1`` windows: how load usually changes at this time of day), and last the
    plain mean of all the experts before it (which wins where following any one expert costs
    more than it gains: noisy, sparse series).

    ``eta``, ``discount`` and ``tau`` are per plane (average, peak). They, and which experts
    take part, were chosen on the first part of each evaluated trace only (see
    ``warmserve forecast eval``, which scores the rest): the average plane learns slowly from a
    long memory, the peak plane from its last hundred or so windows, and it is scored at a quantile
    above the median, so it predicts peaks a little high and misses fewer bursts.

    ``capacity``, ``miss_cost`` and ``shift_periods`` shape the other peak forecast, the median
    mixture (the peak plane's ``eta`` and ``discount``) moved by its burst shift
    (:func:`burst_shift`); ``miss_cost`` was chosen on the same tune part, the shift's window
    (a week, so every day of the week is in it) by design.
    """

    eta: tuple[float, float] = (300.0, 30_000.0)  # sharpness: weights exp(-eta * excess / level)
    discount: tuple[float, float] = (0.998, 0.99)  # weight of an expert's past error per window
    tau: tuple[float, float] = (0.5, 0.65)  # pinball quantile scoring the avg and peak experts
    recent: tuple[tuple[int, float], ...] = ((3, 0.5), (6, 0.5), (12, 0.5), (6, 0.8), (2, 1.0))
    ewma: tuple[float, int] = (0.3, 12)
    ses: bool = True
    slope: int = 12  # half width (windows) of the seasonal slope; 0: no seasonal-slope expert
    capacity: float = 32.0  # one instance's requests: a peak this far above its forecast is missed
    miss_cost: float = 1.0  # a missed burst costs this many capacities of absolute error
    shift_periods: int = 7  # periods of residuals the burst shift is fitted on

    def __post_init__(self) -> None:
        if self.slope and not self.ses:
            raise ValueError("the seasonal-slope expert moves the ses expert: slope needs ses")
        if self.slope < 0:
            raise ValueError(f"slope must be >= 0, not {self.slope}")
        if self.capacity <= 0 or self.miss_cost < 0 or self.shift_periods < 1:
            raise ValueError("need capacity > 0, miss_cost >= 0 and shift_periods >= 1")

    @property
    def experts(self) -> int:
        return 6 + len(self.recent) + int(self.ses) + int(self.slope > 0)

    @property
    def depth(self) -> int:
        """Windows back the recent-window experts look."""
        return max(max((n for n, _ in self.recent), default=0), self.ewma[1])


@dataclass(frozen=True)
class CSPParams:
    """Shape of a CSP forecaster; defaults are the paper's (plain CSP).

    With ``mix`` set the forecast is a mixture of experts (:func:`mixture`) in which this CSP
    is one expert; the planner runs that (see :func:`warmserve.policy.planner.csp_params`).
    """

    period: int  # windows per period
    periods: int = 3  # D
    correction_windows: int = 10  # N
    decay: float = 0.5  # weight ratio of an error to the next more recent one
    reset: bool = True  # corrections use only errors of the current period (the paper's CSP)
    blend: float = 0.0  # weight of the last observed value mixed into the prediction
    mix: MixParams | None = None


# The smoothing expert: its weights (each series picks one online) and the discount of their
# absolute errors (about ``1 / (1 - discount)`` windows of memory).
SES_ALPHAS = (0.2, 0.3, 0.5, 0.7, 0.85, 1.0)
SES_DISCOUNT = 0.995
