"""The worker plugin's ``warmserve.worker.*`` dask.config keys, read with their units.

Their defaults are in ``warmserve/warmserve.yaml`` (section ``worker``) with every other WarmServe
key; ``DASK_WARMSERVE__WORKER__...`` environment variables and ``dask.config.set`` override them.
Per-process values (devices, node name) are preload flags.
"""

from __future__ import annotations

from dask.utils import parse_bytes, parse_timedelta

from warmserve import config


def get(key: str):
    """``warmserve.worker.<key>``."""
    return config.get(f"worker.{key}")


def get_bytes(key: str) -> int:
    """A byte-size key (``"2GiB"`` or an int) as bytes."""
    return int(parse_bytes(get(key)))


def get_seconds(key: str) -> float:
    """A duration key (``"1s"`` or a number of seconds) as seconds."""
    return float(parse_timedelta(get(key)))


BYTES = ("device-memory", "host-memory", "engine-kv")
SECONDS = ("liveness-interval",)


def check() -> None:
    """Read every key the plugin reads with a unit, so a bad value fails the preload's flags
    (ValueError) instead of the plugin's setup, which Dask would only log."""
    for key in BYTES:
        get_bytes(key)
    if get("gpu-memory") is not None:
        get_bytes("gpu-memory")
    for key in SECONDS:
        get_seconds(key)
    int(get("cpu-slots"))
