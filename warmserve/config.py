"""WarmServe's configuration lives in dask.config under ``warmserve.*``.

Defaults ship in ``warmserve.yaml`` beside this file (read by :mod:`warmserve.defaults`), as
dask-cuda and dask-jobqueue do, so one mechanism covers YAML files in ``~/.config/dask``,
``DASK_WARMSERVE__...`` environment variables and ``dask.config.set`` in tests. Importing this
module registers them, which is its purpose: every module that reads a ``warmserve.*`` key imports
it. Per-process differences (a worker's devices) are click options on the preloads instead.
"""

from __future__ import annotations

import dask.config

from warmserve import defaults

dask.config.update_defaults(defaults.document())


def get(key: str):
    """Return ``warmserve.<key>`` from dask.config (a dotted key, e.g. ``"planner.tick"``)."""
    return dask.config.get(f"warmserve.{key}")


def policy_config():
    """The :class:`~warmserve.policy.config.PolicyConfig` of ``warmserve.*`` as set now (what
    the scheduler's policy runs with; the worker sizes its engines' slots by the same rule)."""
    from warmserve.policy.config import PolicyConfig

    return PolicyConfig.from_mapping(dask.config.get("warmserve"))


def check_keys() -> None:
    """Raise :class:`~warmserve.defaults.ConfigError` naming every ``warmserve.*`` key set in
    dask.config (a config file, ``~/.config/dask``, an environment variable) that is no
    setting of ``warmserve.yaml``."""
    defaults.check_keys(dask.config.get("warmserve"))
