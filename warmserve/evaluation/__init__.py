"""Offline evaluation of the planner's forecaster (``warmserve forecast eval``): nothing here
runs in the live system or the simulator.

- :mod:`~warmserve.evaluation.batch`: the forecaster's batch forms and the baselines;
- :mod:`~warmserve.evaluation.traces`: the ServeGen and BurstGPT series;
- :mod:`~warmserve.evaluation.scoring`: scores, the bootstrap margins;
- :mod:`~warmserve.evaluation.tuning`: the search of the mixture's settings on the tune part;
- :mod:`~warmserve.evaluation.cli`: the command, its JSON and plot (its docstring says how the
  evaluation is done).
"""
