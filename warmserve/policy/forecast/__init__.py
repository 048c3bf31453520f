"""The planner's load forecaster: the Corrective Seasonal Predictor (CSP) and the expert mixture
around it.

LLM load repeats daily, so the prediction for window ``i`` of period ``k`` starts from the mean of
the same window over the previous ``D`` periods (the *seasonal part*). Days differ in level, so a
*correction* is added: the weighted mean of the last ``min(i, N)`` errors (observed minus seasonal)
of this period, each weight twice the one before it, so the newest error counts most. The sum is
clamped at zero. Average and peak concurrency are forecast the same way, each on its own.

Missing windows are NaN: they drop out of the seasonal mean and of the correction (the weights of
the remaining errors are renormalised). A window with no seasonal history (the first period, a new
model) has a seasonal part of zero, so its correction is the recent level itself.

On real traces (``warmserve forecast eval``) the plain CSP loses to last-value: at 600 s the
seasonal part carries day-to-day noise straight into the prediction. What the planner runs is an
online mixture (:class:`MixParams`, :func:`mixture`) in which the CSP is one expert beside
last-value, seasonal-naive, the seasonal delta, recent quantiles and means, and exponential
smoothing with and without the seasonal slope: each model's weights follow the experts' recent
pinball losses. The peak has two forecasts, and each series takes the one that did better so
far (:func:`choose_peak`): the mixture scored at a quantile above the median, which predicts
peaks a little high to miss fewer bursts, and the median mixture moved by a *burst shift*
(:func:`burst_shift`), fitted on its last week of residuals to trade absolute error against
missed bursts (peaks more than one instance's capacity above the forecast).

What the planner runs is :class:`~warmserve.policy.forecast.forecaster.Forecaster`: ring buffers,
one window predicted for all models at once, every tick. Its modules:

- ``params``: :class:`CSPParams` and :class:`MixParams`, the forecaster's shape;
- ``forecaster``: :class:`Forecaster`, the rings, and what a closed window and a prediction do;
- ``kernels``: the mixture as three numba kernels (experts and their weighted sum per block of
  models; scoring and weights when a window closes; the smoothing expert's levels), whose blocks
  of models run on all cores, so 10,000 models take a few milliseconds
  (``bench/policy_bench.py``). Nothing here forks, so numba's OpenMP threads are safe;
- ``shift``: the burst shift's binned residuals and the choice between the peak forecasts.

The same arithmetic in batch form, over a ``models x windows`` array (the one-step-ahead
prediction of every window from the windows before it), is :mod:`warmserve.evaluation.batch`,
which ``warmserve forecast eval`` scores; functions named in these docstrings without a module
(:func:`mixture_pair`, :func:`burst_shift`, :func:`choose_peak`, :func:`csp`, ...) are there.
"""

from warmserve.policy.forecast.forecaster import Forecaster
from warmserve.policy.forecast.params import SES_ALPHAS, SES_DISCOUNT, CSPParams, MixParams

__all__ = ["SES_ALPHAS", "SES_DISCOUNT", "CSPParams", "Forecaster", "MixParams"]
