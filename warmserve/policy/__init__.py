"""Policy core: forecasting, placement, autoscaling. Pure and deterministic.

Nothing in this package imports Dask or vLLM: the live scheduler plugin and the simulator drive
the same code with a :class:`~warmserve.policy.state.ClusterSnapshot` and enact the actions it
returns.
"""
