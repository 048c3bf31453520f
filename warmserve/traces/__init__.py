"""Parquet traces: one workload schema, converters from real traces, synthesis and statistics.

Other parts of WarmServe (the simulator, the replay client, the forecast evaluation) need only
:func:`read_workload` and :func:`write_workload`; the rest serves ``warmserve trace``.
"""

from warmserve.traces.schema import SCHEMA, TraceError, read_workload, write_workload

__all__ = ["SCHEMA", "TraceError", "read_workload", "write_workload"]
