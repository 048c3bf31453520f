"""WarmServe's scheduler plugin: ``dask scheduler --preload warmserve.scheduler_plugin``.

The preload merges ``--warmserve-config`` (a YAML of ``warmserve.*`` keys) into dask.config,
reads the model registry, builds the policy named by ``--warmserve-policy`` and installs
:class:`~warmserve.scheduler_plugin.extension.WarmServeExtension` on the scheduler. Operators
drive it from a client with :class:`~warmserve.scheduler_plugin.proxy.WarmServeProxy`.
"""

from __future__ import annotations

import logging
import os

import click
import dask.config
import yaml

from warmserve import config, dashboard
from warmserve.registry import Registry

logger = logging.getLogger("warmserve.scheduler")

dashboard.register_page()  # before the scheduler builds its dashboard


def load_config_file(path: str) -> None:
    """Merge a YAML file of ``warmserve.*`` keys (with or without the top key) into dask.config."""
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise click.BadParameter(f"{path}: expected a mapping", param_hint="--warmserve-config")
    if "warmserve" not in doc:
        doc = {"warmserve": doc}
    dask.config.update(dask.config.config, dask.config.expand_environment_variables(doc))


def registry_path(path: str | None) -> str:
    """The registry file: the flag, else ``<warmserve.models-dir>/registry.yaml``."""
    return path or os.path.join(config.get("models-dir"), "registry.yaml")


def build_extension(registry: Registry, policy_name: str):
    """The extension with the policy ``policy_name``, configured from dask.config now.

    With ``warmserve.scheduler.history-dir`` set, a policy that forecasts keeps its forecaster's
    history there (see :mod:`~warmserve.scheduler_plugin.history`)."""
    from warmserve.policy.config import PolicyConfig
    from warmserve.policy.factory import make_policy
    from warmserve.scheduler_plugin.extension import WarmServeExtension
    from warmserve.scheduler_plugin.history import History

    policy_config = PolicyConfig.from_mapping(dask.config.get("warmserve"))
    policy = make_policy(policy_name, registry, policy_config)
    window = float(config.get("forecast.window"))
    history_dir = config.get("scheduler.history-dir")
    forecaster = getattr(policy, "forecaster", None)
    history = None
    if history_dir and forecaster is not None:
        every = int(config.get("scheduler.history-every"))
        history = History(os.fspath(history_dir), forecaster, window, every)
    return WarmServeExtension(
        registry,
        policy,
        tick=float(config.get("planner.tick")),
        capacity=int(config.get("planner.instance-capacity")),
        window=window,
        average=float(config.get("autoscaler.average")),
        history=history,
    )


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--warmserve-config", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--warmserve-policy", default="warmserve", show_default=True)
@click.option(
    "--warmserve-registry",
    default=None,
    help="Model registry YAML [default: <warmserve.models-dir>/registry.yaml].",
)
def dask_setup(
    scheduler,
    warmserve_config: str | None,
    warmserve_policy: str,
    warmserve_registry: str | None,
) -> None:
    """Install WarmServe on this scheduler."""
    if warmserve_config:
        load_config_file(warmserve_config)
    registry = Registry.from_yaml(registry_path(warmserve_registry))
    extension = build_extension(registry, warmserve_policy)
    # Preloads run before the scheduler starts its plugins, so adding is enough: it starts ours.
    scheduler.add_plugin(extension, name=extension.name, idempotent=True)
    dashboard.install(scheduler)
