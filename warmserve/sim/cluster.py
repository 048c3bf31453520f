"""Cluster files: the simulated hardware (nodes x devices, memory sizes) plus its models and costs.

A cluster file is YAML::

    nodes: 2
    devices_per_node: 8
    device_memory: 80 GB        # bytes, or a number with a unit (GB, GiB, TB, ...)
    host_memory: 1 TB           # per node, for weights staged in host memory
    registry: models.yaml       # optional, relative to this file
    models:                     # optional, registry entries inline
      - {name: llama-7b-a, family: llama-7b, bytes: 14 GB, tp: 1}
    costs:                      # optional overrides of warmserve/sim/costs.yaml
      engine: {start_s: 30}

Everything that can be wrong with the inputs is checked here, before a run starts, so a bad file
fails in a second with a message instead of an hour into a simulation.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from warmserve.registry import ModelSpec, Registry, RegistryError
from warmserve.sim.costs import CostError, CostModel, load_costs
from warmserve.yamlfile import read_mapping


class SimInputError(ValueError):
    """A cluster file, registry or workload cannot be simulated; the message says why."""


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: Any, what: str) -> int:
    """``80e9``, ``"80 GB"`` or ``"80GiB"`` as a whole number of bytes."""
    if isinstance(value, bool):
        raise SimInputError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int | float):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise SimInputError(f"{what}: cannot read {value!r} as a size (e.g. '80 GB')")
        try:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
        except ValueError:
            raise SimInputError(f"{what}: cannot read {value!r} as a size") from None
    if not math.isfinite(n) or n <= 0:
        raise SimInputError(f"{what}: size must be positive, got {value!r}")
    return int(n)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The simulated hardware, the models it may serve and the cost model."""

    nodes: int
    devices_per_node: int
    device_memory: int
    host_memory: int
    models: Registry
    costs: CostModel

    @property
    def device_count(self) -> int:
        return self.nodes * self.devices_per_node

    def device_ids(self) -> list[tuple[str, str]]:
        """``(device id, node id)`` of every device, node-major (``n0/d0``, ``n0/d1``, ...)."""
        return [
            (f"n{n}/d{d}", f"n{n}") for n in range(self.nodes) for d in range(self.devices_per_node)
        ]

    def check(self) -> None:
        """Fail if some model can never be placed: TP wider than a node or too big per device."""
        if not self.models:
            raise SimInputError("the cluster has no models (give models: or --registry)")
        for m in self.models.values():
            if m.tp > self.devices_per_node:
                raise SimInputError(
                    f"model {m.name!r} needs tp={m.tp} devices of one node, but nodes have "
                    f"{self.devices_per_node}"
                )
            per_device = m.nbytes / m.tp
            if per_device >= self.device_memory:
                raise SimInputError(
                    f"model {m.name!r} needs {per_device / 1e9:.1f} GB per device "
                    f"({m.nbytes / 1e9:.1f} GB / tp {m.tp}), more than the device memory of "
                    f"{self.device_memory / 1e9:.1f} GB"
                )
            if m.nbytes > self.host_memory:
                raise SimInputError(
                    f"model {m.name!r} ({m.nbytes / 1e9:.1f} GB) does not fit in a node's host "
                    f"memory of {self.host_memory / 1e9:.1f} GB"
                )


def _models(entries: Any, where: str) -> list[ModelSpec]:
    if not isinstance(entries, list):
        raise SimInputError(f"{where}: models must be a list")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"name", "family", "bytes"} <= set(e):
            raise SimInputError(f"{where}: models[{i}] needs name, family and bytes")
        try:
            out.append(
                ModelSpec(
                    name=str(e["name"]),
                    family=str(e["family"]),
                    nbytes=parse_bytes(e["bytes"], f"{where}: models[{i}].bytes"),
                    tp=int(e.get("tp", 1)),
                    path=str(e.get("path") or ""),
                )
            )
        except (RegistryError, TypeError, ValueError) as err:
            raise SimInputError(f"{where}: models[{i}]: {err}") from None
    return out


def load_cluster(path: str | os.PathLike, registry: str | os.PathLike | None = None) -> ClusterSpec:
    """Read a cluster file; models come from ``registry`` (if given), its ``registry:`` and
    ``models:`` keys, in that order of precedence."""
    doc = read_mapping(path, "cluster", SimInputError)
    for key in ("nodes", "devices_per_node", "device_memory", "host_memory"):
        if key not in doc:
            raise SimInputError(f"{path}: lacks {key}")
    try:
        nodes, per_node = int(doc["nodes"]), int(doc["devices_per_node"])
    except (TypeError, ValueError):
        raise SimInputError(f"{path}: nodes and devices_per_node must be integers") from None
    if nodes < 1 or per_node < 1:
        raise SimInputError(f"{path}: nodes and devices_per_node must be >= 1")
    models: list[ModelSpec] = []
    if doc.get("models") is not None:
        models = _models(doc["models"], str(path))
    reg_path = registry
    if reg_path is None and doc.get("registry"):
        reg_path = os.path.join(os.path.dirname(os.path.abspath(path)), str(doc["registry"]))
    try:
        reg = Registry(models)
        if reg_path is not None:
            reg = Registry.from_yaml(reg_path).merged(reg)
    except RegistryError as e:
        raise SimInputError(str(e)) from None
    try:
        costs = load_costs(doc.get("costs") or {})
    except CostError as e:
        raise SimInputError(f"{path}: {e}") from None
    return ClusterSpec(
        nodes=nodes,
        devices_per_node=per_node,
        device_memory=parse_bytes(doc["device_memory"], f"{path}: device_memory"),
        host_memory=parse_bytes(doc["host_memory"], f"{path}: host_memory"),
        models=reg,
        costs=costs,
    )


WORKLOAD_COLUMNS = ("arrival", "model", "input_tokens", "output_tokens")


def check_workload(table: pa.Table, models: Iterable[str]) -> None:
    """Fail on a workload the simulator cannot replay faithfully (before any event runs)."""
    missing = [c for c in WORKLOAD_COLUMNS if c not in table.column_names]
    if missing:
        raise SimInputError(f"workload lacks columns {missing}")
    arrival = table.column("arrival").to_numpy(zero_copy_only=False)
    if len(arrival) and not np.isfinite(arrival).all():
        raise SimInputError("workload has arrival times that are not finite")
    if len(arrival) and arrival.min() < 0:
        i = int(np.argmin(arrival))
        raise SimInputError(f"workload row {i} has a negative arrival time {arrival[i]}")
    if len(arrival) > 1 and (np.diff(arrival) < 0).any():
        i = int(np.argmax(np.diff(arrival) < 0)) + 1
        raise SimInputError(f"workload is not sorted by arrival (row {i} goes back in time)")
    for col in ("input_tokens", "output_tokens"):
        v = table.column(col).to_numpy(zero_copy_only=False)
        if len(v) and v.min() < 0:
            raise SimInputError(f"workload has negative {col} (row {int(np.argmin(v))})")
    known = set(models)
    names = set(table.column("model").unique().to_pylist())
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        raise SimInputError(
            f"workload names models not in the registry: {unknown[:5]}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
