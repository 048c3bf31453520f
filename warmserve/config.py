"""WarmServe's configuration lives in dask.config under ``warmserve.*``.

Defaults ship in ``warmserve.yaml`` beside this file, as dask-cuda and dask-jobqueue do, so one
mechanism covers YAML files in ``~/.config/dask``, ``DASK_WARMSERVE__...`` environment variables and
``dask.config.set`` in tests. Per-process differences (a worker's devices) are click options on the
preloads instead.
"""

from __future__ import annotations

import os

import dask.config
import yaml

_DEFAULTS = os.path.join(os.path.dirname(__file__), "warmserve.yaml")

with open(_DEFAULTS) as _f:
    defaults = yaml.safe_load(_f)

dask.config.update_defaults(defaults)


def get(key: str):
    """Return ``warmserve.<key>`` from dask.config (a dotted key, e.g. ``"planner.window"``)."""
    return dask.config.get(f"warmserve.{key}")
