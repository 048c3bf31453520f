"""Defaults of the worker plugin's ``warmserve.worker.*`` dask.config keys.

They are registered here rather than in ``warmserve/warmserve.yaml`` so the worker plugin owns its
keys; ``DASK_WARMSERVE__WORKER__...`` environment variables and ``dask.config.set`` override them
as for every other WarmServe key. Per-process values (devices, node name) are preload flags.
"""

from __future__ import annotations

import dask.config
from dask.utils import parse_bytes, parse_timedelta

from warmserve import config

DEFAULTS = {
    "warmserve": {
        "worker": {
            # Name of the node in device ids; null = hostname. Two workers on one host given
            # different names look like two nodes to the scheduler.
            "node": None,
            # CPU slots to offer when no GPU is found and no --warmserve-devices is given.
            "cpu-slots": 1,
            # Memory budget of one CPU slot (weights pool plus engines), and of a GPU when NVML
            # cannot say.
            "device-memory": "2GiB",
            # Host-memory tier budget of this worker (staged weights, shared with engines).
            "host-memory": "4GiB",
            # KV-cache space an engine takes on its device (warmserve.engine's kv_cache_bytes).
            "engine-kv": "256MiB",
            # How often engines are checked for liveness, and how often a stream waiting on a
            # token re-checks its engine.
            "liveness-interval": "1s",
        }
    }
}

dask.config.update_defaults(DEFAULTS)


def get(key: str):
    """``warmserve.worker.<key>``."""
    return config.get(f"worker.{key}")


def get_bytes(key: str) -> int:
    """A byte-size key (``"2GiB"`` or an int) as bytes."""
    return int(parse_bytes(get(key)))


def get_seconds(key: str) -> float:
    """A duration key (``"1s"`` or a number of seconds) as seconds."""
    return float(parse_timedelta(get(key)))
