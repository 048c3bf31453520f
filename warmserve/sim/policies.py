"""The policy a simulation runs: the live system's own, built by ``make_policy``.

Its :class:`PolicyConfig` starts from the one the live scheduler plugin builds (the
``warmserve.*`` dask.config tree: ``warmserve.yaml`` defaults, YAML files in
``~/.config/dask``, ``DASK_WARMSERVE__...`` variables), so a forecast window or autoscaler
grace set there applies to simulations too. The numbers the cost model decides (capacity, tick,
bandwidths, KV and engine sizes) then replace their fields, so the planner plans with what the
simulator charges.
"""

from __future__ import annotations

from dataclasses import replace

from warmserve.policy.config import PolicyConfig
from warmserve.policy.feasible import never_serve, share_places_nothing
from warmserve.policy.state import Policy
from warmserve.sim.cluster import ClusterSpec, SimInputError


def live_config() -> PolicyConfig:
    """The policy configuration the scheduler plugin would build now, from dask.config."""
    import dask.config

    import warmserve.config  # noqa: F401  (puts warmserve.yaml's defaults into dask.config)

    return PolicyConfig.from_mapping(dask.config.get("warmserve"))


def policy_config(cluster: ClusterSpec, base: PolicyConfig | None = None) -> PolicyConfig:
    """``base`` (or the defaults) with the numbers that the cost model decides filled in."""
    costs = cluster.costs
    kv = {
        m.name: int(costs.profile(m).kv_bytes_per_token * costs.kv_tokens_per_request)
        for m in cluster.models.values()
    }
    return replace(
        base or PolicyConfig(),
        tick=costs.tick_s,
        instance_capacity=costs.instance_capacity,
        disk_bw=costs.disk_to_host,
        host_bw=costs.host_to_device,
        kv_bytes=kv,
        engine_bytes=int(costs.engine_bytes),
    )


def build_policy(name: str, cluster: ClusterSpec, config: PolicyConfig) -> Policy:
    """The named policy from the policy package's factory (``warmserve.policy.factory``).

    Raises :class:`SimInputError` for a setting it could not serve: a model that no TP group
    of the cluster can ever hold an instance of, or ``share`` with parts too small for any
    model (:mod:`warmserve.policy.feasible`)."""
    from warmserve.policy.factory import make_policy

    devices = [(node, cluster.device_memory) for _, node in cluster.device_ids()]
    never = never_serve(cluster.models, devices, config)
    if never:
        raise SimInputError("; ".join(never.values()))
    if name == "share":
        nothing = share_places_nothing(cluster.models, devices, config)
        if nothing:
            raise SimInputError(nothing)
    return make_policy(name, cluster.models, config)
