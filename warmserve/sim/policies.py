"""The policy a simulation runs: the live system's own, built by ``make_policy``.

The simulator derives the :class:`PolicyConfig` from the cluster's cost model, so the planner
plans with the same capacity, tick, bandwidths and KV sizes that the simulator charges.
"""

from __future__ import annotations

from dataclasses import replace

from warmserve.policy.config import PolicyConfig
from warmserve.policy.state import Policy
from warmserve.sim.cluster import ClusterSpec


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
    )


def build_policy(name: str, cluster: ClusterSpec, config: PolicyConfig) -> Policy:
    """The named policy from the policy package's factory (``warmserve.policy.factory``)."""
    from warmserve.policy.factory import make_policy

    return make_policy(name, cluster.models, config)
