"""WarmServe's scheduler plugin: ``dask scheduler --preload warmserve.scheduler_plugin``.

The preload merges ``--warmserve-config`` (a YAML of ``warmserve.*`` keys) into dask.config,
reads the model registry (both checked as the flags are parsed, see :mod:`warmserve.options`),
builds the policy named by ``--warmserve-policy`` and installs
:class:`~warmserve.scheduler_plugin.extension.WarmServeExtension` on the scheduler. Operators
drive it from a client with :class:`~warmserve.scheduler_plugin.proxy.WarmServeProxy`.
"""

from __future__ import annotations

import logging
import os

import click
import dask.config

from warmserve import config, console, dashboard, options
from warmserve.loopback import keep_http_local
from warmserve.policy.factory import POLICIES
from warmserve.registry import Registry

logger = logging.getLogger("warmserve.scheduler")


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
        window=window,
        average=float(config.get("autoscaler.average")),
        history=history,
    )


def check_config() -> None:
    """Build the policy configuration from dask.config, so a bad value fails at parse time."""
    from warmserve.policy.config import PolicyConfig

    PolicyConfig.from_mapping(dask.config.get("warmserve"))


@click.command(context_settings={"ignore_unknown_options": True})
@options.config_option("--warmserve-config", check_config)
@click.option(
    "--warmserve-policy", type=click.Choice(POLICIES), default="warmserve", show_default=True
)
@options.registry_option("--warmserve-registry")
@options.public_dashboard_option("--warmserve-public-dashboard")
def dask_setup(scheduler, warmserve_policy: str, warmserve_registry: str) -> None:
    """Install WarmServe on this scheduler (its flags were checked when they were parsed)."""
    console.show_ours()
    keep_http_local(scheduler)
    registry = Registry.from_yaml(warmserve_registry)
    extension = build_extension(registry, warmserve_policy)
    # Preloads run before the scheduler starts its plugins, so adding is enough: it starts ours.
    scheduler.add_plugin(extension, name=extension.name, idempotent=True)
    dashboard.install(scheduler)
