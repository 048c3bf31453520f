"""Every constant the policies use, in one frozen object.

The scheduler plugin reads ``warmserve.*`` from dask.config and hands the sections to
:meth:`PolicyConfig.from_mapping`; the simulator and the tests build a :class:`PolicyConfig`
directly. The defaults, and what each constant means, are in ``warmserve/warmserve.yaml``
(sections ``forecast``, ``planner``, ``autoscaler`` and ``policy``, read by
:mod:`warmserve.defaults`, no Dask): a field is its key with dashes turned into underscores.
Keeping dask out of this module keeps the policy package pure.

Memory model (what :class:`~warmserve.policy.accounting.Accounting` charges per device):

- a TP shard of a model's weights is ``ceil(nbytes / tp)`` bytes on each device of its group;
- an instance serves at most :meth:`PolicyConfig.capacity` concurrent requests and reserves KV
  cache for that many: ``kv_reservation(spec, memory) = capacity(spec, memory) *
  kv_per_request(spec)`` in all, split in ``ceil(... / tp)`` per device. ``memory`` is the
  smallest device of its TP group (each device holds an equal shard, so that one bounds it);
- the capacity is what fits, as vLLM sizes its own KV cache: ``instance_capacity`` (the paper's
  32) where the device holds that many requests' KV beside the weight shard and an engine,
  fewer on a smaller device (a 7B model on a 32 GB device), down to 1; 0 where not even one
  request's KV fits, and the model can never serve there (:mod:`warmserve.policy.feasible`).
  The simulator's admission, the ledger, the planner and autoscaler, and the live scheduler's
  slots and worker's engines all take it from that one method;
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
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from warmserve import defaults
from warmserve.defaults import ConfigError
from warmserve.registry import ModelSpec

_SECTIONS = ("forecast", "planner", "autoscaler", "policy")  # dask.config sections read


def _default(section: str, key: str) -> Any:
    return defaults.get(f"{section}.{key}")


@dataclass(frozen=True)
class PolicyConfig:
    """Constants of forecasting, planning and autoscaling (``warmserve.yaml`` says what each
    means; the section of each group is named above it)."""

    # forecast: the Corrective Seasonal Predictor.
    window: float = float(_default("forecast", "window"))
    period: float = float(_default("forecast", "period"))
    periods: int = int(_default("forecast", "periods"))
    correction_windows: int = int(_default("forecast", "correction-windows"))
    correction_decay: float = float(_default("forecast", "correction-decay"))
    # planner
    tick: float = float(_default("planner", "tick"))
    instance_capacity: int = int(_default("planner", "instance-capacity"))
    rank_decay: float = float(_default("planner", "rank-decay"))
    burst_weight_cap: float = float(_default("planner", "burst-weight-cap"))
    disk_bw: float = float(_default("planner", "disk-bw"))
    host_bw: float = float(_default("planner", "host-bw"))
    engine_bytes: int = int(_default("planner", "engine-bytes"))
    # autoscaler: the reactive autoscaler, and the autoscale baseline's keep-alive.
    scale_up: float = float(_default("autoscaler", "scale-up"))
    scale_down: float = float(_default("autoscaler", "scale-down"))
    average: float = float(_default("autoscaler", "average"))
    grace: float = float(_default("autoscaler", "grace"))
    keep_alive: float = float(_default("autoscaler", "keep-alive"))
    # policy: KV cache, and the share baseline.
    kv_fraction: float = float(_default("policy", "kv-fraction"))
    kv_bytes: Mapping[str, int] = field(
        default_factory=lambda: dict(_default("policy", "kv-bytes") or {})
    )
    kv_headroom: float = float(_default("policy", "kv-headroom"))
    share_slots: int = int(_default("policy", "share-slots"))

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

    def capacity(self, spec: ModelSpec, memory: int) -> int:
        """Concurrent requests an instance of ``spec`` serves on a TP group whose smallest
        device has ``memory`` bytes: ``min(instance_capacity, floor(kv / kv_per_request))``
        where ``kv`` is what the group holds beside the weight shards and an engine,
        ``tp * (memory - ceil(nbytes / tp) - engine_bytes)``. 0 when not even one request's KV
        fits: the smallest useful KV cache is one request's."""
        kv = spec.tp * (memory - math.ceil(spec.nbytes / spec.tp) - self.engine_bytes)
        if kv < 0:
            return 0
        per = self.kv_per_request(spec)
        return self.instance_capacity if per <= 0 else min(self.instance_capacity, kv // per)

    def kv_reservation(self, spec: ModelSpec, memory: int) -> int:
        """KV bytes an instance of ``spec`` reserves over its whole TP group (``memory`` as
        for :meth:`capacity`)."""
        return self.capacity(spec, memory) * self.kv_per_request(spec)

    def cold_start(self, spec: ModelSpec) -> float:
        """Seconds to load ``spec`` from disk: what prewarming one replica saves."""
        return spec.nbytes / self.disk_bw

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> PolicyConfig:
        """Build from the ``warmserve`` dask.config tree (or the mapping under that key).

        Keys of the ``forecast``, ``planner``, ``autoscaler`` and ``policy`` sections map to
        fields with dashes turned into underscores (``instance-capacity`` ->
        ``instance_capacity``), each value converted to its field's type. A key that is not
        one of its section's in ``warmserve.yaml``, or a value that does not convert, raises
        :class:`~warmserve.defaults.ConfigError` naming it. The other sections are not read.
        """
        if "warmserve" in d and isinstance(d["warmserve"], Mapping):
            d = d["warmserve"]
        kwargs: dict[str, Any] = {}
        for section in _SECTIONS:
            values = d.get(section) or {}
            defaults.check_keys(values, section)
            for key, value in values.items():
                name = str(key).replace("-", "_")
                kwargs[name] = _convert(name, value, f"warmserve.{section}.{key}")
        return cls(**kwargs)


_TYPES = typing.get_type_hints(PolicyConfig)


def _convert(name: str, value: Any, where: str) -> Any:
    """``value`` as the type of the field ``name``; ConfigError naming ``where`` if it is not."""
    kind = _TYPES[name]
    try:
        if kind is float:
            return float(value)
        if kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(float(value))
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping, got {value!r}")
        return {str(k): int(v) for k, v in value.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def check_fields() -> None:
    """Every field has its key in one section of ``warmserve.yaml`` and every key of those
    sections is a field (a test runs it)."""
    keys = [k.replace("-", "_") for s in _SECTIONS for k in defaults.section(s)]
    names = [f.name for f in fields(PolicyConfig)]
    if sorted(keys) != sorted(names):
        raise ConfigError(f"warmserve.yaml's policy keys {sorted(keys)} are not the fields {names}")
