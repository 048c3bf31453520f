"""Every constant the policies use, in one frozen object.

The scheduler plugin reads ``warmserve.*`` from dask.config and hands the sections to
:meth:`PolicyConfig.from_mapping`; the simulator and the tests build a :class:`PolicyConfig`
directly. Keeping dask out of this module keeps the policy package pure.

Memory model (what :class:`~warmserve.policy.accounting.Accounting` charges per device):

- a TP shard of a model's weights is ``ceil(nbytes / tp)`` bytes on each device of its group;
- an instance also reserves KV cache for ``instance_capacity`` concurrent requests:
  ``kv_reservation(spec) = instance_capacity * kv_per_request(spec)`` in all, split in
  ``ceil(... / tp)`` per device;
- ``kv_per_request(spec)`` is ``kv_bytes[spec.name]`` when the mapping names the model, else
  ``ceil(kv_fraction * nbytes / instance_capacity)``: by default a full instance's KV cache is
  half the size of its weights, which is what a 7-8B model at a few thousand tokens of context
  needs. Pass ``kv_bytes`` for models whose attention layout differs.
- an engine up on a device (serving, or idle with prewarmed weights of its family, the ENGINE
  tier) takes ``engine_bytes`` there besides weights and KV: its runtime context, activation
  workspace and graphs. Zero by default (the live CPU engines' budgets leave it out); the
  simulator's cost model sets it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from warmserve.registry import ModelSpec

_SECTIONS = ("forecast", "planner", "autoscaler", "policy")  # dask.config sections read


@dataclass(frozen=True)
class PolicyConfig:
    """Constants of forecasting, planning and autoscaling. Defaults follow the paper."""

    # Forecast (Corrective Seasonal Predictor).
    window: float = 300.0  # seconds per load window
    period: float = 86_400.0  # seconds per season (one day)
    periods: int = 3  # D: past periods the seasonal part averages over
    correction_windows: int = 10  # N: recent errors that correct the seasonal part
    correction_decay: float = 0.5  # weight of each error relative to the next more recent one
    # Planner.
    tick: float = 5.0  # seconds between plan() calls
    instance_capacity: int = 32  # concurrent requests one instance serves
    rank_decay: float = 0.5  # score of a model's (j+1)-th wanted replica relative to its j-th
    burst_weight_cap: float = 4.0  # a burst replica's weight is peak/avg, at most this
    disk_bw: float = 2e9  # bytes/s from the node's disk to a device (cold start)
    host_bw: float = 25e9  # bytes/s from host memory to a device
    # Reactive autoscaler.
    scale_up: float = 0.8  # add an instance above this fraction of capacity
    scale_down: float = 0.5  # remove one below this fraction of capacity ...
    average: float = 5.0  # ... of the load averaged over this many seconds ...
    grace: float = 5.0  # ... once it stayed below for this long
    keep_alive: float = 60.0  # autoscale baseline: idle seconds before an instance stops
    # KV cache.
    kv_fraction: float = 0.5  # KV of a full instance as a fraction of its weights (default)
    kv_bytes: Mapping[str, int] = field(default_factory=dict)  # model -> KV bytes per request
    kv_headroom: float = 1.25  # a dedicated device keeps KV for this x its expected load
    engine_bytes: int = 0  # device memory of one engine besides weights and KV (see above)
    # MuxServe-style baseline: instances colocated on one device (a fixed memory split).
    share_slots: int = 2

    def __post_init__(self) -> None:
        if self.window <= 0 or self.period < self.window:
            raise ValueError(f"need 0 < window <= period, got {self.window}, {self.period}")
        if self.periods < 1 or self.correction_windows < 0:
            raise ValueError("periods must be >= 1 and correction_windows >= 0")
        if not 0 < self.scale_down < self.scale_up:
            raise ValueError(f"need 0 < scale_down < scale_up, got {self.scale_down}")
        if self.instance_capacity < 1 or self.share_slots < 1:
            raise ValueError("instance_capacity and share_slots must be >= 1")

    @property
    def windows_per_period(self) -> int:
        """Season length in windows (288 for 300 s windows over a day)."""
        return max(1, round(self.period / self.window))

    def kv_per_request(self, spec: ModelSpec) -> int:
        """KV bytes one concurrent request of ``spec`` needs (see the module docstring)."""
        if spec.name in self.kv_bytes:
            return int(self.kv_bytes[spec.name])
        return math.ceil(self.kv_fraction * spec.nbytes / self.instance_capacity)

    def kv_reservation(self, spec: ModelSpec) -> int:
        """KV bytes an instance of ``spec`` reserves over its whole TP group."""
        return self.instance_capacity * self.kv_per_request(spec)

    def cold_start(self, spec: ModelSpec) -> float:
        """Seconds to load ``spec`` from disk: what prewarming one replica saves."""
        return spec.nbytes / self.disk_bw

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> PolicyConfig:
        """Build from the ``warmserve`` dask.config tree (or the mapping under that key).

        Keys of the ``forecast``, ``planner``, ``autoscaler`` and ``policy`` sections map to
        fields with dashes turned into underscores (``instance-capacity`` ->
        ``instance_capacity``). Keys that name no field are skipped: those sections are shared
        with the scheduler plugin, which keeps its own settings there.
        """
        if "warmserve" in d and isinstance(d["warmserve"], Mapping):
            d = d["warmserve"]
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for section in _SECTIONS:
            for key, value in (d.get(section) or {}).items():
                name = key.replace("-", "_")
                if name in names:
                    kwargs[name] = value
        for name in ("window", "period", "average", "grace", "keep_alive", "tick"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs)
