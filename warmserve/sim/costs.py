"""The cost model: how long loads, engine starts, prefill and decode take in the simulator.

Numbers live in ``costs.yaml`` beside this module, each with its source; a cluster file may
override any of them under its ``costs:`` key. Kept apart from the engine so a reader can check
the constants without reading the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from warmserve.registry import ModelSpec

DEFAULT_COSTS = os.path.join(os.path.dirname(__file__), "costs.yaml")


class CostError(ValueError):
    """The cost model is missing a number or has a non-positive one."""


@dataclass(frozen=True, slots=True)
class Profile:
    """Serving costs of one model size: prefill per request, decode per output token, KV size."""

    name: str
    nbytes: float
    prefill_s: float
    decode_s: float
    kv_bytes_per_token: float


@dataclass(frozen=True, slots=True)
class CostModel:
    """All the time constants of a simulated cluster."""

    disk_to_host: float
    host_to_device: float
    device_to_device: float
    engine_start_s: float
    activate_s: float
    engine_bytes: float
    profiles: tuple[Profile, ...]
    instance_capacity: int
    max_queue: int
    request_timeout_s: float
    tick_s: float
    kv_tokens_per_request: int
    demand_interval_s: float

    def profile(self, model: ModelSpec) -> Profile:
        """The profile nearest in size to ``model``: virtual models need no profile of their own."""
        return min(self.profiles, key=lambda p: abs(p.nbytes - model.nbytes))

    def disk_load_s(self, nbytes: float) -> float:
        """Seconds to read ``nbytes`` from a node's disk into its host memory."""
        return nbytes / self.disk_to_host

    def host_load_s(self, nbytes: float) -> float:
        """Seconds to copy ``nbytes`` from host memory to one device."""
        return nbytes / self.host_to_device

    def peer_load_s(self, nbytes: float) -> float:
        """Seconds to copy ``nbytes`` from one device to another of the same node."""
        return nbytes / self.device_to_device


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _positive(doc: Mapping[str, Any], section: str, key: str) -> float:
    try:
        v = float(doc[section][key])
    except (KeyError, TypeError):
        raise CostError(f"cost model lacks {section}.{key}") from None
    except ValueError:
        raise CostError(f"cost model {section}.{key} is not a number") from None
    if v <= 0:
        raise CostError(f"cost model {section}.{key} must be positive, got {v}")
    return v


def load_costs(overrides: Mapping[str, Any] | None = None, path: str = DEFAULT_COSTS) -> CostModel:
    """Read ``costs.yaml`` (or ``path``) and apply a cluster file's ``costs:`` overrides."""
    with open(path) as f:
        doc = _merge(yaml.safe_load(f), overrides or {})
    profiles = []
    for name, p in (doc.get("profiles") or {}).items():
        sub = {"p": p}
        profiles.append(
            Profile(
                name=str(name),
                nbytes=_positive(sub, "p", "bytes"),
                prefill_s=_positive(sub, "p", "prefill_s"),
                decode_s=_positive(sub, "p", "decode_s"),
                kv_bytes_per_token=_positive(sub, "p", "kv_bytes_per_token"),
            )
        )
    if not profiles:
        raise CostError("cost model has no profiles")
    return CostModel(
        disk_to_host=_positive(doc, "bandwidth", "disk_to_host"),
        host_to_device=_positive(doc, "bandwidth", "host_to_device"),
        device_to_device=_positive(doc, "bandwidth", "device_to_device"),
        engine_start_s=_positive(doc, "engine", "start_s"),
        activate_s=_positive(doc, "engine", "activate_s"),
        engine_bytes=_positive(doc, "engine", "memory_bytes"),
        profiles=tuple(profiles),
        instance_capacity=int(_positive(doc, "serving", "instance_capacity")),
        max_queue=int(_positive(doc, "serving", "max_queue")),
        request_timeout_s=_positive(doc, "serving", "request_timeout_s"),
        tick_s=_positive(doc, "serving", "tick_s"),
        kv_tokens_per_request=int(_positive(doc, "serving", "kv_tokens_per_request")),
        demand_interval_s=_positive(doc, "serving", "demand_interval_s"),
    )
